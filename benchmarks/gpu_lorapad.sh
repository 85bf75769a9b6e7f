#!/bin/bash
# One GPU call (issue 21, unmerged LoRA overhead): the fused-LoRA kernel tests on the GPU, then
# benchmarks/lora.py (Large, rank 64 on every linear, 1024², CUDA graphs) with the pack variants
# (lora/fused.py: D bf16 / e4m3, K + R padded to the 128 K tile or not) timed in the same process.
#   bash benchmarks/gpu_lorapad.sh OUTDIR [SLUG]
set -o pipefail
OUT=${1:?usage: gpu_lorapad.sh OUTDIR [SLUG]}
SLUG=${2:-gpu}
mkdir -p "$OUT"
source benchmarks/gpu_run.sh
LOG=$OUT/lora_$SLUG.log
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 120 python3 -m pytest -q -x tests/test_lora_fused.py -rs 2>&1 | tail -6 | tee -a "$LOG"
echo "== lora.py $(date -u +%T)" | tee -a "$LOG"
timeout ${LORA_S:-300} python3 benchmarks/lora.py --variants fp8:128 bf16:16 fp8:16 --out "$OUT/lora_$SLUG.json" 2>&1 \
    | grep -v Warning | tail -16 | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
