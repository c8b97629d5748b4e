"""Keep freed CPU memory for reuse (glibc on Linux).

glibc's malloc serves every allocation above its mmap threshold (32 MiB at most, by default) with fresh
pages from the kernel and returns them on free. A training step on the CPU allocates and frees tensors of
that size every step (the dense [N, O] gradient of the experts is 66 MB at GPT-2's shape), so every step
pays the page faults of first touching them again. Raising the mmap and trim thresholds keeps freed blocks
in the heap, where the next step's allocation of the same size finds them.

The setting is process-wide and lasts until the process ends; the process then keeps its peak memory
(freed memory is not returned to the system). Whether a freed block serves the next request is glibc's
choice: tests/test_cpu_memory.py checks the pattern of a training step (its page faults drop 8-fold).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Optional

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3    # mallopt parameters (malloc.h)
THRESHOLD = 1 << 30                               # allocations above 1 GiB still go to mmap


def _libc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def reuse_freed_memory() -> bool:
    """Make this process's malloc keep freed blocks of up to 1 GiB for reuse instead of returning them to the
    system (module docstring). Returns whether it applied: True with glibc on Linux, False elsewhere (musl,
    macOS, Windows), where nothing changes."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
