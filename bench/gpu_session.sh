#!/usr/bin/env bash
# Everything that needs a GPU, in stages that each fit in one 10-minute command on a lent machine:
#   bash bench/gpu_session.sh build   # build the CUDA extension, print backends
#   bash bench/gpu_session.sh test    # build (if needed) + cuda/triton tests on the GPU + the whole suite
#   bash bench/gpu_session.sh bench   # build (if needed) + the default GPU benchmark suite
# Logs and results go to $OUT (or ./gpu-out); commit the bench folder under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
PY=${PY:-python3}

build() {
    if ! $PY -c "import mxd_fast._C_cuda" 2>/dev/null; then
        (time $PY -m pip install -q --no-build-isolation --no-deps -e .) > "$OUT/build.log" 2>&1
        tail -20 "$OUT/build.log"
    fi
    $PY -m mxd_fast.info | tee "$OUT/info.txt"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$OUT/info.txt"
}

case "${1:-test}" in
    build) build ;;
    test)
        build
        $PY -m pytest -q -p no:cacheprovider -m "cuda or triton" tests -x --durations=20 2>&1 | tee "$OUT/tests-gpu.log"
        $PY -m pytest -q -p no:cacheprovider -m "not cuda and not triton" tests 2>&1 | tail -30 | tee "$OUT/tests-rest.log"
        ;;
    bench)
        build
        $PY -m bench --device cuda --dtype bf16 --out "$OUT/bench" 2>&1 | tail -60 | tee "$OUT/bench.log"
        ;;
    *) echo "usage: $0 build|test|bench" >&2; exit 2 ;;
esac
