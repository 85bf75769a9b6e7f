#!/bin/bash
# One GPU call (session 24): faster.py large with the compiled VAE decode, the FP8 attention's e4m3 outputs and FA3 in
# the step (the issue-23 JSON); FlashAttention-3's FP8 forward against our kernel alone (attention_fa3.py); the MLP's GEMMs owned by Triton
# with the GELU + quantise pass in fc1's epilogue (gemm_epilogue.py); the GPU tests of the FP8 attention and of the
# compiled road. Each step writes into OUT as it ends (a step cut by its timeout loses only its own files).
# Carry carry/fa3 alone (benchmarks/fa3_carry.sh): the tree and the carry share 64 MiB.
#   bash benchmarks/gpu_session24.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_session24.sh OUTDIR}
LOG=$OUT/session24.log
source benchmarks/gpu_run.sh
source benchmarks/fa3_setup.sh
echo "== faster $(date -u +%T)" | tee "$LOG"
timeout 170 python3 benchmarks/faster.py large --reps 10 --out "$OUT/faster.json" 2>&1 \
    | grep -E "^step|^profile|^image|^fp8_gemm|^triton_fp8|^vae|Error|error" | tee -a "$LOG"
echo "== fa3 $(date -u +%T)" | tee -a "$LOG"
timeout 60 python3 benchmarks/attention_fa3.py --out "$OUT" 2>&1 | grep -v -i warn | tail -8 | tee -a "$LOG"
echo "== gemm epilogue $(date -u +%T)" | tee -a "$LOG"
timeout 90 python3 benchmarks/gemm_epilogue.py --out "$OUT" 2>&1 | grep -v -i warn | tail -9 | tee -a "$LOG"
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 60 python3 -m pytest -q tests/test_attention_triton.py tests/test_fast.py tests/test_attention_fa3.py tests/test_mlp_triton.py \
    -k "fp8_attention or joint_op or fa3 or mlp" \
    2>&1 | tail -4 | tee -a "$LOG"
timeout 40 python3 -m pytest -q -x tests/test_pipeline.py tests/test_vae.py 2>&1 | tail -4 | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
ls "$OUT"
