#!/bin/bash
# One GPU call for issue 19's evidence: the FP8 attention tests (the dynamic path's q / k norm bound), then
# benchmarks/paths.py over every road (server wheels from carry/wheels, see gpu_run.sh).
#   bash benchmarks/gpu_paths19.sh OUTDIR
OUT=${1:?usage: gpu_paths19.sh OUTDIR}
mkdir -p "$OUT"
source benchmarks/gpu_run.sh
echo "== attention tests $(date -u +%T)"
timeout 150 python3 -m pytest -q -x tests/test_attention_triton.py > "$OUT/attention_tests.log" 2>&1 \
    || tail -30 "$OUT/attention_tests.log"
tail -2 "$OUT/attention_tests.log"
echo "== paths $(date -u +%T)"
timeout ${PATHS_S:-450} python3 benchmarks/paths.py --budget-s ${BUDGET_S:-420} --work /tmp/pw --out "$OUT" 2>&1 \
    | grep -v Warning | tail -22
echo "== done $(date -u +%T)"
