"""Builds mxd_fast. The Triton kernels in kernels/ install as mxd_fast.kernels. The CUDA extension
mxd_fast._C_cuda (csrc/) is built only when the installed torch has CUDA and nvcc is found;
MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured (default: sm_80 and sm_90a)."""
import glob
import os

from setuptools import setup


def cuda_extension():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None or os.environ.get("MXD_FAST_NO_CUDA") == "1":
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    if not sources:
        return [], {}
    ext = CUDAExtension(
        "mxd_fast._C_cuda",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]},
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
