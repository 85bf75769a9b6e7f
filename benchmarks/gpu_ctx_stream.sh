#!/bin/bash
# One GPU call: the context stream on a second CUDA stream (fast/step.py joint_block `side`, MMDiTEngine
# ctx_stream; SD35FP8_CTX_STREAM=1 on, 0 off). The fused step's CUDA tests with it on, then faster.py large with it,
# without it, and with it again (one warm card).
#   bash benchmarks/gpu_ctx_stream.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_ctx_stream.sh OUTDIR}
LOG=$OUT/ctx_stream.log
source benchmarks/gpu_run.sh
echo "== tests $(date -u +%T)" | tee "$LOG"
SD35FP8_CTX_STREAM=1 timeout 240 python3 -m pytest -q ${TESTS:-tests/test_fast.py tests/test_lora_fused.py tests/test_controlnet_engine.py} 2>&1 \
    | tail -4 | tee -a "$LOG"
run() {
    echo "== SD35FP8_CTX_STREAM=$1 ($2) $(date -u +%T)" | tee -a "$LOG"
    SD35FP8_CTX_STREAM=$1 timeout 100 python3 benchmarks/faster.py large --reps 10 --out "$OUT/faster_$2.json" 2>&1 \
        | grep -E "^step|^profile|^image|^fp8_gemm" | tee -a "$LOG"
}
run 1 on; run 0 off; run 1 on2
echo "== done $(date -u +%T)" | tee -a "$LOG"
