#!/bin/bash
# One GPU call: a change to fast/kernels.py's row kernels measured twice over.
#   1. benchmarks/elementwise_configs.py: each row kernel at the Large shapes, lane layouts x num_warps;
#   2. benchmarks/gpu_faster.sh: the fused step's CUDA tests and faster.py large with the working tree;
#   3. faster.py large again with BASE_KERNELS (the kernels.py before the change, e.g.
#      `git show HEAD~1:src/sd35fp8/fast/kernels.py > carry/kernels_base.py`), then once more with the
#      working tree's, so the step's A/B sits on one warm card and its run-to-run spread is visible.
#   bash benchmarks/gpu_kernels_ab.sh OUTDIR [BASE_KERNELS]
set -o pipefail
OUT=${1:?usage: gpu_kernels_ab.sh OUTDIR [BASE_KERNELS]}
BASE=${2:-carry/kernels_base.py}
TINY=benchmarks/results/faster_tiny_euler_cpu.json
source benchmarks/gpu_run.sh
python3 benchmarks/elementwise_configs.py --out "$OUT/elementwise.json" 2>&1 | tee "$OUT/kernels_ab.log"
bash benchmarks/gpu_faster.sh "$OUT" new
K=src/sd35fp8/fast/kernels.py
cp "$K" /tmp/kernels_new.py
cp "$BASE" "$K"
echo "== base kernels $(date -u +%T)" | tee -a "$OUT/kernels_ab.log"
python3 benchmarks/faster.py large --reps 10 --tiny-json $TINY --out "$OUT/faster_base.json" 2>&1 \
    | grep -E "^step|^profile|^image" | tee -a "$OUT/kernels_ab.log"
cp /tmp/kernels_new.py "$K"
echo "== new kernels, again $(date -u +%T)" | tee -a "$OUT/kernels_ab.log"
python3 benchmarks/faster.py large --reps 10 --tiny-json $TINY --out "$OUT/faster_new2.json" 2>&1 \
    | grep -E "^step|^profile|^image" | tee -a "$OUT/kernels_ab.log"
