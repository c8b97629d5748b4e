"""The dense reference: MxD computed exactly the way the paper's code does it (dense gate, top-k
scattered into a dense [B, N] tensor, dense products). Slow and memory-hungry by design; the tests
and benchmarks compare every backend against it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def topk_gate(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> tuple[Tensor, Tensor]:
    logits = torch.einsum("...i,ni->...n", x, weight)
    if bias is not None:
        logits = logits + bias
    return torch.topk(torch.relu(logits), k, dim=-1, sorted=True)


def dense_coefficients(values: Tensor, indices: Tensor, n_experts: int) -> Tensor:
    """The [..., N] expert coefficients `a`: zero except the selected entries (an expert selected
    twice in a row gets the sum of its values)."""
    a = values.new_zeros(*values.shape[:-1], n_experts)
    return a.scatter_add(-1, indices.long(), values)


def gather_combine(weight: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    a = dense_coefficients(values, indices, weight.shape[0])
    return torch.einsum("...n,no->...o", a, weight)


def mxd_decode(z: Tensor, decoder: Tensor, experts: Tensor, values: Tensor, indices: Tensor,
               bias: Optional[Tensor]) -> Tensor:
    a = dense_coefficients(values, indices, experts.shape[0])
    y = torch.einsum("...n,no->...o", a, experts) * torch.einsum("...h,ho->...o", z, decoder)
    return y if bias is None else y + bias


def layer_forward(module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(y, values, indices) of an mxd_fast.MxD or mxd_fast.TopKTranscoder in the dense form."""
    if hasattr(module, "experts"):   # MxD
        values, indices = topk_gate(x, module.gate.weight, module.gate.bias, module.k)
        y = mxd_decode(module.hidden(x), module.decoder, module.experts, values, indices, module.bias)
    else:                            # TopK transcoder
        values, indices = topk_gate(x, module.encoder.weight, module.encoder.bias, module.k)
        y = gather_combine(module.decoder, values, indices) + module.bias
    if module.skip is not None:
        y = y + module.skip(x)
    return y, values, indices


def mxd_forward(module, x: Tensor) -> Tensor:
    """A whole MxD layer (mxd_fast.MxD's parameters) in the paper's dense form."""
    return layer_forward(module, x)[0]
