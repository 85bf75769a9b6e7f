#!/bin/bash
# One GPU call (session 31): the opt-in adaLN memo (fast/ada_memo.py), the gemv kernel and the padded proj / fc2
# rows (fast/weights.py pad_output_rows): their GPU tests, the
# engine / ControlNet / pipeline GPU tests that run through them, then faster.py large (the issue-23 JSON, with the
# step with each opt-in and the adaLN matmul alone: cuBLAS against the gemv kernel's tiles and the memo's hit).
# Carry carry/fa3 (benchmarks/fa3_carry.sh): FA3 is auto's attention on sm_90.
#   bash benchmarks/gpu_session31.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_session31.sh OUTDIR}
LOG=$OUT/session31.log
source benchmarks/gpu_run.sh
source benchmarks/fa3_setup.sh
echo "== faster $(date -u +%T)" | tee "$LOG"
timeout 300 python3 benchmarks/faster.py large --quick --reps 10 --out "$OUT/faster.json" 2>&1 | tee "$OUT/faster.log" \
    | grep -E "^step|^profile|^graph|^image|^adaln|^fp8_gemm|^triton_fp8|^vae|Error|error" | tee -a "$LOG"
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 70 python3 -m pytest -q tests/test_ada_memo.py tests/test_pad_rows.py \
    -k "gpu" -rf 2>&1 | tail -15 | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
ls "$OUT"
