#!/usr/bin/env bash
# The issue-16 GPU figures in one short run (about 5 minutes on an H100/H200): DP-SGD
# (book-keeping beside Opacus's modes) over plain SGD, preset base, batch 32, fp32 and
# bf16; preset large under book-keeping DP in bf16 with physical batches of 8. Each
# command prints one JSON document; they land in $OUT (default: ./dp-gpu-figures).
set -euo pipefail
out="${OUT:-dp-gpu-figures}"
mkdir -p "$out"
python="${PYTHON:-python}"
bench=("$python" -m medfed.bench.dp --device cuda --steps 5 --repeats 1 --threads 8)
"${bench[@]}" --preset base --batch 32 --precision fp32 --mode bk --mode hooks --mode ghost \
    > "$out/base-fp32.json"
"${bench[@]}" --preset base --batch 32 --precision bf16 --mode bk --mode ghost \
    > "$out/base-bf16.json"
"${bench[@]}" --preset base --batch 128 --precision bf16 --mode bk > "$out/base-bf16-b128.json"
"${bench[@]}" --preset large --batch 16 --precision bf16 --mode bk --physical-batch 8 \
    > "$out/large-bf16.json"
