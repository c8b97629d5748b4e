"""Torch backend of mxd_decode: y = (z @ decoder) * gather_combine(experts, values, indices) + bias.
The backward recomputes z @ decoder rather than keeping it between the passes."""
from __future__ import annotations

from . import sparse


def mxd_decode_torch_forward(z, decoder, experts, values, indices, bias):
    values, indices, _ = sparse.in_range(values, indices, experts.shape[0])
    y = z @ decoder
    y.mul_(sparse.gather_combine(experts, values, indices))
    if bias is not None:
        y.add_(bias)
    return y


def mxd_decode_torch_backward(grad_y, z, decoder, experts, values, indices, need_z: bool, need_decoder: bool,
                              need_experts: bool, need_values: bool, need_bias: bool, deterministic: bool):
    dz = ddecoder = dexperts = dvalues = dbias = None
    values, indices, valid = sparse.in_range(values, indices, experts.shape[0])
    if need_z or need_decoder:
        grad_h = grad_y * sparse.gather_combine(experts, values, indices)
        dz = grad_h @ decoder.T if need_z else None
        ddecoder = z.T @ grad_h if need_decoder else None
        del grad_h
    if need_experts or need_values:
        grad_c = grad_y * (z @ decoder)  # recomputed: (z @ decoder) is never kept between the passes
        n = experts.shape[0]
        # on the CPU both products group the selections by row: group them once (all in range by now)
        both = need_experts and need_values and grad_y.device.type == "cpu" and indices.numel() > 0
        rows = sparse.row_groups(indices, n) if both else None
        dexperts = sparse.scatter_rows(indices, values, grad_c, n, deterministic, rows=rows) if need_experts else None
        dvalues = sparse.gathered_dot(experts, indices, grad_c, rows=rows).where(valid, 0) if need_values else None
    if need_bias:
        dbias = grad_y.sum(0)
    return dz, ddecoder, dexperts, dvalues, dbias
