#!/bin/bash
# The short form of gpu_session31.sh for a call with little device time left: the Large step with and without
# the adaLN memo and the padded rows (benchmarks/ada_pad_step.py), then the two GPU tests.
#   bash benchmarks/gpu_session31_short.sh OUTDIR
# carry carry/fa3 (benchmarks/fa3_carry.sh) for FA3 as auto's attention, or nothing (our FP8 attention kernel then).
# The tracked tree (~42 MiB) plus carry/fa3 (~22 MiB) is just over the 64 MiB a call takes: leave the four
# benchmarks/results/tiny_eval_* PNG / large JSON files out of the working tree for that call (do not commit that).
set -o pipefail
OUT=${1:?usage: gpu_session31_short.sh OUTDIR}
source benchmarks/gpu_run.sh
source benchmarks/fa3_setup.sh
timeout 170 python3 benchmarks/ada_pad_step.py --out "$OUT/ada_pad_step.json" 2>&1 | tee "$OUT/ada_pad_step.log" \
    | grep -E "^step|^adaln|^wrote|Error|error"
timeout 40 python3 -m pytest -q tests/test_ada_memo.py tests/test_pad_rows.py -k gpu -rf 2>&1 | tail -6
