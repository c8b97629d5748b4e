"""The public ops, registered as torch.ops.mxd_fast.*: one module per op (topk_gate, gather_combine,
mxd_decode), each holding its validation, custom-op registration, autograd and torch backend."""
from . import gather_combine, mxd_decode, topk_gate  # noqa: F401  (registers the ops)
