#!/bin/bash
# One GPU call (session 14): every road's step (issue 19, benchmarks/paths.py), then the fused LoRA road with
# the split-K down kernel (issue 21: GPU tests, benchmarks/lora.py), then the LoRA kernels' sweep
# (benchmarks/lora_kernels.py). Each step has its own time limit; at most ~9 minutes in all.
#   bash benchmarks/gpu_paths_lora.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_paths_lora.sh OUTDIR}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== paths $(date -u +%T)"
timeout 330 python3 benchmarks/paths.py --budget-s 250 --work /tmp/pw --out "$OUT" 2>&1 | grep -v Warning | tail -16
echo "== lora $(date -u +%T)"
PROFILE_S=${PROFILE_S:-1} bash benchmarks/gpu_lorafast.sh "$OUT" splitk | tail -16
timeout 60 python3 -m pytest -q tests/test_lora_fused.py -k split 2>&1 | tail -2
echo "== lora_kernels $(date -u +%T)"
timeout ${KERNELS_S:-120} python3 benchmarks/lora_kernels.py --out "$OUT/lora_kernels.json" 2>&1 | grep -v Warn | tail -12
echo "== done $(date -u +%T)"
