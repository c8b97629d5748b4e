"""gather_combine(weight, values, indices) -> y[..., O] = sum_j values[..., j] * weight[indices[..., j]].

The sparse decoder of a TopK SAE or transcoder, and the (a C) term of MxD. Its weight gradient is a
K-sparse row update: no [B, N] intermediate is formed. This module holds the op's checks, its
registration and autograd; the backend table (_table.py) runs the backends.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._utils import (as_output, autocasting, check_float, check_index, check_tensor, flatten_leading,
                      maybe_check_index_range, placeholder)
from . import _autocast, _guards, _table, _vmap


def validate_selection(weight, values, indices, weight_name: str = "weight", mixed_dtypes: bool = False) -> None:
    """Checks shared by every op that reads `weight[indices]` scaled by `values`. mixed_dtypes: the
    floating inputs may differ in dtype (autocast casts them to one)."""
    check_tensor(weight_name, weight, ndim=2)
    check_tensor("values", values, min_ndim=1)
    check_tensor("indices", indices, min_ndim=1)
    check_float(weight_name, weight)
    check_float("values", values, like=(weight_name, weight), mixed_dtypes=mixed_dtypes)
    check_index("indices", indices, like=("values", values))
    if weight.shape[0] < 1:
        raise ValueError(f"{weight_name} must have at least one row (N >= 1) to select from, got shape "
                         f"{tuple(weight.shape)}")
    if values.shape != indices.shape:
        raise ValueError(f"values and indices must have the same shape, got {tuple(values.shape)} "
                         f"and {tuple(indices.shape)}")
    if values.shape[-1] < 1:
        raise ValueError("values and indices must select at least one expert (last dimension >= 1)")


def flat_selection(op: str, values: Tensor, indices: Tensor, n: int, weight_name: str):
    """[..., K] -> [B, K] values and int64 indices, checked against [0, n)."""
    k = values.shape[-1]
    indices = indices.reshape(-1, k)
    maybe_check_index_range(op, "indices", indices, n, f"{weight_name}.shape[0]")
    return values.reshape(-1, k), indices.to(torch.int64)


# ---- custom ops --------------------------------------------------------------------------

@torch.library.custom_op("mxd_fast::gather_combine", mutates_args=(), device_types=("cpu", "cuda"))
def _gather_combine_op(weight: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    validate_selection(weight, values, indices)
    v, i = flat_selection("gather_combine", values, indices, weight.shape[0], "weight")
    y = _table.run("gather_combine", "forward", weight.device, weight, v, i)
    return as_output(y, (*values.shape[:-1], weight.shape[1]))


@_gather_combine_op.register_fake
def _(weight, values, indices):
    validate_selection(weight, values, indices)
    return weight.new_empty(*values.shape[:-1], weight.shape[1])


@torch.library.custom_op("mxd_fast::gather_combine_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _gather_combine_backward_op(grad_y: Tensor, weight: Tensor, values: Tensor, indices: Tensor,
                                need_weight: bool, need_values: bool) -> tuple[Tensor, Tensor]:
    v, i = flat_selection("gather_combine", values, indices, weight.shape[0], "weight")
    dweight, dvalues = _table.run("gather_combine", "backward", weight.device, flatten_leading(grad_y), weight, v, i,
                                  need_weight, need_values, _backend.deterministic())
    return (dweight if need_weight else placeholder(weight),
            as_output(dvalues, values.shape) if need_values else placeholder(weight))


@_gather_combine_backward_op.register_fake
def _(grad_y, weight, values, indices, need_weight, need_values):
    return (weight.new_empty(weight.shape) if need_weight else placeholder(weight),
            values.new_empty(values.shape) if need_values else placeholder(weight))


def _setup_context(ctx, inputs, output):
    ctx.settings = _backend.settings()   # the backward pass runs with the forward's backend
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    weight, values, indices = ctx.saved_tensors
    need_weight, need_values = ctx.needs_input_grad[:2]
    if not (need_weight or need_values):
        return None, None, None
    with _backend.use_settings(ctx.settings):
        dweight, dvalues = torch.ops.mxd_fast.gather_combine_backward(grad_y, weight, values, indices,
                                                                      need_weight, need_values)
    return dweight if need_weight else None, dvalues if need_values else None, None


_gather_combine_op.register_autograd(_backward, setup_context=_setup_context)
_guards.register(_gather_combine_op, check=validate_selection)
_guards.register(_gather_combine_backward_op)
_autocast.register("gather_combine", check=validate_selection)
_autocast.register("gather_combine_backward", cast=False)
_vmap.register("gather_combine", leading=(1, 2), weights=(0,))
_vmap.register("gather_combine_backward", leading=(0, 2, 3), weights=(1,), flags=(4, 5), weight_grads=(0,))


def gather_combine(weight: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """y[..., :] = sum_j values[..., j] * weight[indices[..., j], :].

    weight: [N, O]; values: [..., K] (weight's dtype); indices: [..., K] int64 or int32 in [0, N).
    Differentiable in weight and values.
    """
    validate_selection(weight, values, indices, mixed_dtypes=autocasting(weight))
    return torch.ops.mxd_fast.gather_combine(weight, values, indices)
