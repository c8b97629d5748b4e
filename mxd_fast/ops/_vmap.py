"""torch.func.vmap rules of the ops (without them torch loops over the batch with a warning).

A forward op whose weights are not batched folds the vmapped dimension into its inputs' leading
dimensions, which every op accepts: one call for the whole batch. Otherwise (batched weights, and the
backward ops, whose weight gradients are per sample under vmap(grad)) the rule calls the op once per
sample, as torch's fallback would."""
from __future__ import annotations

import torch


def _select(arg, dim, b):
    return arg if dim is None else arg.select(dim, b)


def _stack(outputs):
    if isinstance(outputs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outputs)), (0,) * len(outputs[0])
    return torch.stack(outputs), 0


def register(op_name: str, leading: tuple[int, ...] = (), weights: tuple[int, ...] = ()) -> None:
    """leading: positions of the arguments with leading (token) dimensions; weights: positions of those
    that must be unbatched to fold. A backward op passes neither: it always loops."""
    op = getattr(torch.ops.mxd_fast, op_name).default

    def rule(info, in_dims, *args):
        size = info.batch_size
        if leading and all(in_dims[i] is None for i in weights):
            folded = list(args)
            for i in leading:
                arg, dim = args[i], in_dims[i]
                folded[i] = arg.movedim(dim, 0) if dim is not None else arg.expand(size, *arg.shape)
            output = op(*folded)
            return output, ((0,) * len(output) if isinstance(output, tuple) else 0)
        if size == 0:
            raise ValueError(f"mxd_fast.{op_name}: vmap over an empty dimension needs unbatched weights")
        return _stack([op(*(_select(a, d, b) for a, d in zip(args, in_dims))) for b in range(size)])

    torch.library.register_vmap(f"mxd_fast::{op_name}", rule)
