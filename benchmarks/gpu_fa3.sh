#!/bin/bash
# One GPU call: FlashAttention-3's FP8 forward against our FP8 attention kernel (benchmarks/attention_fa3.py).
# Carry carry/fa3 alone (the FA3 wheel is 63 MB of the 64 MiB carry limit), downloaded as attention_fa3.py says.
#   bash benchmarks/gpu_fa3.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_fa3.sh OUTDIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/fa3 carry/fa3/*.whl \
    || echo "FA3 wheel install failed"
export PYTHONPATH=$PWD/src:/tmp/fa3 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 300 python3 benchmarks/attention_fa3.py --out "$OUT" 2>&1 | grep -v -i warn | tail -8 | tee "$OUT/attention_fa3.log"
