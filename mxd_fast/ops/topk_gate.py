"""topk_gate(x, weight, bias, k) -> (values, indices).

values = the k largest entries of relu(x @ weight.T + bias), sorted descending; indices (int64) are
the experts they belong to. No backend forms the [B, N] logits of the whole batch. This module holds
the op's checks, its registration and autograd; the backend table (_table.py) runs the backends.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from .._utils import as_output, autocasting, check_float, check_k, check_tensor, flatten_leading, placeholder
from . import _autocast, _guards, _table, _vmap


def _validate(x, weight, bias, k, mixed_dtypes: bool = False):
    """mixed_dtypes: the floating inputs may differ in dtype (autocast casts them to one)."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_float("x", x)
    check_float("weight", weight, like=("x", x), mixed_dtypes=mixed_dtypes)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape [N, {x.shape[-1]}] to match x's last dimension, "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_float("bias", bias, like=("x", x), mixed_dtypes=mixed_dtypes)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (N), got {tuple(bias.shape)}")
    check_k(k, weight.shape[0], "N")


# ---- custom ops --------------------------------------------------------------------------

@torch.library.custom_op("mxd_fast::topk_gate", mutates_args=(), device_types=("cpu", "cuda"))
def _topk_gate_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> tuple[Tensor, Tensor]:
    _validate(x, weight, bias, k)
    values, indices = _table.run("topk_gate", "forward", x.device, flatten_leading(x), weight, bias, k)
    shape = (*x.shape[:-1], k)
    return as_output(values, shape), as_output(indices, shape)


@_topk_gate_op.register_fake
def _(x, weight, bias, k):
    _validate(x, weight, bias, k)
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("mxd_fast::topk_gate_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _topk_gate_backward_op(grad_values: Tensor, x: Tensor, weight: Tensor, values: Tensor, indices: Tensor,
                           need_x: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    k = values.shape[-1]
    dx, dweight, dbias = _table.run("topk_gate", "backward", x.device, grad_values.reshape(-1, k),
                                    flatten_leading(x), weight, values.reshape(-1, k), indices.reshape(-1, k),
                                    need_x, need_weight, need_bias, _backend.deterministic())
    return (as_output(dx, x.shape) if need_x else placeholder(x),
            dweight if need_weight else placeholder(x),
            dbias if need_bias else placeholder(x))


@_topk_gate_backward_op.register_fake
def _(grad_values, x, weight, values, indices, need_x, need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else placeholder(x),
            weight.new_empty(weight.shape) if need_weight else placeholder(x),
            weight.new_empty(weight.shape[0]) if need_bias else placeholder(x))


def _setup_context(ctx, inputs, output):
    ctx.settings = _backend.settings()   # the backward pass runs with the forward's backend
    x, weight, bias, k = inputs
    values, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.has_bias = bias is not None
    # The backward reads values for the relu mask: a copy of its own, so that the caller may edit the
    # output in place (indices are saved as they are: editing them in place is refused by autograd).
    ctx.save_for_backward(x, weight, values.clone(), indices)


def _backward(ctx, grad_values, grad_indices):
    x, weight, values, indices = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    if not (need_x or need_weight or need_bias):
        return None, None, None, None
    with _backend.use_settings(ctx.settings):
        dx, dweight, dbias = torch.ops.mxd_fast.topk_gate_backward(
            grad_values, x, weight, values, indices, need_x, need_weight, need_bias)
    return (dx if need_x else None, dweight if need_weight else None, dbias if need_bias else None, None)


_topk_gate_op.register_autograd(_backward, setup_context=_setup_context)
_guards.register(_topk_gate_op, check=_validate)
_guards.register(_topk_gate_backward_op)
_autocast.register("topk_gate", check=_validate)
_autocast.register("topk_gate_backward", cast=False)
_vmap.register("topk_gate", leading=(0,), weights=(1, 2))
_vmap.register("topk_gate_backward", leading=(0, 1, 3, 4), weights=(2,), flags=(5, 6, 7),
               weight_grads=(1, 2))


def topk_gate(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of relu(x @ weight.T + bias) per row of x, sorted descending.

    x: [..., I]; weight: [N, I]; bias: [N] or None; 1 <= k <= N.
    Returns values [..., k] in x's dtype and indices [..., k] (int64). Between equal values any of
    the tied experts may be chosen. Differentiable in x, weight and bias through values.
    """
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        k = int(k)  # numpy integers too
    _validate(x, weight, bias, k, mixed_dtypes=autocasting(x))
    return torch.ops.mxd_fast.topk_gate(x, weight, bias, k)
