#!/bin/bash
# One GPU call (session 23, second): faster.py large with the compiled VAE decode (the issue-23 JSON), the VAE decode
# five ways (the library's compiled NCHW form among them) with the eager kernel profile, then the GPU tests of the compiled road (pipeline with the
# compiled decoder, the VAE).
#   bash benchmarks/gpu_session23.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_session23.sh OUTDIR}
LOG=$OUT/session23.log
source benchmarks/gpu_run.sh
echo "== faster $(date -u +%T)" | tee "$LOG"
timeout 160 python3 benchmarks/faster.py large --reps 10 --out "$OUT/faster.json" 2>&1 \
    | grep -E "^step|^profile|^image|^fp8_gemm|^triton_fp8|^vae" | tee -a "$LOG"
echo "== vae decode $(date -u +%T)" | tee -a "$LOG"
timeout 200 python3 benchmarks/vae_decode.py --profile --out "$OUT" 2>&1 | grep -v -i warn | tail -22 | tee -a "$LOG"
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 150 python3 -m pytest -q tests/test_pipeline.py tests/test_vae.py \
    2>&1 | tail -4 | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
