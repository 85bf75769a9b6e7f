#!/bin/bash
# The GPU call that ran in session 26 (results: PERF.md session 26): faster.py large (the issue-23 JSON; the adaLN overlap variant; FA3 in the step with its output quantised in place,
# fast/kernels.py plain_act_window, and its profile), then the GPU tests of the FP8 attention, FA3 and the
# pipeline. Each step writes into OUT as it ends (a step cut by its timeout loses only its own files).
# Carry carry/fa3 alone (benchmarks/fa3_carry.sh): the tree and the carry share 64 MiB.
#   bash benchmarks/gpu_session26.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_session26.sh OUTDIR}
LOG=$OUT/session26.log
source benchmarks/gpu_run.sh
source benchmarks/fa3_setup.sh
echo "== faster $(date -u +%T)" | tee "$LOG"
timeout 260 python3 benchmarks/faster.py large --reps 10 --out "$OUT/faster.json" 2>&1 \
    | grep -E "^step|^profile|^image|^fp8_gemm|^triton_fp8|^vae|Error|error" | tee -a "$LOG"
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 120 python3 -m pytest -q tests/test_attention_triton.py tests/test_fast.py tests/test_attention_fa3.py \
    -k "fp8_attention or joint_op or fa3 or adaln or side_stream" -rf 2>&1 | tail -15 | tee -a "$LOG"
# (test_pipeline ran in session 25)
echo "== done $(date -u +%T)" | tee -a "$LOG"
ls "$OUT"
