"""Backend settings of the mxd_fast ops, and whether each backend can run on a device.

`with use_backend("triton"): ...` or the environment variable MXD_FAST_BACKEND picks the
implementation behind every op: "auto" (default), "torch", "triton" or "cuda". The backend table
(mxd_fast/ops/_table.py) says which function each backend runs and dispatches by these settings.

A block's setting holds in its own thread (the innermost of its active blocks) and, for threads that
have none of their own, process-wide: there the most recently entered block still active in any thread
holds; once every block has exited, none does. Each op's forward also records the settings in force
for its backward pass, so that an eager backward (which autograd runs on its own device thread for
CUDA tensors) runs on the forward's backend and determinism wherever it is called from.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading

import torch

from ._utils import env_flag

BACKENDS = ("auto", "torch", "triton", "cuda")

# Which backend "auto" prefers per op on CUDA tensors, fastest first; an entry that is not available
# is skipped, and an op not listed runs on the torch backend. Measured on an H200 (bf16,
# bench/results/2026-11-30-h200/): the CUDA kernels were the fastest in every forward row (topk_gate at
# the paper's shapes up to 8192 tokens and K = 32 or 128, but one case where Triton led by 8%;
# gather_combine and mxd_decode always), then Triton, then the torch backend.
AUTO_PREFERENCE = {
    "topk_gate": ("cuda", "triton", "torch"),
    "gather_combine": ("cuda", "triton", "torch"),
    "mxd_decode": ("cuda", "triton", "torch"),
}

# Per thread, per setting ("name", "deterministic"): the thread's active entries, innermost last.
_state = threading.local()
# The process-wide entries of the active blocks of all threads, in the order entered: threads without a
# setting of their own see the last.
_shared: dict = {"name": [], "deterministic": []}
_shared_lock = threading.Lock()


class _Entry:
    """One active block's setting; removed by identity when its block exits."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run on the given tensors."""


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend in force: the innermost use_backend(), else MXD_FAST_BACKEND, else "auto"."""
    name = _current("name")
    if name is not None:
        return name
    env = os.environ.get("MXD_FAST_BACKEND", "auto")
    try:
        return _check_name(env)
    except ValueError:
        raise ValueError(f"environment variable MXD_FAST_BACKEND must be one of {BACKENDS}, got {env!r}") from None


@contextlib.contextmanager
def use_backend(name: str):
    """Run the mxd_fast ops inside the block with backend `name`."""
    name = _check_name(name)
    with _setting("name", name):
        yield


def _current(key: str):
    """The calling thread's innermost setting `key`, else the process-wide one, else None."""
    own = getattr(_state, key, None)
    if own:
        return own[-1].value
    with _shared_lock:
        shared = _shared[key]
        return shared[-1].value if shared else None


@contextlib.contextmanager
def _setting(key: str, value, process_wide: bool = True):
    """Setting `key` is `value` in the block: in this thread, and (process_wide) for threads without
    their own. Blocks may exit in any order: each removes exactly its own entry."""
    entry = _Entry(value)
    own = getattr(_state, key, None)
    if own is None:
        own = []
        setattr(_state, key, own)
    own.append(entry)
    if process_wide:
        with _shared_lock:
            _shared[key].append(entry)
    try:
        yield
    finally:
        own.remove(entry)
        if process_wide:
            with _shared_lock:
                _shared[key].remove(entry)


def deterministic() -> bool:
    """Backward passes use the deterministic (atomics-free) kernels unless MXD_FAST_DETERMINISTIC=0
    or use_deterministic(False) says otherwise; always under torch.use_deterministic_algorithms(True)."""
    if torch.are_deterministic_algorithms_enabled():
        return True
    flag = _current("deterministic")
    if flag is not None:
        return flag
    return env_flag("MXD_FAST_DETERMINISTIC", True)


@contextlib.contextmanager
def use_deterministic(flag: bool = True):
    if not isinstance(flag, bool):
        raise TypeError(f"flag must be a bool, got {type(flag).__name__}")
    with _setting("deterministic", flag):
        yield


def settings() -> tuple[str, bool]:
    """The backend and determinism in force: what an op's forward records for its backward pass."""
    return get_backend(), deterministic()


@contextlib.contextmanager
def use_settings(recorded: tuple[str, bool]):
    """Run the block with settings() recorded earlier (an op's backward pass, on whatever thread), in
    this thread only: other threads do not see a backward pass's settings."""
    name, flag = recorded
    with _setting("name", _check_name(name), process_wide=False):
        with _setting("deterministic", bool(flag), process_wide=False):
            yield


def _triton_interprets() -> bool:
    """False when triton, already imported, decorated its functions for compiling (TRITON_INTERPRET is
    read when a function is decorated)."""
    if "triton" not in sys.modules:
        return True
    try:
        from triton.language.standard import sigmoid
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:       # another layout of triton: assume it interprets
        return True
    return isinstance(sigmoid, InterpretedFunction)


def _triton_status(device: torch.device) -> str | None:
    """None when Triton kernels can run on `device`, else the reason they cannot."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return ("Triton kernels on CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
                    "before triton is imported")
        if not _triton_interprets():
            return ("TRITON_INTERPRET=1 was set after triton was imported, so Triton compiles instead of "
                    "interpreting: set it before anything imports triton")
    elif device.type != "cuda":
        return f"Triton kernels do not run on device type {device.type!r}"
    elif (capability := torch.cuda.get_device_capability(device)) < TRITON_MIN_CAPABILITY:
        return (f"the Triton kernels need compute capability {TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]} "
                f"or newer, {device} has {capability[0]}.{capability[1]}")
    return None


def archs_cover(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a build for TORCH_CUDA_ARCH_LIST `arch_list` ("8.0;9.0a", "7.5 8.6+PTX") has code that runs
    on a GPU of compute capability `capability`: machine code of the same major and a minor not above it,
    exactly that of an arch-specific ("a") target, or PTX of an older or equal one."""
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        item = item.removesuffix("+PTX")
        specific = item.endswith("a")
        major, _, minor = item.rstrip("a").partition(".")
        arch = (int(major), int(minor or 0))
        if arch == capability or (not specific and arch[0] == capability[0] and arch[1] <= capability[1]):
            return True
        if ptx and arch <= capability:
            return True
    return False


# Oldest GPU the Triton kernels run on: their dot products take bf16 operands.
TRITON_MIN_CAPABILITY = (8, 0)


def _cuda_status(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got device {str(device)!r}"
    from . import _extension

    if not _extension.cuda_ops_loaded():
        return "the CUDA extension of mxd_fast is not built (install on a machine whose torch has CUDA)"
    archs = _extension.cuda_arch_list()
    capability = torch.cuda.get_device_capability(device)
    if archs is not None and not archs_cover(archs, capability):
        return (f"the CUDA extension was built for TORCH_CUDA_ARCH_LIST={archs!r}, which has no code for compute "
                f"capability {capability[0]}.{capability[1]} of {device}; reinstall with that architecture in the list")
    return None


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run on tensors of `device`, else why not. Whether it implements a
    given op is the backend table's to say (mxd_fast/ops/_table.py: unavailable_reason with an op)."""
    if name == "torch":
        return None
    if name == "triton":
        return _triton_status(device)
    if name == "cuda":
        return _cuda_status(device)
    raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {name!r}")


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device) is None]
