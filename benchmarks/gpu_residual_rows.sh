#!/bin/bash
# One GPU call: rows per program of the residual-LN kernel (fast/kernels.py RESIDUAL_LN_ROWS). The row kernels'
# sweep (benchmarks/elementwise_configs.py --only rows) times 1 / 2 / 4 / 8 rows a program; the fastest whose
# codes equal one row's is written into kernels.py here (on this copy of the tree only), the fused step's CUDA
# tests run with it, then faster.py large runs with it and with the file as it came.
#   [TESTS=...] bash benchmarks/gpu_residual_rows.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_residual_rows.sh OUTDIR}
LOG=$OUT/residual_rows.log
K=src/sd35fp8/fast/kernels.py
source benchmarks/gpu_run.sh
timeout 150 python3 benchmarks/elementwise_configs.py --only rows --out "$OUT/elementwise_rows.json" 2>&1 | tee "$LOG"
cp "$K" /tmp/kernels_base.py
python3 - "$OUT/elementwise_rows.json" "$K" <<'PY' 2>&1 | tee -a "$LOG"
import json, re, sys
rows = [r for r in json.load(open(sys.argv[1]))["kernels"]["residual_ln_rows"] if r["same_codes"]]
best = min(rows, key=lambda r: r["ms"])
s = open(sys.argv[2]).read()
s = re.sub(r"^RESIDUAL_LN_ROWS = .*$", f"RESIDUAL_LN_ROWS = {best['rows']}", s, flags=re.M)
open(sys.argv[2], "w").write(s)
print("chosen RESIDUAL_LN_ROWS", best["rows"], f"{best['ms'] * 1000:.1f} us", {r["rows"]: round(r["ms"] * 1000, 1) for r in rows})
PY
cp "$K" /tmp/kernels_new.py
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 200 python3 -m pytest -q ${TESTS:-tests/test_fast.py tests/test_attention_triton.py tests/test_lora_fused.py} 2>&1 \
    | tail -3 | tee -a "$LOG"
run() {
    echo "== $1 $(date -u +%T)" | tee -a "$LOG"
    timeout 120 python3 benchmarks/faster.py large --reps 10 --out "$OUT/faster_$1.json" 2>&1 \
        | grep -E "^step|^profile|^image|^fp8_quantize|^triton_fp8|^fp8_gemm" | tee -a "$LOG"
}
run new
cp /tmp/kernels_base.py "$K"; run base
cp /tmp/kernels_new.py "$K"
echo "== done $(date -u +%T)" | tee -a "$LOG"
