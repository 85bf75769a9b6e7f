#!/bin/bash
# One GPU call (session 23), most important first:
#  1. the FP8 attention kernel with its key-block loop rotated (PIPE) against the plain loop (attention_pipe.py);
#  2. GPU tests: the attention kernels with the best rotated tile, the context stream's (same output bit for bit);
#  3. faster.py large with neither, the context stream, the rotated loop (one warm card);
#  4. the VAE decode four ways (vae_decode.py), the context stream's GEMMs in Triton (gemm_small.py), faster.py with
#     the context stream and the rotated loop together, padded-N GEMMs (gemm_pad.py).
#   bash benchmarks/gpu_session23.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_session23.sh OUTDIR}
LOG=$OUT/session23.log
source benchmarks/gpu_run.sh
echo "== attention pipe $(date -u +%T)" | tee "$LOG"
timeout 200 python3 benchmarks/attention_pipe.py --out "$OUT" 2>&1 | grep -v -i warn | tail -12 | tee -a "$LOG"
# the fastest rotated tile (BLOCK_M,BLOCK_N,warps,stages), without maxnreg
PIPE=$(python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = [r for f in pathlib.Path(sys.argv[1]).glob("attention_pipe*.json") for r in json.loads(f.read_text())["rows"]]
pipe = [r for r in rows if r["kernel"] == "pipelined" and "ms" in r and r["tile"][4] is None and r.get("identical", True)]
print(",".join(map(str, min(pipe, key=lambda r: r["ms"])["tile"][:4])) if pipe else "")
PY
)
echo "== best rotated tile: '$PIPE' $(date -u +%T)" | tee -a "$LOG"
SD35FP8_ATTN_PIPE=$PIPE timeout 100 python3 -m pytest -q tests/test_attention_triton.py 2>&1 | tail -2 | tee -a "$LOG"
SD35FP8_CTX_STREAM=1 timeout 100 python3 -m pytest -q tests/test_fast.py -k ctx_stream 2>&1 | tail -2 | tee -a "$LOG"
run() {
    echo "== ctx stream $1, pipe '$2' ($3) $(date -u +%T)" | tee -a "$LOG"
    SD35FP8_CTX_STREAM=$1 SD35FP8_ATTN_PIPE=$2 timeout 110 python3 benchmarks/faster.py large --reps 10 \
        --out "$OUT/faster_$3.json" 2>&1 | grep -E "^step|^profile|^image|^fp8_gemm|^triton_fp8" | tee -a "$LOG"
}
run 0 "" base
run 1 "" ctx
[ -n "$PIPE" ] && run 0 "$PIPE" pipe
echo "== vae decode $(date -u +%T)" | tee -a "$LOG"
timeout 150 python3 benchmarks/vae_decode.py --out "$OUT" 2>&1 | grep -v -i warn | tail -6 | tee -a "$LOG"
echo "== gemm small $(date -u +%T)" | tee -a "$LOG"
timeout 90 python3 benchmarks/gemm_small.py --out "$OUT" 2>&1 | grep -v -i warn | tail -6 | tee -a "$LOG"
[ -n "$PIPE" ] && run 1 "$PIPE" both
echo "== gemm pad $(date -u +%T)" | tee -a "$LOG"
timeout 60 python3 benchmarks/gemm_pad.py --out "$OUT" 2>&1 | grep -v -i warn | tail -10 | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
