"""Builds mxd_fast. The Triton kernels in kernels/ install as mxd_fast.kernels. The CUDA extension
mxd_fast._C_cuda (csrc/) is built only when the installed torch has CUDA and nvcc is found;
MAX_JOBS, TORCH_CUDA_ARCH_LIST (default: sm_80 and sm_90a) and CUDA_HOME are honoured. The C++
standard is the one torch's extension builder picks for the installed torch (C++17 up to torch 2.13,
C++20 from 2.14 on); the kernels in csrc/cuda/ compile as either."""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup


def _toolkit_root(nvcc: str) -> str | None:
    """The CUDA toolkit behind `nvcc`, also when `nvcc` is a wrapper script outside the toolkit
    (torch would take the wrapper's grandparent folder, which has no CUDA headers)."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    try:
        out = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if m:
        root = os.path.normpath(m.group(1).strip())  # TOP is <toolkit>/bin/..
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _set_cuda_home() -> None:
    """Point torch's extension builder at the toolkit (CUDA_HOME) unless the caller has."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    root = _toolkit_root(nvcc) if nvcc else None
    if root is not None:
        os.environ["CUDA_HOME"] = root


def _extension_helpers():
    """mxd_fast/_extension.py loaded on its own (the package itself imports torch and its ops)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mxd_fast_extension_helpers",
                                                  os.path.join("mxd_fast", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension():
    try:
        import torch
    except ImportError:
        return [], {}
    if torch.version.cuda is None or os.environ.get("MXD_FAST_NO_CUDA") == "1":
        return [], {}
    _set_cuda_home()  # before cpp_extension reads it
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    # the architectures the kernels are compiled for, read by mxd_fast.backend to refuse other GPUs clearly,
    # and the sources' digest, by which `python -m mxd_fast.info` tells a build older than its sources
    with open(os.path.join("mxd_fast", "_cuda_build.py"), "w") as f:
        f.write('"""Written by setup.py when it builds mxd_fast._C_cuda."""\n'
                f'ARCH_LIST = {os.environ["TORCH_CUDA_ARCH_LIST"]!r}\n'
                f'SOURCE_SHA256 = {_extension_helpers().csrc_digest(os.path.abspath("csrc"))!r}\n')
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    if not sources:
        return [], {}
    ext = CUDAExtension(
        "mxd_fast._C_cuda",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="mxd_fast",
    version="0.1.0",
    description="Fast Triton/CUDA kernels and torch ops for Mixture of Decoders (MxD) layers",
    packages=["mxd_fast", "mxd_fast.ops", "mxd_fast.kernels"],
    package_dir={"mxd_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark", "hypothesis"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
