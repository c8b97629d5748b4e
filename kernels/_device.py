"""Whether a launch is compiled for a GPU or run by the CPU interpreter, decided in one place: the
kernels pick their configurations from it. kernels/check_build.py sets a GPU target here so that the
GPU configurations compile (and nothing runs) on a machine without a GPU."""
from __future__ import annotations

import os

import torch

# (capability, multiprocessor count) of the GPU that CPU tensors are compiled for; None: interpreter.
compile_target: tuple[int, int] | None = None


def compiled(t: torch.Tensor) -> bool:
    """True where kernels on `t` are compiled for a GPU (rather than run by the interpreter)."""
    return t.is_cuda or compile_target is not None


def multiprocessor_count(t: torch.Tensor) -> int:
    if not t.is_cuda and compile_target is not None:
        return compile_target[1]
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def autotune_enabled() -> bool:
    """GPU launches autotune their configuration unless MXD_FAST_AUTOTUNE=0 (then each kernel takes its
    default configuration: no benchmarking of candidates, one compilation per launch signature)."""
    return os.environ.get("MXD_FAST_AUTOTUNE", "1") not in ("0", "false", "False")
