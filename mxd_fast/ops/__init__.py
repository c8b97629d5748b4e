"""The public ops, registered as torch.ops.mxd_fast.* (one module per op)."""
from .gather_combine import gather_combine
from .mxd_decode import mxd_decode
from .topk_gate import topk_gate

__all__ = ["gather_combine", "mxd_decode", "topk_gate"]
