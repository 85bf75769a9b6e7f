#!/bin/bash
# One GPU call (session 28): the GPU test of live previews and the OpenAI stream's partial images on the serving
# road (compiled engine, CUDA graphs), then what previews cost a Large image (benchmarks/preview_cost.py).
# Carry carry/wheels alone (the server wheels and the openai client with its dependencies: python -m pip download
# openai httpx --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d carry/wheels).
#   bash benchmarks/gpu_session28.sh OUTDIR
set -o pipefail
OUT=${1:?usage: gpu_session28.sh OUTDIR}
LOG=$OUT/session28.log
source benchmarks/gpu_run.sh
# (no FA3 this call: the tree and both carries pass 64 MiB)
echo "== tests $(date -u +%T)" | tee "$LOG"
timeout 170 python3 -m pytest -q tests/test_previews.py -k gpu -rf -p no:cacheprovider 2>&1 | tail -15 | tee -a "$LOG"
echo "== preview cost $(date -u +%T)" | tee -a "$LOG"
timeout 150 python3 benchmarks/preview_cost.py --out "$OUT/preview_cost.json" 2>&1 | tail -12 | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
ls "$OUT"
