#!/bin/bash
# One GPU call: FlashAttention-3's FP8 forward against our FP8 attention kernel (benchmarks/attention_fa3.py).
# Carry carry/fa3 alone (benchmarks/fa3_carry.sh: the wheel's 300 MB .so as 23 MB of xz; the tree and the carry
# share 64 MiB). benchmarks/gpu_session27.sh runs FA3 inside the step (faster.py).
#   bash benchmarks/gpu_fa3.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_fa3.sh OUTDIR}
source benchmarks/gpu_run.sh
source benchmarks/fa3_setup.sh
timeout 300 python3 benchmarks/attention_fa3.py --out "$OUT" 2>&1 | grep -v -i warn | tail -8 | tee "$OUT/attention_fa3.log"
