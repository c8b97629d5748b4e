"""torch.func.vmap rules of the ops (without them torch loops over the batch with a warning).

When the weights are not batched and no weight gradient is asked for, the vmapped dimension is folded
into the leading (token) dimensions, which every op accepts: one call for the whole batch. This covers
the forward ops and, under jacrev or vmap(grad) with respect to the inputs, the backward ops. Otherwise
(batched weights, or weight gradients, which are per sample under vmap) the op runs once per sample, as
torch's fallback would."""
from __future__ import annotations

import torch


def _select(arg, dim, b):
    return arg if dim is None else arg.select(dim, b)


def _stack(outputs):
    if isinstance(outputs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outputs)), (0,) * len(outputs[0])
    return torch.stack(outputs), 0


def register(op_name: str, leading: tuple[int, ...], weights: tuple[int, ...], flags: tuple[int, ...] = (),
             weight_grads: tuple[int, ...] = ()) -> None:
    """leading: positions of the arguments with leading (token) dimensions; weights: positions of those
    that must be unbatched to fold. Backward ops: flags[i] is the position of the bool asking for output
    i (an unasked output is an empty placeholder); weight_grads: the outputs that are weight gradients."""
    op = getattr(torch.ops.mxd_fast, op_name).default

    def rule(info, in_dims, *args):
        size = info.batch_size
        if all(in_dims[i] is None for i in weights) and not any(args[flags[i]] for i in weight_grads):
            folded = list(args)
            for i in leading:
                arg, dim = args[i], in_dims[i]
                folded[i] = arg.movedim(dim, 0) if dim is not None else arg.expand(size, *arg.shape)
            output = op(*folded)
            if not flags:
                return output, ((0,) * len(output) if isinstance(output, tuple) else 0)
            return output, tuple(0 if args[flag] else None for flag in flags)
        if size == 0:
            raise ValueError(f"mxd_fast.{op_name}: vmap over an empty dimension needs unbatched weights "
                             f"and no weight gradient")
        return _stack([op(*(_select(a, d, b) for a, d in zip(args, in_dims))) for b in range(size)])

    torch.library.register_vmap(f"mxd_fast::{op_name}", rule)
