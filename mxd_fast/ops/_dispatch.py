"""Find the kernel of an op for a backend, by one naming convention:
Triton: mxd_fast.kernels.<op>.<op>_<direction>; CUDA: torch.ops.mxd_fast_cuda.<op>_<direction>."""
from __future__ import annotations

import functools
import importlib

import torch

from .. import _utils
from .. import backend as _backend


def kernel(op: str, direction: str, device: torch.device, torch_impl):
    name = _backend.resolve(op, device)
    if name == "torch":
        return torch_impl
    if name == "triton":
        module = importlib.import_module(f"mxd_fast.kernels.{op}")
        launch = getattr(module, f"{op}_{direction}")
        if device.type != "cuda":
            return launch
        return functools.partial(_on_device, launch, device)
    if name == "cuda":
        _utils.poisoning()   # spells MXD_FAST_POISON as the CUDA bindings read it
        return getattr(torch.ops.mxd_fast_cuda, f"{op}_{direction}")
    raise AssertionError(name)


def _on_device(launch, device: torch.device, *args, **kwargs):
    """Triton launches on the current CUDA device: make it the tensors' one (they may be on another)."""
    with torch.cuda.device(device):
        return launch(*args, **kwargs)
