"""Torch backend of topk_gate: the logits are formed tile by tile (at most _TILE_ELEMENTS of them at
once) and merged into a running top-k, never as the [B, N] logits of the whole batch."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._utils import relu_masked
from . import screened_gate, sparse

# Logits of at most this many elements exist at once.
_TILE_ELEMENTS = 1 << 22
_TILE_EXPERTS = 4096


def _merge(run_v, run_i, v, i, k):
    if run_v is None:
        return v, i
    v = torch.cat((run_v, v), dim=1)
    i = torch.cat((run_i, i), dim=1)
    keep = min(k, v.shape[1])
    v, pos = v.topk(keep, dim=1, sorted=False)
    return v, i.gather(1, pos)


def topk_gate_torch_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int):
    """(values [B, k] sorted descending, indices [B, k] int64) of relu(x @ weight.T + bias): screened by
    a bf16 GEMM with certified rescoring where MXD_FAST_EXACT_GATE and the machine allow it (fp32 on the
    CPU; screened_gate.py), else the direct forward. The same selection either way, up to ties."""
    return screened_gate.topk_gate_forward(x, weight, bias, k, topk_gate_direct_forward)


def topk_gate_direct_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int):
    """The direct forward: every logit in the inputs' dtype, tile by tile, into a running top-k."""
    B = x.shape[0]
    N = weight.shape[0]
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    tile_n = min(N, max(_TILE_EXPERTS, k))
    tile_b = max(1, _TILE_ELEMENTS // tile_n)
    for b0 in range(0, B, tile_b):
        xb = x[b0:b0 + tile_b]
        run_v = run_i = None
        for n0 in range(0, N, tile_n):
            w = weight[n0:n0 + tile_n]
            logits = xb @ w.T if bias is None else torch.addmm(bias[n0:n0 + tile_n], xb, w.T)
            logits.relu_()
            v, i = logits.topk(min(k, logits.shape[1]), dim=1, sorted=False)
            run_v, run_i = _merge(run_v, run_i, v, i.add_(n0), k)
        v, order = run_v.sort(dim=1, descending=True)
        values[b0:b0 + tile_b] = v
        torch.gather(run_i, 1, order, out=indices[b0:b0 + tile_b])
    return values, indices


def topk_gate_torch_backward(grad_values, x, weight, values, indices, need_x: bool, need_weight: bool,
                             need_bias: bool, deterministic: bool):
    grad_logits = relu_masked(grad_values, values)
    dx = sparse.gather_combine(weight, grad_logits, indices) if need_x else None
    dweight = sparse.scatter_rows(indices, grad_logits, x, weight.shape[0], deterministic) if need_weight else None
    dbias = sparse.scatter_sum(indices, grad_logits, weight.shape[0], deterministic) if need_bias else None
    return dx, dweight, dbias
