#!/bin/bash
# One GPU call: the FP8 attention's P8 modes x block configs (benchmarks/attention_variants.py) at Large's
# joint shape; the FP8 attention / fused-step CUDA tests in the fastest mode; then faster.py large with the
# kernel as it was (P8 cast, q quantised by the pass), with q quantised in the attention kernel
# (SD35FP8_ATTN_FUSE_Q=1), and with that plus the fastest P8 mode.
#   bash benchmarks/gpu_attn_variants.sh OUTDIR
OUT=${1:?usage: gpu_attn_variants.sh OUTDIR}
LOG=$OUT/attn_variants.log
TINY=benchmarks/results/faster_tiny_euler_cpu.json
source benchmarks/gpu_run.sh
timeout 240 python3 benchmarks/attention_variants.py --out "$OUT/variants.json" 2>&1 | grep -v -i warn | tee "$LOG"
BEST=$(python3 -c "
import json, sys
try:
    b = json.load(open('$OUT/variants.json'))['best']
    ok = {m: r for m, r in b.items() if r['sqnr_emulation_db'] > 35}
    print(min(ok, key=lambda m: ok[m]['ms']))
except Exception as e:
    print('cast')")
echo "== fastest P8 mode: $BEST; tests $(date -u +%T)" | tee -a "$LOG"
SD35FP8_ATTN_P8=$BEST timeout 150 python3 -m pytest -q -x tests/test_attention_triton.py tests/test_fast.py 2>&1 \
    | tail -4 | tee -a "$LOG"
run() {
    echo "== P8=$1 FUSE_Q=$2 $(date -u +%T)" | tee -a "$LOG"
    SD35FP8_ATTN_P8=$1 SD35FP8_ATTN_FUSE_Q=$2 timeout 100 python3 benchmarks/faster.py large --reps 10 \
        --tiny-json $TINY --out "$OUT/faster_$1_q$2.json" 2>&1 \
        | grep -E "^step|^profile|^image|^fp8_quantize|^triton_fp8|^ +[a-z_/]+ +[0-9.]+ ms" | tee -a "$LOG"
}
run cast 0; run cast 1; run $BEST 1
