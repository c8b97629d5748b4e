"""The foundation every layer may use: environment flags, output allocation, input validation and
shape helpers of the ops, and the small pieces of arithmetic more than one backend shares."""
from __future__ import annotations

import contextlib
import math
import os
import threading

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)

_state = threading.local()

_TRUE_WORDS, _FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """The boolean environment variable `name`: 1/0, true/false, yes/no or on/off (any case, surrounding
    whitespace ignored); `default` when unset or empty. Any other value raises ValueError."""
    raw = os.environ.get(name)
    value = "" if raw is None else raw.strip().lower()
    if not value:
        return default
    if value in _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    raise ValueError(f"environment variable {name} must be one of 1/0, true/false, yes/no, on/off "
                     f"(any case), got {raw!r}")


# ---- output allocation -------------------------------------------------------------------

def poisoning() -> bool:
    flag = getattr(_state, "poison", None)
    if flag is None:
        flag = env_flag("MXD_FAST_POISON", False)
        if os.environ.get("MXD_FAST_POISON", "0") not in ("0", "1"):
            os.environ["MXD_FAST_POISON"] = "1" if flag else "0"   # the CUDA bindings read only "1"
    return flag


@contextlib.contextmanager
def poison_outputs(flag: bool = True):
    """Fill every buffer a kernel allocates with NaN (or -1 for integers) before the kernel runs,
    so that an element the kernel forgets to write shows up in the tests. Also sets MXD_FAST_POISON
    for the block, which the CUDA extension's bindings read."""
    previous = getattr(_state, "poison", None)
    previous_env = os.environ.get("MXD_FAST_POISON")
    _state.poison = flag
    os.environ["MXD_FAST_POISON"] = "1" if flag else "0"
    try:
        yield
    finally:
        _state.poison = previous
        if previous_env is None:
            os.environ.pop("MXD_FAST_POISON", None)
        else:
            os.environ["MXD_FAST_POISON"] = previous_env


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, poisoned under poison_outputs()."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


# ---- validation --------------------------------------------------------------------------

def check_tensor(name: str, t, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor; pad it or "
                        f"concatenate its components")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_float(name: str, t: torch.Tensor, like: tuple[str, torch.Tensor] | None = None,
                mixed_dtypes: bool = False) -> None:
    """A floating tensor with the dtype (unless mixed_dtypes) and device of `like`."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if like is not None:
        other_name, other = like
        if t.dtype != other.dtype and not mixed_dtypes:
            raise TypeError(f"{name} has dtype {t.dtype} but {other_name} has dtype {other.dtype}; they must match")
        if mixed_dtypes and (t.dtype == torch.float64) != (other.dtype == torch.float64):
            raise TypeError(f"{name} has dtype {t.dtype} but {other_name} has dtype {other.dtype}; autocast "
                            f"leaves float64 as it is, so they must match")
        if t.device != other.device:
            raise ValueError(f"{name} is on {t.device} but {other_name} is on {other.device}; they must match")


def check_index(name: str, t: torch.Tensor, like: tuple[str, torch.Tensor]) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {t.dtype}")
    other_name, other = like
    if t.device != other.device:
        raise ValueError(f"{name} is on {t.device} but {other_name} is on {other.device}; they must match")


def check_k(k, n: int, n_name: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        if isinstance(k, torch.SymInt):
            return k
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= {n_name} = {n}, got k = {k}")
    return k


def check_index_range(name: str, indices: torch.Tensor, n: int, n_name: str) -> None:
    """Raise IndexError when an index lies outside [0, n). Reads the data: not for fake tensors.
    On CUDA this synchronises; see index_checks()."""
    if indices.numel() == 0:
        return
    lo, hi = torch.aminmax(indices)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= n:
        bad = lo if lo < 0 else hi
        raise IndexError(f"{name} contains {bad}, outside [0, {n_name} = {n})")


_checked_cuda_ops: set = set()


def index_checks() -> str:
    """MXD_FAST_CHECK_INDICES: "always", "first" (default: each op checks its first call on a CUDA
    device) or "never". CPU tensors are always checked. Kernels never read out of bounds either way:
    an out-of-range index that is not checked contributes zero."""
    mode = os.environ.get("MXD_FAST_CHECK_INDICES", "first")
    if mode not in ("always", "first", "never"):
        raise ValueError(f"environment variable MXD_FAST_CHECK_INDICES must be always, first or never, got {mode!r}")
    return mode


def maybe_check_index_range(op: str, name: str, indices: torch.Tensor, n: int, n_name: str) -> None:
    if indices.device.type == "cpu":
        check_index_range(name, indices, n, n_name)
        return
    mode = index_checks()
    if indices.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return   # a CUDA graph capture cannot read the data back (the kernels ignore out-of-range indices)
    if mode == "always" or (mode == "first" and op not in _checked_cuda_ops):
        check_index_range(name, indices, n, n_name)
        _checked_cuda_ops.add(op)


def placeholder(like: torch.Tensor) -> torch.Tensor:
    """What a backward op returns for a gradient nobody asked for: a fresh empty tensor each time
    (custom-op outputs must not alias one another)."""
    return like.new_empty(0)


_autocast_available: dict[str, bool] = {}   # device type -> whether torch.autocast applies to it (not meta)


def autocasting(t) -> bool:
    """True under torch.autocast for t's device: the op casts its floating inputs to one dtype, so
    mixed floating dtypes are fine until then (the checks allow them: mixed_dtypes=True)."""
    if not isinstance(t, torch.Tensor):
        return False
    kind = t.device.type
    available = _autocast_available.get(kind)
    if available is None:
        if torch.compiler.is_compiling():   # torch 2.11's dynamo cannot trace the availability query
            available = kind != "meta"
        else:
            available = _autocast_available.setdefault(kind, torch.amp.is_autocast_available(kind))
    return available and torch.is_autocast_enabled(kind)


def flatten_leading(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [prod(...), D] (a view where possible)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # not -1: the last dimension may be 0


def as_output(t: torch.Tensor, shape) -> torch.Tensor:
    """A backend's fresh contiguous output t ([B, ...] or any shape of as many elements) as a tensor of
    `shape`, without a copy and without being an autograd view: an op's output must take in-place edits
    under autograd, which refuses them on a view created inside a custom function. Nothing else refers
    to t's memory, so the result owns it."""
    if tuple(t.shape) != tuple(shape):
        t = t.contiguous().view(shape)
    return t.detach() if t._is_view() else t   # detach(): the same memory, no view relation for autograd


# ---- arithmetic shared by the backends ---------------------------------------------------

def relu_masked(grad_values: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The gradient of the selected gate logits: grad_values, zero where relu clipped the logit (values
    <= 0; a NaN passes, as through torch.relu). Every backend's gate backward starts from it."""
    return torch.where(values <= 0, torch.zeros((), dtype=grad_values.dtype, device=grad_values.device),
                       grad_values)


class Counters:
    """Named event counters that several threads may add to: snapshot() copies them, reset() zeroes them."""

    def __init__(self, keys):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(keys, 0)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._counts[key] += int(value)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            for key in self._counts:
                self._counts[key] = 0
