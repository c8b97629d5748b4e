"""Loads the compiled extensions when they were built: mxd_fast._C_cuda (CUDA kernels)."""
from __future__ import annotations

import functools
import hashlib
import importlib
from pathlib import Path

_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


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


def csrc_digest(csrc: Path) -> str | None:
    """SHA-256 of the CUDA extension's sources (every .cpp/.h/.cu/.cuh under csrc, names and contents),
    or None without csrc. setup.py records it in the build; a source checkout compares against it."""
    files = sorted(p for p in Path(csrc).rglob("*") if p.suffix in _SOURCE_SUFFIXES)
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(csrc).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def cuda_build_is_stale() -> bool | None:
    """Whether csrc/ of a source checkout has changed since mxd_fast._C_cuda was built from it (an
    editable install that was not rebuilt); None when unknown (no checkout or no record)."""
    try:
        from . import _cuda_build
    except ImportError:
        return None
    built = getattr(_cuda_build, "SOURCE_SHA256", None)
    now = csrc_digest(Path(__file__).resolve().parents[1] / "csrc")
    if built is None or now is None:
        return None
    return built != now
