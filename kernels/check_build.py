"""Build check of the Triton kernels that needs no GPU: compiles, with Triton's own compiler and ptxas,
every kernel configuration the ops launch on a GPU, for sm_80 and sm_90a, and reads ptxas's report.

The ops are called with CPU tensors while kernels/_device.py says "compiled for a GPU", so they take
exactly the launch paths, configurations and autotuning lists of a GPU run; each launch is compiled
(Triton's warm-up) instead of run. Fails when a kernel does not compile, when a configuration that is
launched without autotuning spills registers or needs more shared memory than the GPU has, or when
no configuration of an autotuned launch fits. The interpreter tests check what the kernels compute;
this checks that the GPU compiler accepts them.

python -m mxd_fast.kernels.check_build [--arch 80 --arch 90] [--quick] [--verbose]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from . import _device

# Name and multiprocessors of the GPU each capability is checked as (shared memory: _device).
GPUS = {80: ("A100", 108), 90: ("H100", 132)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class _CompileOnlyDriver:
    """What Triton's JIT asks of its driver before it compiles; launching is never reached."""

    def __init__(self, capability: int):
        self.capability = capability

    def get_current_device(self):
        return self.capability  # one kernel cache per checked capability

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.capability, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclasses.dataclass
class Compiled:
    kernel: str
    capability: int
    autotuned: bool
    config: str
    shared: int
    registers: int = -1
    spill_bytes: int = 0
    stack: int = 0
    mma: str = ""        # the tensor-core instruction of the PTX: wgmma (Hopper), mma.sync or none
    error: str = ""

    def fits(self) -> bool:
        return not self.error and self.shared <= _device.SHARED_MEMORY[self.capability]

    def clean(self) -> bool:
        return self.fits() and self.spill_bytes == 0


@contextlib.contextmanager
def compile_only(capability: int, records: list, all_autotune_configs: bool):
    """Launches of Triton kernels compile for `capability` and record what they compiled."""
    run, tuned_run = JITFunction.run, Autotuner.run
    state = {"autotuned": False}

    def compile_launch(self, *args, grid, warmup, **kwargs):
        constexprs = {p.name: kwargs.get(p.name, args[i] if i < len(args) else p.default)
                      for i, p in enumerate(self.params) if p.is_constexpr}
        config = ", ".join(f"{k}={v}" for k, v in constexprs.items())
        config += f", num_warps={kwargs.get('num_warps', 4)}, num_stages={kwargs.get('num_stages', 3)}"
        rec = Compiled(self.__name__, capability, state["autotuned"], config, 0)
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
            rec.shared = kernel.metadata.shared
            _ptxas_report(kernel, capability, rec)
        except Exception as e:  # noqa: BLE001 - reported per configuration
            rec.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        records.append(rec)

    def compile_configs(self, *args, grid=None, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        state["autotuned"] = True
        try:
            for cfg in configs if all_autotune_configs else configs[:1]:
                self.fn.run(*args, grid=(1,), warmup=True, **kwargs, **cfg.all_kwargs())
        finally:
            state["autotuned"] = False
            self.nargs = None

    previous = driver._active  # usually None: no GPU driver is active on such a machine
    driver.set_active(_CompileOnlyDriver(capability))
    JITFunction.run, Autotuner.run = compile_launch, compile_configs
    _device.compile_target = (capability, GPUS[capability][1])
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = run, tuned_run
        _device.compile_target = None
        driver._active = previous


def _ptxas_report(kernel, capability: int, rec: Compiled) -> None:
    """Registers, spills and stack of the kernel's PTX, from the ptxas Triton uses, with its flags; its MMA instruction."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    arch = sm_arch_from_capability(capability)
    ptx = kernel.asm["ptx"]
    rec.mma = "wgmma" if "wgmma." in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:
            ptxas = get_ptxas(capability)
        except TypeError:   # triton before 3.6 takes no capability
            ptxas = get_ptxas()
        out = subprocess.run([ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    m = re.search(r"Used (\d+) registers", log)
    rec.registers = int(m.group(1)) if m else -1
    rec.spill_bytes = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    m = re.search(r"(\d+) bytes stack frame", log)
    rec.stack = int(m.group(1)) if m else 0


def _cases(quick: bool):
    """(label, thunk) pairs calling each op's Triton forward and backward the way the ops do."""
    from . import gather_combine as gc
    from . import mxd_decode as md
    from . import screened_gate as sg
    from . import topk_gate as tg

    g = torch.Generator().manual_seed(0)
    cases = []
    cases += _screened_gate_cases(sg, g, quick)
    ks = (1, 32, 128, 256) if quick else (1, 8, 32, 64, 128, 256)
    dtypes = (torch.float32, torch.bfloat16) if quick else DTYPES
    for dtype in dtypes:
        def rand(*shape, dtype=dtype):
            return torch.randn(*shape, generator=g).to(dtype)

        for k in ks:
            for B, N in ((256, 20000), (8192, 4096)):  # N split over programs, and not
                I = 96
                x, w, b = rand(B, I), rand(N, I), rand(N)
                cases.append((f"topk_gate forward {dtype} k={k} B={B} N={N}",
                              lambda x=x, w=w, b=b, k=k: tg.topk_gate_forward(x, w, b, k)))
        B, N, I, K, O, H = 300, 5000, 96, 32, 80, 112
        x, w = rand(B, I), rand(N, I)
        idx = torch.randint(0, N, (B, K), generator=g)
        vals, gv = rand(B, K).abs(), rand(B, K)
        for det in (True, False):
            cases.append((f"topk_gate backward {dtype} deterministic={det}",
                          lambda x=x, w=w, v=vals, i=idx, gv=gv, d=det:
                          tg.topk_gate_backward(gv, x, w, v, i, True, True, True, d)))
        experts, decoder, z, gy, bias = rand(N, O), rand(H, O), rand(B, H), rand(B, O), rand(O)
        cases.append((f"gather_combine forward {dtype}", lambda e=experts, v=vals, i=idx: gc.gather_combine_forward(e, v, i)))
        for det in (True, False):
            cases.append((f"gather_combine backward {dtype} deterministic={det}",
                          lambda gy=gy, e=experts, v=vals, i=idx, d=det: gc.gather_combine_backward(gy, e, v, i, True, True, d)))
        for tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            def with_tf32(fn, tf32=tf32):
                def run():
                    old = torch.backends.cuda.matmul.allow_tf32
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    try:
                        fn()
                    finally:
                        torch.backends.cuda.matmul.allow_tf32 = old
                return run
            for source in ("gather", "interleaved", "precomputed"):
                def with_source(fn, source=source):
                    def run():
                        old = md.EPILOGUE_SOURCE
                        md.EPILOGUE_SOURCE = source
                        try:
                            fn()
                        finally:
                            md.EPILOGUE_SOURCE = old
                    return run
                label = f"{dtype} tf32={tf32} epilogue={source}"
                cases.append((f"mxd_decode forward {label}", with_tf32(with_source(
                    lambda z=z, d=decoder, e=experts, v=vals, i=idx, b=bias: md.mxd_decode_forward(z, d, e, v, i, b)))))
                cases.append((f"mxd_decode backward {label}", with_tf32(with_source(
                    lambda gy=gy, z=z, d=decoder, e=experts, v=vals, i=idx:
                    md.mxd_decode_backward(gy, z, d, e, v, i, True, True, True, True, True, True)))))
    return cases


def _screened_gate_cases(sg, g: torch.Generator, quick: bool):
    """The fp8 screen's launches (its kernel, and topk_gate's merge kernel after a split over N), with
    no self-check (it runs kernels, which a build check cannot). Before sm_89 (no fp8 dot products) the
    screen is never launched: one case prints a note and compiles nothing."""
    if _device.compile_target[0] < 89:
        return [("screened_gate", lambda: print(f"sm_{_device.compile_target[0]}: screened_gate not compiled "
                                                "(fp8 dot products need sm_89+)"))]
    cases = []
    shapes = [(256, 20000, 96), (8192, 4096, 96), (256, 4096, 3072)]  # split over N and not; keep 89 at k=32
    for k in ((1, 32) if quick else (1, 8, 32, 128)):
        for B, N, I in shapes:
            x, w, b = (torch.randn(B, I, generator=g).bfloat16(), torch.randn(N, I, generator=g).bfloat16(),
                       torch.randn(N, generator=g).bfloat16())

            def screen(x=x, w=w, b=b, k=k):
                C = k + sg.margin(k, x.shape[1])
                prep = sg._Prepared(x, w, b, sg._config(sg.tgk._next_pow2(C + 1), x))
                sg._screen(prep.x8, prep.rowc, prep.g8, prep.colc, b, C + 1, prep.cfg)
            cases.append((f"screened_gate screen k={k} B={B} N={N} I={I}", screen))
    return cases


def check(capabilities=(80, 90), quick: bool = False, verbose: bool = False, out=sys.stdout) -> list[Compiled]:
    """Compiles every case for every capability; returns one record per compiled configuration."""
    records: list[Compiled] = []
    old_autotune = os.environ.get("MXD_FAST_AUTOTUNE")
    if quick:
        os.environ["MXD_FAST_AUTOTUNE"] = "0"
    try:
        for cap in capabilities:
            t0 = time.time()
            with compile_only(cap, records, all_autotune_configs=not quick):
                for label, thunk in _cases(quick):
                    n = len(records)
                    thunk()
                    if verbose:
                        print(f"sm_{cap} {label}: {len(records) - n} launches", file=out)
            print(f"sm_{cap}: {sum(r.capability == cap for r in records)} launches compiled "
                  f"in {time.time() - t0:.0f} s", file=out)
    finally:
        if old_autotune is None:
            os.environ.pop("MXD_FAST_AUTOTUNE", None)
        else:
            os.environ["MXD_FAST_AUTOTUNE"] = old_autotune
    return records


def failures(records: list[Compiled]) -> list[str]:
    """Launches that cannot run: an error, a fixed configuration that spills or does not fit, or an
    autotuned launch none of whose configurations fits."""
    bad = [f"{r.kernel} sm_{r.capability} [{r.config}]: "
           + (r.error or f"shared {r.shared} B, spills {r.spill_bytes} B")
           for r in records if r.error or (not r.autotuned and not r.clean())]
    tuned = {}
    for r in records:
        if r.autotuned:
            tuned.setdefault((r.kernel, r.capability), []).append(r)
    bad += [f"{name} sm_{cap}: no autotuned configuration fits" for (name, cap), rs in tuned.items()
            if not any(r.fits() for r in rs)]
    return bad


def summary(records: list[Compiled]) -> str:
    """One line per (kernel, capability, configuration): registers, spills, shared memory."""
    seen, lines = set(), []
    for r in records:
        key = (r.kernel, r.capability, r.config)
        if key in seen:
            continue
        seen.add(key)
        state = "ERROR " + r.error if r.error else ("ok" if r.clean() else
                                                      "too much shared memory" if not r.fits() else "spills")
        lines.append(f"{r.kernel:32s} sm_{r.capability} {'tuned' if r.autotuned else 'fixed'} regs {r.registers:3d} "
                     f"spill {r.spill_bytes:5d} B smem {r.shared:6d} B {r.mma:8s} {state}  [{r.config}]")
    return "\n".join(sorted(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, action="append", choices=sorted(GPUS),
                   help="compute capability to compile for (repeatable; default: 80 and 90)")
    p.add_argument("--quick", action="store_true",
                   help="fp32 and bf16, fewer k, the configuration used without autotuning and the first "
                        "autotuning one")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: this compiles the kernels for a GPU")
    records = check(tuple(args.arch or sorted(GPUS)), args.quick, args.verbose)
    print(summary(records))
    bad = failures(records)
    kinds = len({(r.kernel, r.capability, r.config) for r in records})
    print(f"{kinds} distinct configurations, {sum(r.spill_bytes > 0 for r in records)} launches spill, "
          f"{len(bad)} failures")
    for line in bad:
        print("FAIL", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
