#!/bin/bash
# The GPU call of helper lorafast (issue 21, unmerged LoRA overhead): the fused-LoRA kernels' GPU tests,
# then benchmarks/lora.py (Large, rank 64 on every linear, 1024², CUDA graphs), then the same without
# graphs under torch.profiler (where the time goes). Every step has its own time limit.
#   bash benchmarks/gpu_lorafast.sh OUTDIR [SLUG]
set -o pipefail
OUT=${1:?usage: gpu_lorafast.sh OUTDIR [SLUG]}
SLUG=${2:-gpu}
mkdir -p "$OUT"
LOG=$OUT/lora_$SLUG.log
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 100 python3 -m pytest -q -x tests/test_lora_fused.py -k "spare or layer" 2>&1 | tail -4 | tee -a "$LOG"
echo "== lora.py $(date -u +%T)" | tee -a "$LOG"
timeout 200 python3 benchmarks/lora.py --out "$OUT/lora_$SLUG.json" 2>&1 | grep -v Warning | tail -14 | tee -a "$LOG"
echo "== lora.py --no-graphs --profile $(date -u +%T)" | tee -a "$LOG"
timeout ${PROFILE_S:-100} python3 benchmarks/lora.py --no-graphs --profile --steps 3 --warmup 1 \
    --out "$OUT/lora_${SLUG}_profile_eager.json" 2>&1 | grep -v Warning | tail -60 >> "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
