"""The public ops, registered as torch.ops.mxd_fast.*: one module per op (topk_gate, gather_combine,
mxd_decode), each holding its checks, custom-op registration and autograd. _table.py is the backend
table: which backend (torch in mxd_fast/_torch, Triton in mxd_fast.kernels, CUDA in mxd_fast._C_cuda)
runs what, and the dispatcher that picks one."""
from . import gather_combine, mxd_decode, topk_gate  # noqa: F401  (registers the ops)
