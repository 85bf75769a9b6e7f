#!/bin/bash
# One GPU call that retrains both shipped adapters of the tiny model and evaluates them (session 11):
# the "brown" LoRA (issue 21) and the Canny ControlNet (issue 20), trained side by side on one GPU (both are
# launch-bound: the GPU has room for two), then both evaluations side by side. Every step has its own time
# limit and checkpoints into OUTDIR, so a limit still leaves weights.
#   bash benchmarks/gpu_tiny_adapters.sh OUTDIR          # one H200, about 7 minutes
#   bash benchmarks/gpu_tiny_adapters.sh OUTDIR tiny     # CPU dry run of the same commands at toy sizes
set -o pipefail
OUT=${1:?usage: gpu_tiny_adapters.sh OUTDIR [tiny]}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$2" = tiny ]; then
    DEV=cpu; LIM=(900 900); LT="--steps 3 --batch 2 --n-images 20 --workers 2"
    CT="--n-train 20 --steps 3 --batch 2 --workers 2"; LE="--n 2 --n-base 2 --batch 2 --steps 2"
    CE="--eval-n 2 --eval-steps 2"
else
    DEV=cuda; LIM=(270 150)
    LT="--steps 4000 --batch 128 --n-images 8000 --lr 1e-3 --minutes 3.6 --profile 5"
    CT="--n-train 12000 --steps 6000 --batch 128 --lr 1e-3 --minutes 4.0"
    LE="--n 104 --n-base 104 --batch 52"; CE="--eval-n 200 --eval-steps 20"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
echo "== train $(date -u +%T)"
timeout ${LIM[0]} python3 -m sd35fp8.tiny.train_lora --device $DEV $LT --threads 4 --out "$OUT/lora.safetensors" \
    >"$OUT/lora_train.log" 2>&1 &
timeout ${LIM[0]} python3 -m sd35fp8.tiny.train_controlnet --device $DEV $CT --eval-n 0 \
    --out "$OUT/controlnet.safetensors" >"$OUT/controlnet_train.log" 2>&1
wait
tail -n 3 "$OUT/lora_train.log" "$OUT/controlnet_train.log"
echo "== evaluate $(date -u +%T)"
( timeout ${LIM[1]} python3 benchmarks/tiny_lora.py --device $DEV $LE --lora "$OUT/lora.safetensors" --threads 4 \
    && timeout 60 python3 benchmarks/tiny_lora.py --device $DEV $LE --lora "$OUT/lora.safetensors" --combine \
    --out "$OUT/tiny_lora.json" ) >"$OUT/lora_eval.log" 2>&1 &
timeout ${LIM[1]} python3 -m sd35fp8.tiny.train_controlnet --device $DEV --eval-only $CE \
    --out "$OUT/controlnet.safetensors" --result "$OUT/controlnet_eval.json" >"$OUT/controlnet_eval.log" 2>&1
wait
tail -n 6 "$OUT/lora_eval.log" "$OUT/controlnet_eval.log"
echo "== done $(date -u +%T)"
