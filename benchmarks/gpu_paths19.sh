#!/bin/bash
# One GPU call for issue 19's evidence: the FP8 attention tests (the dynamic path's q / k norm bound), then
# benchmarks/paths.py over every road. If the attention tests fail, the committed attention module from
# carry/attn_old (when carried) is put back first, so the roads are still measured on working code.
#   bash benchmarks/gpu_paths19.sh OUTDIR
OUT=${1:?usage: gpu_paths19.sh OUTDIR}
mkdir -p "$OUT"
source benchmarks/gpu_run.sh
echo "== attention tests $(date -u +%T)"
if ! timeout 150 python3 -m pytest -q -x tests/test_attention_triton.py > "$OUT/attention_tests.log" 2>&1; then
    tail -30 "$OUT/attention_tests.log"
    if [ -f carry/attn_old/attention_triton.py ]; then
        echo "attention tests failed: measuring the roads with carry/attn_old"
        cp carry/attn_old/attention_triton.py src/sd35fp8/fast/attention_triton.py
    fi
fi
tail -2 "$OUT/attention_tests.log"
echo "== paths $(date -u +%T)"
timeout ${PATHS_S:-450} python3 benchmarks/paths.py --budget-s ${BUDGET_S:-420} --work /tmp/pw --out "$OUT" 2>&1 \
    | grep -v Warning | tail -22
echo "== done $(date -u +%T)"
