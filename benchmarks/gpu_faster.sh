#!/bin/bash
# One GPU call (issue 23): the fused step's CUDA tests, then benchmarks/faster.py large (Large step with
# BF16 / FP8 attention, SQNR, kernel rate, profile, 20-step image uncached / cached).
#   bash benchmarks/gpu_faster.sh OUTDIR [SLUG]
set -o pipefail
OUT=${1:?usage: gpu_faster.sh OUTDIR [SLUG]}
SLUG=${2:-gpu}
mkdir -p "$OUT"
source benchmarks/gpu_run.sh
LOG=$OUT/faster_$SLUG.log
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout ${TESTS_S:-200} python3 -m pytest -q tests/test_fast.py tests/test_attention_triton.py tests/test_lora_fused.py \
    tests/test_fp8_engine.py 2>&1 | tail -4 | tee -a "$LOG"
echo "== faster.py large $(date -u +%T)" | tee -a "$LOG"
timeout ${FASTER_S:-330} python3 benchmarks/faster.py large --reps ${REPS:-10} --out "$OUT/faster_$SLUG.json" 2>&1 \
    | grep -v Warning | tail -30 | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
