"""The backend table, the one place that says which backend runs what: for each op, for each backend
(torch, triton, cuda), the functions that run its forward and backward and a `supports` predicate on
their actual arguments. Arguments a backend does not support run on the torch backend, which supports
everything. The dispatcher below picks the backend from the settings in force (mxd_fast.backend:
use_backend, MXD_FAST_BACKEND, "auto" with AUTO_PREFERENCE) and applies that fallback.

Every backend's function takes the kernel contract's arguments: flat [B, ...] tokens, already checked
by the op, with the argument names of the CUDA schemas in csrc/registration.cpp. The Triton kernels
and the CUDA ops are loaded on first use: `import mxd_fast` imports neither triton nor the extension.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import _utils
from .. import backend as _backend
from .._torch import gather_combine as torch_gather_combine
from .._torch import mxd_decode as torch_mxd_decode
from .._torch import topk_gate as torch_topk_gate

DIRECTIONS = ("forward", "backward")
# The backend that runs whatever another backend does not support.
FALLBACK = "torch"
# Why a backend cannot run an op it has no function for.
NO_KERNEL = {"triton": "there is no Triton kernel for {op}", "cuda": "the CUDA extension has no kernel for {op}"}


# ---- how the table names a function --------------------------------------------------------

@dataclass(frozen=True)
class TorchFunction:
    """A function of the torch backend (mxd_fast/_torch), imported with the table."""
    function: Callable

    def load(self) -> Callable:
        return self.function

    def missing(self, op: str) -> Optional[str]:
        return None


@dataclass(frozen=True)
class TritonFunction:
    """`name` of the Triton kernel module `module`, imported on first use (it imports triton)."""
    module: str
    name: str

    def load(self) -> Callable:
        return getattr(importlib.import_module(self.module), self.name)

    def missing(self, op: str) -> Optional[str]:
        return None if importlib.util.find_spec(self.module) is not None else NO_KERNEL["triton"].format(op=op)


@dataclass(frozen=True)
class CudaOp:
    """torch.ops.mxd_fast_cuda.<name>, registered (by csrc/registration.cpp) when mxd_fast._C_cuda loads."""
    name: str

    def load(self) -> Callable:
        return getattr(torch.ops.mxd_fast_cuda, self.name)

    def missing(self, op: str) -> Optional[str]:
        return None if hasattr(torch.ops.mxd_fast_cuda, self.name) else NO_KERNEL["cuda"].format(op=op)


def supports_everything(*args) -> bool:
    return True


@dataclass(frozen=True)
class Entry:
    """One backend's implementation of one op."""
    forward: TorchFunction | TritonFunction | CudaOp
    backward: TorchFunction | TritonFunction | CudaOp
    supports_forward: Callable[..., bool] = supports_everything
    supports_backward: Callable[..., bool] = supports_everything

    def function(self, direction: str) -> Callable:
        """The function that runs `direction` ("forward" or "backward"), loaded."""
        return self._ref(direction).load()

    def supports(self, direction: str, args: tuple) -> bool:
        """Whether this backend runs `direction` on these arguments (else the torch backend does)."""
        self._ref(direction)
        check = self.supports_forward if direction == "forward" else self.supports_backward
        return check(*args)

    def missing(self, op: str) -> Optional[str]:
        """Why this backend has no implementation of `op` here (None: it has)."""
        return self.forward.missing(op) or self.backward.missing(op)

    def _ref(self, direction: str):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return self.forward if direction == "forward" else self.backward


# ---- what the Triton kernels support -------------------------------------------------------

def triton_topk_gate_forward_supports(x, weight, bias, k) -> bool:
    """The fused gate keeps its running top-k in registers (k <= MAX_K) and expert indices in 32 bits
    (N <= MAX_N), in float32 arithmetic: float64 is the torch backend's."""
    from mxd_fast.kernels import topk_gate as kernel

    return x.dtype != torch.float64 and k <= kernel.MAX_K and weight.shape[0] <= kernel.MAX_N


def triton_mxd_decode_forward_supports(z, decoder, experts, values, indices, bias) -> bool:
    """Not float64 (tl.dot in float32), and in-tile offsets that fit the kernel's 32 bits."""
    from mxd_fast.kernels import mxd_decode as kernel

    return z.dtype != torch.float64 and kernel.forward_offsets_fit(z, decoder, experts, values, indices)


def triton_mxd_decode_backward_supports(grad_y, z, decoder, experts, values, indices, need_z, need_decoder,
                                        need_experts, need_values, need_bias, deterministic) -> bool:
    from mxd_fast.kernels import mxd_decode as kernel

    return z.dtype != torch.float64 and kernel.backward_offsets_fit(grad_y, z, decoder, experts, values, indices,
                                                                    need_experts or need_values)


# ---- the table -------------------------------------------------------------------------------

TABLE: dict[str, dict[str, Entry]] = {
    "topk_gate": {
        "torch": Entry(TorchFunction(torch_topk_gate.topk_gate_torch_forward),
                       TorchFunction(torch_topk_gate.topk_gate_torch_backward)),
        "triton": Entry(TritonFunction("mxd_fast.kernels.topk_gate", "topk_gate_forward"),
                        TritonFunction("mxd_fast.kernels.topk_gate", "topk_gate_backward"),
                        supports_forward=triton_topk_gate_forward_supports),
        "cuda": Entry(CudaOp("topk_gate_forward"), CudaOp("topk_gate_backward")),
    },
    "gather_combine": {
        "torch": Entry(TorchFunction(torch_gather_combine.gather_combine_torch_forward),
                       TorchFunction(torch_gather_combine.gather_combine_torch_backward)),
        "triton": Entry(TritonFunction("mxd_fast.kernels.gather_combine", "gather_combine_forward"),
                        TritonFunction("mxd_fast.kernels.gather_combine", "gather_combine_backward")),
        "cuda": Entry(CudaOp("gather_combine_forward"), CudaOp("gather_combine_backward")),
    },
    "mxd_decode": {
        "torch": Entry(TorchFunction(torch_mxd_decode.mxd_decode_torch_forward),
                       TorchFunction(torch_mxd_decode.mxd_decode_torch_backward)),
        "triton": Entry(TritonFunction("mxd_fast.kernels.mxd_decode", "mxd_decode_forward"),
                        TritonFunction("mxd_fast.kernels.mxd_decode", "mxd_decode_backward"),
                        supports_forward=triton_mxd_decode_forward_supports,
                        supports_backward=triton_mxd_decode_backward_supports),
        "cuda": Entry(CudaOp("mxd_decode_forward"), CudaOp("mxd_decode_backward")),
    },
}

# ---- the dispatcher ----------------------------------------------------------------------------

def unavailable_reason(name: str, device: torch.device, op: Optional[str] = None) -> Optional[str]:
    """None when backend `name` can run on tensors of `device` (and has an implementation of `op`, if
    given), else why not."""
    reason = _backend.unavailable_reason(name, device)
    if reason is not None or op is None or name == FALLBACK:
        return reason
    entry = TABLE[op].get(name)
    if entry is None:
        return NO_KERNEL[name].format(op=op)
    return entry.missing(op)


def resolve(op: str, device: torch.device) -> str:
    """The concrete backend that runs `op` on tensors of `device`: the one in force, or under "auto" on
    CUDA tensors the first of AUTO_PREFERENCE[op] that can run it (torch elsewhere and for an op
    without a preference). A named backend that cannot run it raises BackendUnavailableError."""
    name = _backend.get_backend()
    if name == "auto":
        if device.type != "cuda":
            return FALLBACK
        for candidate in _backend.AUTO_PREFERENCE.get(op, ()):
            if unavailable_reason(candidate, device, op) is None:
                return candidate
        return FALLBACK
    reason = unavailable_reason(name, device, op)
    if reason is not None:
        raise _backend.BackendUnavailableError(f"mxd_fast backend {name!r} cannot run {op}: {reason}")
    return name


def implementation(op: str, direction: str, device: torch.device, args: Optional[tuple] = None) -> Callable:
    """The function that runs `direction` of `op` on tensors of `device` under the settings in force;
    given the call's arguments `args`, the torch backend's where the chosen backend does not support
    them."""
    name = resolve(op, device)
    entry = TABLE[op][name]
    if args is not None and not entry.supports(direction, args):
        name, entry = FALLBACK, TABLE[op][FALLBACK]
    function = entry.function(direction)
    if name == "triton" and device.type == "cuda":
        return functools.partial(_on_device, function, device)
    if name == "cuda":
        _utils.poisoning()   # spells MXD_FAST_POISON as the CUDA bindings read it
    return function


def run(op: str, direction: str, device: torch.device, *args):
    """Run `direction` of `op` on its flat arguments with the backend the settings and the table pick."""
    return implementation(op, direction, device, args)(*args)


def _on_device(launch, device: torch.device, *args):
    """Triton launches on the current CUDA device: make it the tensors' one (they may be on another)."""
    with torch.cuda.device(device):
        return launch(*args)
