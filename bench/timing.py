"""Timers, peak-memory probes, the run's ceilings and the machine description.

GPU: one pair of CUDA events around every call, after a warm-up; the medians are over calls.
CPU: time.perf_counter around every call (the ops are synchronous there); the providers of one case
take turns call by call (time_interleaved), so that the load of a shared machine hits them alike.
Peak memory of one call (the extra memory the call needs above what was allocated before it):
GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated()
before the call (method "cuda-max-allocated"). CPU: growth of the process's resident set, peak
(VmHWM, reset through /proc/self/clear_refs) minus the resident set before the call (method
"rss-hwm-growth"); where the kernel does not allow the reset, a thread samples VmRSS every 0.5 ms
("rss-sampled"). Resident-set growth undercounts memory the allocator reuses without returning it
to the system (small blocks); large tensors are mapped and unmapped, so they show.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import re
import subprocess
import threading
import time
from typing import Any, Callable

import torch


def quantile(samples: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
    xs = sorted(samples)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclasses.dataclass
class TimingConfig:
    warmup_calls: int = 1          # at least this many untimed calls
    warmup_time: float = 0.0       # ... and keep warming up this long (seconds)
    min_reps: int = 3
    max_reps: int = 100
    target_time: float = 1.0       # stop timing once this much has been measured (and min_reps done)

    @classmethod
    def for_device(cls, device: torch.device, quick: bool) -> "TimingConfig":
        if device.type == "cuda":
            return cls(warmup_calls=3, warmup_time=0.05, min_reps=10, max_reps=1000,
                       target_time=0.1 if quick else 0.3)
        if quick:
            return cls(warmup_calls=1, warmup_time=0.0, min_reps=2, max_reps=10, target_time=0.2)
        return cls(warmup_calls=1, warmup_time=0.0, min_reps=3, max_reps=50, target_time=1.0)


@dataclasses.dataclass
class Timing:
    median: float
    p20: float
    p80: float
    reps: int
    samples: list[float]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[Any], Any], inputs: list, device: torch.device, cfg: TimingConfig) -> Timing:
    """Time fn(inputs[i % len(inputs)]) per call; inputs rotate so caches hold no previous call's data."""
    n = len(inputs)
    i = 0
    sync(device)
    start = time.perf_counter()
    warm: list[float] = []
    while i < cfg.warmup_calls or time.perf_counter() - start < cfg.warmup_time:
        t0 = time.perf_counter()
        out = fn(inputs[i % n])
        del out
        sync(device)
        warm.append(time.perf_counter() - t0)
        i += 1
    # the first call may compile or autotune: estimate the cost of a call from the later ones
    per_call = quantile(warm[1:] or warm, 0.5)
    samples: list[float] = []
    if device.type == "cuda":
        reps = int(min(cfg.max_reps, max(cfg.min_reps, cfg.target_time / max(per_call, 1e-6))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for r, (ev0, ev1) in enumerate(events):
            ev0.record()
            out = fn(inputs[(i + r) % n])
            ev1.record()
            del out
        torch.cuda.synchronize(device)
        samples = [ev0.elapsed_time(ev1) * 1e-3 for ev0, ev1 in events]
    else:
        total = 0.0
        r = 0
        while r < cfg.max_reps and (r < cfg.min_reps or total < cfg.target_time):
            t0 = time.perf_counter()
            out = fn(inputs[(i + r) % n])
            t1 = time.perf_counter()
            del out
            samples.append(t1 - t0)
            total += t1 - t0
            r += 1
    return Timing(median=quantile(samples, 0.5), p20=quantile(samples, 0.2), p80=quantile(samples, 0.8),
                  reps=len(samples), samples=samples)


def time_interleaved(fns: list[Callable[[Any], Any]], inputs: list, cfg: TimingConfig) -> list:
    """CPU: time several providers of one case in turns (A B C A B C ...) on the same inputs, so that a
    change of machine load during the run hits every provider alike. Each provider stops once it has
    its own min_reps and target_time. Returns a Timing per fn, or the exception that fn raised."""
    n = len(inputs)
    results: list = [None] * len(fns)
    samples: list[list[float]] = [[] for _ in fns]
    for k, fn in enumerate(fns):   # warm-up, in turn as well
        try:
            start, i = time.perf_counter(), 0
            while i < cfg.warmup_calls or time.perf_counter() - start < cfg.warmup_time:
                out = fn(inputs[i % n])
                del out
                i += 1
        except Exception as e:  # noqa: BLE001 - reported in the provider's row
            results[k] = e
    active = [k for k in range(len(fns)) if results[k] is None]
    r = 0
    while active:
        for k in list(active):
            try:
                t0 = time.perf_counter()
                out = fns[k](inputs[r % n])
                t1 = time.perf_counter()
                del out
            except Exception as e:  # noqa: BLE001
                results[k] = e
                active.remove(k)
                continue
            samples[k].append(t1 - t0)
            done = len(samples[k])
            if done >= cfg.max_reps or (done >= cfg.min_reps and sum(samples[k]) >= cfg.target_time):
                active.remove(k)
        r += 1
    for k, xs in enumerate(samples):
        if results[k] is None:
            results[k] = Timing(median=quantile(xs, 0.5), p20=quantile(xs, 0.2), p80=quantile(xs, 0.8),
                                reps=len(xs), samples=xs)
    return results


# ---- peak memory ------------------------------------------------------------------------------

def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> bool:
    """Give the C allocator's free memory back to the system, so that the next call's allocations
    show up as resident-set growth (glibc keeps freed blocks and reuses them without a page fault)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def peak_memory(fn: Callable[[Any], Any], inp: Any, device: torch.device) -> tuple[int | None, str]:
    """(bytes, method): the extra memory one call of fn(inp) needs at its peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn(inp)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak), "cuda-max-allocated"
    _malloc_trim()
    base_kb = _proc_status_kb("VmRSS")
    if base_kb is None:
        out = fn(inp)
        del out
        return None, "unavailable"
    if _reset_hwm() and _proc_status_kb("VmHWM") is not None:
        base_kb = _proc_status_kb("VmRSS")
        out = fn(inp)
        peak_kb = _proc_status_kb("VmHWM")
        del out
        return max(0, peak_kb - base_kb) * 1024, "rss-hwm-growth"
    # Fallback: sample the resident set from a thread (torch ops release the GIL).
    peak = [base_kb]
    done = threading.Event()

    def sampler():
        while not done.is_set():
            kb = _proc_status_kb("VmRSS") or 0
            peak[0] = max(peak[0], kb)
            time.sleep(0.0005)

    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    out = fn(inp)
    done.set()
    t.join()
    del out
    return max(0, peak[0] - base_kb) * 1024, "rss-sampled"


def free_memory(device: torch.device) -> int:
    """Bytes the run may still allocate on `device`."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def cache_bytes(device: torch.device) -> int:
    """The last-level cache a rotation of inputs must overflow."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            return int(text.rstrip("KMG")) * unit
        except (OSError, ValueError):
            continue
    return 32 << 20


# ---- ceilings ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Ceilings:
    matmul_flops: float       # FLOP/s of a large square matmul in the run's dtype
    matmul_n: int
    copy_bytes: float         # bytes/s (read + write) of a large device-to-device copy
    copy_mib: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_ceilings(device: torch.device, dtype: torch.dtype, quick: bool,
                     cfg: TimingConfig | None = None) -> Ceilings:
    cfg = cfg or TimingConfig.for_device(device, quick)
    if device.type == "cuda":
        n, copy_mib = (4096, 512) if quick else (8192, 1024)
    else:
        n, copy_mib = (1024, 64) if quick else (2048, 256)
    gen = torch.Generator(device=device).manual_seed(0)
    a = [torch.randn(n, n, device=device, generator=gen).to(dtype) for _ in range(2)]
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    t = time_calls(lambda x: x @ b, a, device, cfg)
    matmul = 2.0 * n ** 3 / t.median
    del a, b
    elems = (copy_mib << 20) // 4
    src = torch.rand(elems, device=device, generator=gen)
    dst = torch.empty_like(src)
    t = time_calls(lambda s: dst.copy_(s), [src], device, cfg)
    bandwidth = 2.0 * src.numel() * src.element_size() / t.median
    del src, dst
    return Ceilings(matmul_flops=matmul, matmul_n=n, copy_bytes=bandwidth, copy_mib=copy_mib)


# ---- the machine --------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{cpu_name()}-{torch.get_num_threads()}t"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:60] or device.type


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    import importlib.metadata

    import mxd_fast

    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": version("triton"), "sparsify": version("eai-sparsify"), "mxd_fast": mxd_fast.__version__}
