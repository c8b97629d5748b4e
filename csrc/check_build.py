"""Build checks of the CUDA backend that need no GPU and no CUDA build of torch.

1. Compiles every csrc/cuda/*.cu with nvcc for each target architecture with `-Xptxas -v`, parses
   ptxas's resource report and fails if any kernel spills registers (or uses a stack frame).
2. Syntax-checks the torch bindings csrc/*.cpp with the host compiler against torch's headers and
   the CUDA toolkit's headers (`-fsyntax-only`), so that a typo is caught before a GPU build.

python csrc/check_build.py [--arch sm_80 --arch sm_90a] [--no-cpp] [--no-cu] [--jobs N]
Exit status 0 when everything compiles and nothing spills.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent
KERNEL_DIR = CSRC / "cuda"
DEFAULT_ARCHS = ("sm_80", "sm_90a")
# The flags a torch CUDAExtension build gives nvcc (setup.py's and torch's own), besides the
# architecture, the include paths and the C++ standard (cxx_standard()).
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")


@dataclasses.dataclass
class KernelReport:
    source: str
    arch: str
    name: str  # demangled, shortened
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.stack > 0


@dataclasses.dataclass
class CompileResult:
    source: str
    arch: str
    ok: bool
    log: str
    kernels: list


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
            if home and Path(home, "bin", "nvcc").exists():
                return str(Path(home, "bin", "nvcc"))
    return nvcc


def cuda_include_dir(nvcc: str) -> Path | None:
    root = Path(nvcc).resolve().parent.parent
    for candidate in (root / "include", Path("/usr/local/cuda/include")):
        if (candidate / "cuda_runtime_api.h").exists():
            return candidate
    return None


def cxx_standard() -> str:
    """The C++ standard a torch extension build uses with the installed torch: C++20 where torch's
    headers require it (torch >= 2.14), else C++17 (also without torch)."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return "c++17"
    for root in include_paths():
        aten = Path(root, "ATen", "ATen.h")
        if aten.exists():
            return "c++20" if "__cplusplus < 202002L" in aten.read_text() else "c++17"
    return "c++17"


def kernel_sources() -> list[Path]:
    return sorted(KERNEL_DIR.glob("*.cu"))


def binding_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cpp"))


# ---- ptxas report --------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not names or tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def shorten(name: str, width: int = 110) -> str:
    name = re.sub(r"^void ", "", name)
    name = name.replace("(anonymous namespace)::", "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the parameter list
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    name = re.sub(r"\bmxd::detail::", "", name)
    name = re.sub(r"\bmxd::", "", name)
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "half").replace("unsigned long long", "u64")
    return name if len(name) <= width else name[: width - 3] + "..."


def parse_ptxas(log: str, source: str, arch: str) -> list[KernelReport]:
    """Resource usage per function from `ptxas -v` output (entries and non-inlined functions)."""
    reports: dict[str, KernelReport] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = reports.setdefault(m.group(1), KernelReport(source, m.group(2), m.group(1)))
            continue
        m = _PROPS.search(line)
        if m:
            current = reports.setdefault(m.group(1), KernelReport(source, arch, m.group(1)))
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m:
            current.registers = int(m.group(1))
            s = _SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
    names = demangle(list(reports))
    for mangled, r in reports.items():
        r.name = shorten(names[mangled])
    return list(reports.values())


# ---- compilation ---------------------------------------------------------------------------

def compile_kernel(nvcc: str, source: Path, arch: str, outdir: Path, std: str = "c++17") -> CompileResult:
    number = arch.removeprefix("sm_")
    cmd = [nvcc, "-c", *NVCC_FLAGS, f"-std={std}", f"-gencode=arch=compute_{number},code={arch}", "-Xptxas", "-v",
           f"-I{CSRC}", str(source), "-o", str(outdir / f"{source.stem}.{arch}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    kernels = parse_ptxas(log, source.name, arch) if proc.returncode == 0 else []
    return CompileResult(source.name, arch, proc.returncode == 0, " ".join(cmd) + "\n" + log, kernels)


def compile_kernels(archs=DEFAULT_ARCHS, jobs: int | None = None, nvcc: str | None = None) -> list[CompileResult]:
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, CUDA_HOME)")
    jobs = jobs or os.cpu_count() or 1
    std = cxx_standard()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(compile_kernel, nvcc, src, arch, Path(tmp), std)
                   for src in kernel_sources() for arch in archs]
        return [f.result() for f in futures]


def torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return list(include_paths())


def syntax_check(source: Path, includes: list[str], compiler: str, std: str = "c++17") -> tuple[bool, str]:
    cmd = [compiler, f"-std={std}", "-fsyntax-only", "-Wall", "-Wextra", "-Werror=return-type",
           *(f"-isystem{p}" for p in includes), f"-I{CSRC}", str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode == 0, " ".join(cmd) + "\n" + proc.stdout + proc.stderr


def syntax_check_bindings(jobs: int | None = None, nvcc: str | None = None) -> list[tuple[str, bool, str]]:
    """g++ -fsyntax-only of every csrc/*.cpp. The CPU wheel of torch ships c10/cuda's headers but not
    the header CMake generates for them (c10/cuda/impl/cuda_cmake_macros.h): a stub stands in."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError("no host C++ compiler (g++ or c++)")
    nvcc = nvcc or find_nvcc()
    cuda_inc = cuda_include_dir(nvcc) if nvcc else None
    if cuda_inc is None:
        raise FileNotFoundError("CUDA toolkit headers (cuda_runtime_api.h) not found")
    includes = torch_includes() + [sysconfig.get_paths()["include"], str(cuda_inc)]
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
            stub = Path(tmp, "c10/cuda/impl/cuda_cmake_macros.h")
            stub.parent.mkdir(parents=True)
            stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            includes.append(tmp)
        with ThreadPoolExecutor(jobs) as pool:
            std = cxx_standard()
            futures = {src.name: pool.submit(syntax_check, src, includes, compiler, std) for src in binding_sources()}
            return [(name, *f.result()) for name, f in futures.items()]


def format_report(results: list[CompileResult]) -> str:
    lines = [f"{'source':<18} {'arch':<7} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  kernel"]
    for res in results:
        if not res.ok:
            lines.append(f"{res.source:<18} {res.arch:<7} COMPILE ERROR")
            continue
        for k in sorted(res.kernels, key=lambda k: k.name):
            flag = "  <-- SPILLS" if k.spills else ""
            lines.append(f"{k.source:<18} {k.arch:<7} {k.registers:>4} {k.spill_stores:>5}/{k.spill_loads:<5} "
                         f"{k.stack:>5} {k.smem:>6}  {k.name}{flag}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="target, e.g. sm_80 (repeatable; default sm_80 and sm_90a)")
    parser.add_argument("--no-cu", action="store_true", help="skip the nvcc/ptxas check")
    parser.add_argument("--no-cpp", action="store_true", help="skip the syntax check of the bindings")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    failed = False
    if not args.no_cu:
        results = compile_kernels(tuple(args.arch or DEFAULT_ARCHS), args.jobs)
        print(format_report(results))
        for res in results:
            if not res.ok:
                failed = True
                print(f"\nnvcc failed on {res.source} for {res.arch}:\n{res.log}", file=sys.stderr)
        spilling = [k for res in results for k in res.kernels if k.spills]
        n = sum(len(res.kernels) for res in results)
        print(f"\n{n} kernel builds, {len(spilling)} with register spills or stack frames")
        failed |= bool(spilling)
    if not args.no_cpp:
        for name, ok, log in syntax_check_bindings(args.jobs):
            print(f"syntax check {name}: {'ok' if ok else 'FAILED'}")
            if not ok:
                failed = True
                print(log, file=sys.stderr)
    print("cuda-check: FAILED" if failed else "cuda-check: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
