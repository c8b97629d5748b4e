"""Whether a launch is compiled for a GPU or run by the CPU interpreter, decided in one place: the
kernels pick their configurations from it. kernels/check_build.py sets a GPU target here so that the
GPU configurations compile (and nothing runs) on a machine without a GPU."""
from __future__ import annotations

import os

import torch

from mxd_fast._utils import env_flag

# Compile options of every launch: FMA contraction stated rather than left to Triton's default, which
# Triton 3.10 turns off (3.9 warns at each first launch while TRITON_DEFAULT_FP_FUSION is unset).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# (capability, multiprocessor count) of the GPU that CPU tensors are compiled for; None: interpreter.
compile_target: tuple[int, int] | None = None


def compiled(t: torch.Tensor) -> bool:
    """True where kernels on `t` are compiled for a GPU (rather than run by the interpreter)."""
    return t.is_cuda or compile_target is not None


def multiprocessor_count(t: torch.Tensor) -> int:
    if not t.is_cuda and compile_target is not None:
        return compile_target[1]
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def capability(t: torch.Tensor) -> int:
    """Compute capability (major * 10 + minor) of the GPU that kernels on `t` compile for."""
    if not t.is_cuda:
        return compile_target[0] if compile_target is not None else 90
    major, minor = torch.cuda.get_device_capability(t.device)
    return major * 10 + minor


# Largest shared memory per block (opt-in) by compute capability, where the device cannot be asked.
SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def shared_memory_limit(t: torch.Tensor) -> int:
    """Bytes of shared memory one program may use on the GPU that kernels on `t` compile for."""
    if not t.is_cuda:
        capability = compile_target[0] if compile_target is not None else 90
        return SHARED_MEMORY.get(capability, 99 * 1024)
    props = torch.cuda.get_device_properties(t.device)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    return int(limit) if limit else SHARED_MEMORY.get(props.major * 10 + props.minor, 99 * 1024)


def tf32_allowed() -> bool:
    """Whether torch lets fp32 CUDA matmuls use TF32. Read through torch.backends.cuda.matmul.fp32_precision,
    which reflects both APIs: the legacy readers (allow_tf32, get_float32_matmul_precision) raise once the
    new one has been used to set it."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is None:   # torch releases before the fp32_precision API
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return precision == "tf32"


def autotune_enabled() -> bool:
    """GPU launches autotune their configuration unless MXD_FAST_AUTOTUNE=0 (then each kernel takes its
    default configuration: no benchmarking of candidates, one compilation per launch signature)."""
    return env_flag("MXD_FAST_AUTOTUNE", True)
