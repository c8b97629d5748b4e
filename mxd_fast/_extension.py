"""Loads the compiled extensions when they were built: mxd_fast._C_cuda (CUDA kernels)."""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def _load(name: str) -> str | None:
    """None when mxd_fast.<name> imported, else why not."""
    try:
        importlib.import_module(f"mxd_fast.{name}")
    except ImportError as e:
        return str(e)
    return None


def cuda_ops_loaded() -> bool:
    return _load("_C_cuda") is None


def cuda_load_error() -> str | None:
    return _load("_C_cuda")


@functools.lru_cache(maxsize=None)
def cuda_arch_list() -> str | None:
    """TORCH_CUDA_ARCH_LIST of the build of mxd_fast._C_cuda, when setup.py recorded it."""
    try:
        from . import _cuda_build
    except ImportError:
        return None
    return _cuda_build.ARCH_LIST
