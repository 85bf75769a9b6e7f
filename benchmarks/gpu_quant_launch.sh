#!/bin/bash
# One GPU call: the FP8 attention's quantisation passes' launch meta (fast/attention_triton.py AMAX_LAUNCH,
# QUANT_LAUNCH). benchmarks/elementwise_configs.py sweeps BLOCK_L x num_warps at Large's shapes, with and
# without the qk-norm; the config of each pass with the least time summed over both is written into
# attention_triton.py here (on this copy of the tree only), the FP8 attention and step tests run with it,
# then faster.py large runs with it, with the file as it came, and with it again.
#   bash benchmarks/gpu_quant_launch.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_quant_launch.sh OUTDIR}
TINY=benchmarks/results/faster_tiny_euler_cpu.json
LOG=$OUT/quant_launch.log
A=src/sd35fp8/fast/attention_triton.py
source benchmarks/gpu_run.sh
python3 benchmarks/elementwise_configs.py --out "$OUT/elementwise.json" 2>&1 | tee "$LOG"
cp "$A" /tmp/attention_base.py
python3 - "$OUT/elementwise.json" "$A" <<'PY' 2>&1 | tee -a "$LOG"
import json, re, sys
res = json.load(open(sys.argv[1]))["kernels"]
path = sys.argv[2]
s = open(path).read()
for name, const in (("attention_amax", "AMAX_LAUNCH"), ("attention_quantize", "QUANT_LAUNCH")):
    both = {}
    for r in res[name] + res[name + "_no_norm"]:
        both.setdefault((r["BLOCK_L"], r["num_warps"]), []).append(r["ms"])
    bl, nw = min((k for k, v in both.items() if len(v) == 2), key=lambda k: sum(both[k]))
    best = {"BLOCK_L": bl, "num_warps": nw, "ms": both[(bl, nw)]}
    s = re.sub(rf"^{const} = .*$", f'{const} = {{"BLOCK_L": {best["BLOCK_L"]}, "num_warps": {best["num_warps"]}}}', s,
               flags=re.M)
    print("chosen", const, best)
open(path, "w").write(s)
PY
cp "$A" /tmp/attention_new.py
echo "== tests $(date -u +%T)" | tee -a "$LOG"
timeout 200 python3 -m pytest -q tests/test_attention_triton.py tests/test_fast.py 2>&1 | tail -2 | tee -a "$LOG"
run() {
    echo "== $1 $(date -u +%T)" | tee -a "$LOG"
    python3 benchmarks/faster.py large --reps 10 --tiny-json $TINY --out "$OUT/faster_$1.json" 2>&1 \
        | grep -E "^step|^profile|^image|^fp8_quantize|^triton_fp8" | tee -a "$LOG"
}
run new
cp /tmp/attention_base.py "$A"; run base
cp /tmp/attention_new.py "$A"; run new2
