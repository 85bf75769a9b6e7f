#!/bin/bash
# One GPU call: benchmarks/gemm_shapes.py (the Large step's GEMMs shape by shape; image + context GEMMs separate /
# grouped / on two streams), benchmarks/attention_tma.py (FP8 attention with TMA loads, with and without
# warp_specialize, against the library kernel), the fused step's CUDA tests, then faster.py large once.
#   bash benchmarks/gpu_gemm_shapes.sh   (writes under $OUT)
set -o pipefail
source benchmarks/gpu_run.sh
echo "== gemm shapes $(date -u +%T)"
timeout 240 python3 benchmarks/gemm_shapes.py --out $OUT/gemm_shapes.json 2>&1 | grep -v -i warn | tail -30
echo "== attention tma $(date -u +%T)"
timeout 150 python3 benchmarks/attention_tma.py --out $OUT/attention_tma.json 2>&1 | grep -v -i warn | tail -12
echo "== tests $(date -u +%T)"
timeout 200 python3 -m pytest -q tests/test_fast.py tests/test_attention_triton.py 2>&1 | tail -2
echo "== faster $(date -u +%T)"
timeout 100 python3 benchmarks/faster.py large --reps 10 --out "$OUT/faster.json" 2>&1 \
    | grep -E "^step|^profile|^image|^fp8_gemm|^triton_fp8" 
echo "== done $(date -u +%T)"
