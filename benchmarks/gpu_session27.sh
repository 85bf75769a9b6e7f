#!/bin/bash
# One GPU call (session 27): faster.py large (the issue-23 JSON; FA3 in the step, the image on auto's pick (FA3),
# fast/kernels.py plain_act_window, and its profile; the graphed step's gaps; PDL launches of our Triton kernels as it
# ran at commit a7dfcff, removed after it), then the GPU tests of the FP8 attention, FA3 and the
# pipeline, then the row kernels' launch sweep with persistent forms (elementwise_configs.py). Each step writes into OUT as it ends (a step cut by its timeout loses only its own files).
# Carry carry/fa3 alone (benchmarks/fa3_carry.sh): the tree and the carry share 64 MiB.
#   bash benchmarks/gpu_session27.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_session27.sh OUTDIR}
LOG=$OUT/session27.log
source benchmarks/gpu_run.sh
source benchmarks/fa3_setup.sh
echo "== faster $(date -u +%T)" | tee "$LOG"
timeout 300 python3 benchmarks/faster.py large --reps 10 --out "$OUT/faster.json" 2>&1 \
    | grep -E "^step|^profile|^graph|^image|^fp8_gemm|^triton_fp8|^vae|Error|error" | tee -a "$LOG"
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 120 python3 -m pytest -q tests/test_attention_triton.py tests/test_fast.py tests/test_attention_fa3.py \
    -k "fp8_attention or joint_op or fa3 or pdl" -rf 2>&1 | tail -15 | tee -a "$LOG"
timeout 90 python3 -m pytest -q tests/test_pipeline.py -k "compiled" -rf 2>&1 | tail -6 | tee -a "$LOG"
echo "== elementwise $(date -u +%T)" | tee -a "$LOG"
timeout 150 python3 benchmarks/elementwise_configs.py --out "$OUT/elementwise_configs.json" 2>&1 | tail -120 \
    > "$OUT/elementwise.log"; tail -3 "$OUT/elementwise.log" | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
ls "$OUT"
