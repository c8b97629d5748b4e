"""mxd_decode(z, decoder, experts, values, indices, bias) -> (z @ decoder) * gather_combine(experts,
values, indices) + bias: the output of an MxD layer, y = (aC) * (zD) + b. This module holds the op's
checks, its registration and autograd; the backend table (_table.py) runs the backends.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from .._utils import as_output, autocasting, check_float, check_tensor, flatten_leading, placeholder
from . import _autocast, _guards, _table, _vmap
from .gather_combine import flat_selection, validate_selection


def _validate(z, decoder, experts, values, indices, bias, mixed_dtypes: bool = False):
    """mixed_dtypes: the floating inputs may differ in dtype (autocast casts them to one)."""
    check_tensor("z", z, min_ndim=1)
    check_tensor("decoder", decoder, ndim=2)
    check_float("z", z)
    check_float("decoder", decoder, like=("z", z), mixed_dtypes=mixed_dtypes)
    check_tensor("experts", experts, ndim=2)
    check_float("experts", experts, like=("z", z), mixed_dtypes=mixed_dtypes)
    validate_selection(experts, values, indices, weight_name="experts", mixed_dtypes=mixed_dtypes)
    if decoder.shape[0] != z.shape[-1]:
        raise ValueError(f"decoder must have shape [{z.shape[-1]}, O] to match z's last dimension, "
                         f"got {tuple(decoder.shape)}")
    if experts.shape[1] != decoder.shape[1]:
        raise ValueError(f"experts must have shape [N, {decoder.shape[1]}] to match decoder's output width, "
                         f"got {tuple(experts.shape)}")
    if values.shape[:-1] != z.shape[:-1]:
        raise ValueError(f"values must have z's leading dimensions {tuple(z.shape[:-1])}, "
                         f"got shape {tuple(values.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_float("bias", bias, like=("z", z), mixed_dtypes=mixed_dtypes)
        if bias.shape[0] != decoder.shape[1]:
            raise ValueError(f"bias must have shape [{decoder.shape[1]}] (O), got {tuple(bias.shape)}")


# ---- custom ops --------------------------------------------------------------------------

@torch.library.custom_op("mxd_fast::mxd_decode", mutates_args=(), device_types=("cpu", "cuda"))
def _mxd_decode_op(z: Tensor, decoder: Tensor, experts: Tensor, values: Tensor, indices: Tensor,
                   bias: Optional[Tensor]) -> Tensor:
    _validate(z, decoder, experts, values, indices, bias)
    v, i = flat_selection("mxd_decode", values, indices, experts.shape[0], "experts")
    y = _table.run("mxd_decode", "forward", z.device, flatten_leading(z), decoder, experts, v, i, bias)
    return as_output(y, (*z.shape[:-1], decoder.shape[1]))


@_mxd_decode_op.register_fake
def _(z, decoder, experts, values, indices, bias):
    _validate(z, decoder, experts, values, indices, bias)
    return z.new_empty(*z.shape[:-1], decoder.shape[1])


@torch.library.custom_op("mxd_fast::mxd_decode_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _mxd_decode_backward_op(grad_y: Tensor, z: Tensor, decoder: Tensor, experts: Tensor, values: Tensor,
                            indices: Tensor, need_z: bool, need_decoder: bool, need_experts: bool,
                            need_values: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    v, i = flat_selection("mxd_decode", values, indices, experts.shape[0], "experts")
    grads = _table.run("mxd_decode", "backward", z.device, flatten_leading(grad_y), flatten_leading(z), decoder,
                       experts, v, i, need_z, need_decoder, need_experts, need_values, need_bias,
                       _backend.deterministic())
    dz, ddecoder, dexperts, dvalues, dbias = grads
    return (as_output(dz, z.shape) if need_z else placeholder(z),
            ddecoder if need_decoder else placeholder(z),
            dexperts if need_experts else placeholder(z),
            as_output(dvalues, values.shape) if need_values else placeholder(z),
            dbias if need_bias else placeholder(z))


@_mxd_decode_backward_op.register_fake
def _(grad_y, z, decoder, experts, values, indices, need_z, need_decoder, need_experts, need_values, need_bias):
    return (z.new_empty(z.shape) if need_z else placeholder(z),
            decoder.new_empty(decoder.shape) if need_decoder else placeholder(z),
            experts.new_empty(experts.shape) if need_experts else placeholder(z),
            values.new_empty(values.shape) if need_values else placeholder(z),
            decoder.new_empty(decoder.shape[1]) if need_bias else placeholder(z))


def _setup_context(ctx, inputs, output):
    ctx.settings = _backend.settings()   # the backward pass runs with the forward's backend
    z, decoder, experts, values, indices, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(z, decoder, experts, values, indices)


def _backward(ctx, grad_y):
    z, decoder, experts, values, indices = ctx.saved_tensors
    need = list(ctx.needs_input_grad)
    needs = (need[0], need[1], need[2], need[3], need[5] and ctx.has_bias)
    if not any(needs):
        return (None,) * 6
    with _backend.use_settings(ctx.settings):
        grads = torch.ops.mxd_fast.mxd_decode_backward(grad_y, z, decoder, experts, values, indices, *needs)
    dz, ddecoder, dexperts, dvalues, dbias = (g if n else None for g, n in zip(grads, needs))
    return dz, ddecoder, dexperts, dvalues, None, dbias


_mxd_decode_op.register_autograd(_backward, setup_context=_setup_context)
_guards.register(_mxd_decode_op, check=_validate)
_guards.register(_mxd_decode_backward_op)
_autocast.register("mxd_decode", check=_validate)
_autocast.register("mxd_decode_backward", cast=False)
_vmap.register("mxd_decode", leading=(0, 3, 4), weights=(1, 2, 5))
_vmap.register("mxd_decode_backward", leading=(0, 1, 4, 5), weights=(2, 3), flags=(6, 7, 8, 9, 10),
               weight_grads=(1, 2, 4))


def mxd_decode(z: Tensor, decoder: Tensor, experts: Tensor, values: Tensor, indices: Tensor,
               bias: Optional[Tensor]) -> Tensor:
    """(z @ decoder) * gather_combine(experts, values, indices) + bias.

    z: [..., H]; decoder: [H, O]; experts: [N, O]; values, indices: [..., K]; bias: [O] or None.
    Differentiable in z, decoder, experts, values and bias.
    """
    _validate(z, decoder, experts, values, indices, bias, mixed_dtypes=autocasting(z))
    return torch.ops.mxd_fast.mxd_decode(z, decoder, experts, values, indices, bias)
