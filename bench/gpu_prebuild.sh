#!/usr/bin/env bash
# Builds mxd_fast._C_cuda here for the H200 image (Python 3.12, torch 2.11.0 with CUDA 13.0, sm_90a), with
# this machine's nvcc 13.0, so that bench/gpu_session.sh loads it instead of compiling on the GPU. The build
# records its sources' digest (mxd_fast/_cuda_build.py); the session compiles anew when csrc/ has changed
# since or the module does not import there. Both files are git-ignored: send them with the repository.
#   bash bench/gpu_prebuild.sh        (PYTHON312: a Python 3.12; VENV: its virtual environment, .venv-cuda)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON312=${PYTHON312:-python3.12}
VENV=${VENV:-.venv-cuda}
GPU_TORCH=${GPU_TORCH:-torch==2.11.0}
command -v nvcc >/dev/null || { echo "gpu_prebuild: nvcc (CUDA 13.0, as on the GPU machine) is not on PATH" >&2; exit 1; }
[[ -x $VENV/bin/python ]] || "$PYTHON312" -m venv "$VENV"
"$VENV/bin/python" -c "import torch" 2>/dev/null ||
    "$VENV/bin/python" -m pip install -q "$GPU_TORCH" numpy ninja "setuptools>=77,<82" wheel
"$VENV/bin/python" -c "import sys, torch; print('building for python', sys.version.split()[0], 'torch', torch.__version__)"
rm -f mxd_fast/_C_cuda*.so mxd_fast/_cuda_build.py
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace
strip --strip-debug mxd_fast/_C_cuda*.so   # host debug sections only: the device code and its line table stay
ls -l mxd_fast/_C_cuda*.so mxd_fast/_cuda_build.py
