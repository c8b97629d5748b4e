"""Torch backend of gather_combine: an embedding bag forward; a K-sparse row scatter (dweight) and
gathered dot products (dvalues) backward, both over the selections grouped by row on the CPU.
Selections outside [0, N) contribute zero."""
from __future__ import annotations

from torch import Tensor

from . import sparse


def gather_combine_torch_forward(weight: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    if weight.device.type == "cpu":
        try:   # ATen's CPU embedding bag checks every index: in range (as the op checks there), nothing to mask
            return sparse.gather_combine(weight, values, indices)
        except RuntimeError:
            pass
    values, indices, _ = sparse.in_range(values, indices, weight.shape[0])
    return sparse.gather_combine(weight, values, indices)


def gather_combine_torch_backward(grad_y, weight, values, indices, need_weight: bool, need_values: bool,
                                  deterministic: bool):
    n = weight.shape[0]
    # on the CPU both products work on the selections grouped by row: group them once (the grouping also
    # shows whether every index is in range)
    grouped = grad_y.device.type == "cpu" and indices.numel() > 0
    rows = sparse.row_groups(indices, n) if grouped else None
    valid = None
    if rows is None:
        values, indices, valid = sparse.in_range(values, indices, n)
        rows = sparse.row_groups(indices, n) if grouped else None
    dweight = sparse.scatter_rows(indices, values, grad_y, n, deterministic, rows=rows) if need_weight else None
    dvalues = sparse.gathered_dot(weight, indices, grad_y, rows=rows) if need_values else None
    if dvalues is not None and valid is not None and valid.dim() > 0:   # (a scalar True: every index in range)
        dvalues = dvalues.where(valid, 0)
    return dweight, dvalues
