#!/bin/bash
# One GPU call (session 24): FlashAttention-3's FP8 forward against our kernel (attention_fa3.py), faster.py large with
# the compiled VAE decode and the FP8 attention's e4m3 outputs (the issue-23 JSON), the VAE decode five ways, the GPU
# tests of the FP8 attention and of the compiled road.
# Carry carry/fa3 alone (benchmarks/fa3_carry.sh): the tree and the carry share 64 MiB.
#   bash benchmarks/gpu_session24.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_session24.sh OUTDIR}
LOG=$OUT/session24.log
RES=/tmp/res && mkdir -p $RES  # JSON here first, copied to OUT at the end (at most 8 files come back)
source benchmarks/gpu_run.sh
source benchmarks/fa3_setup.sh
echo "== fa3 $(date -u +%T)" | tee "$LOG"
timeout 120 python3 benchmarks/attention_fa3.py --out $RES 2>&1 | grep -v -i warn | tail -8 | tee -a "$LOG"
echo "== faster $(date -u +%T)" | tee -a "$LOG"
timeout 200 python3 benchmarks/faster.py large --reps 10 --out "$RES/faster.json" 2>&1 \
    | grep -E "^step|^profile|^image|^fp8_gemm|^triton_fp8|^vae|Error|error" | tee -a "$LOG"
echo "== vae decode $(date -u +%T)" | tee -a "$LOG"
timeout 90 python3 benchmarks/vae_decode.py --out $RES 2>&1 | grep -v -i warn | tail -8 | tee -a "$LOG"
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 150 python3 -m pytest -q tests/test_attention_triton.py tests/test_fast.py -k "fp8_attention or joint_op" \
    2>&1 | tail -4 | tee -a "$LOG"
timeout 120 python3 -m pytest -q -x tests/test_pipeline.py tests/test_vae.py 2>&1 | tail -4 | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
cp $RES/*.json "$OUT"/ 2>/dev/null; ls "$OUT"
