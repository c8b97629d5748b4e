"""mxd_fast: fast, memory-lean kernels and ops for Mixture of Decoders (MxD) layers."""
import torch as _torch

from ._version import MIN_TORCH as _MIN_TORCH

if tuple(int(p) for p in _torch.__version__.split("+")[0].split(".")[:2]) < tuple(map(int, _MIN_TORCH.split("."))):
    raise ImportError(f"mxd_fast needs torch >= {_MIN_TORCH}, found torch {_torch.__version__}: "
                      f"pip install 'torch>={_MIN_TORCH}'")

from . import reference  # noqa: E402  (after the version check: the ops register with torch.library)
from .cpu_memory import reuse_freed_memory
from .backend import BackendUnavailableError, available_backends, get_backend, use_backend, use_deterministic
from .hooks import Coefficients, HookPoint, steer
from .hub import load_pretrained
from .module import MxD, TopKGate, mxd_experts_for_budget
from .ops.gather_combine import gather_combine
from .ops.mxd_decode import mxd_decode
from .ops.topk_gate import topk_gate
from .transcoder import TopKTranscoder

from ._version import __version__

__all__ = [
    "BackendUnavailableError",
    "Coefficients",
    "HookPoint",
    "MxD",
    "TopKGate",
    "TopKTranscoder",
    "available_backends",
    "gather_combine",
    "get_backend",
    "load_pretrained",
    "mxd_decode",
    "mxd_experts_for_budget",
    "reference",
    "reuse_freed_memory",
    "steer",
    "topk_gate",
    "use_backend",
    "use_deterministic",
]
