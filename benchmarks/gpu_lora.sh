#!/bin/bash
# The one GPU call of helper lora2 (issue 21): train the shipped LoRA, evaluate it, time LoRA and
# ControlNet on SD3.5 Large. Every step has its own time limit and writes into OUTDIR as it ends.
#   bash benchmarks/gpu_lora.sh OUTDIR          # one H200, about 6 minutes
#   bash benchmarks/gpu_lora.sh OUTDIR tiny     # CPU dry run of the same commands at toy sizes
# Its run of 2026-12-04 (results/gpu_lora_nvidia-h200.log) had 5.5 minutes: limits (120 90 75 30),
# --minutes 1.5 then counted from the training loop's start and the combine step had 15 s, so the
# training was stopped at step ~200 (0.44 s/step at batch 64) before writing its file, the combine
# step ran out of time, and lora.py hit the graph-pool bug fixed since (fast/graphs.py clear). The
# limits below are for the next run; they have not run on a GPU yet.
set -o pipefail
OUT=${1:?usage: gpu_lora.sh OUTDIR [tiny]}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
LOG=$OUT/log.txt
LORA=src/sd35fp8/tiny/weights/sd35fp8_tiny_brown_lora.safetensors
if [ "$2" = tiny ]; then
    DEV=cpu; LIM=(600 600 600 600); TRAIN="--steps 3 --batch 2 --n-images 8 --minutes 3"
    EVAL="--n 4 --n-base 4 --batch 4 --steps 3"; LBENCH="--tiny --steps 2 --warmup 1"
    CN="--tiny --device cpu --steps 2 --warmup 1"; LORA_OUT=$OUT/trained_lora.safetensors
else
    DEV=cuda; LIM=(300 120 120 60); TRAIN="--steps 500 --batch 64 --n-images 3000 --minutes 4.5"
    EVAL="--n 104 --n-base 104 --batch 52"; LBENCH=""; CN="--mode dynamic"; LORA_OUT=$LORA
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$LOG"
fi
echo "== train $(date -u +%T)" | tee -a "$LOG"
timeout ${LIM[0]} python3 -m sd35fp8.tiny.train_lora --device $DEV $TRAIN --rank 16 --lr 3e-3 --threads 8 \
    --out "$LORA_OUT" 2>&1 | tee -a "$LOG"
cp "$LORA_OUT" "$OUT/" 2>/dev/null
echo "== evaluate $(date -u +%T)" | tee -a "$LOG"
timeout ${LIM[1]} python3 benchmarks/tiny_lora.py --device $DEV $EVAL --lora "$LORA_OUT" --threads 8 2>&1 | tee -a "$LOG"
timeout 90 python3 benchmarks/tiny_lora.py --device $DEV $EVAL --lora "$LORA_OUT" --combine --out "$OUT/tiny_lora.json" 2>&1 \
    | tee -a "$LOG"
echo "== lora.py $(date -u +%T)" | tee -a "$LOG"
timeout ${LIM[2]} python3 benchmarks/lora.py $LBENCH --out "$OUT/lora.json" 2>&1 | tee -a "$LOG"
echo "== controlnet.py $(date -u +%T)" | tee -a "$LOG"
timeout ${LIM[3]} python3 benchmarks/controlnet.py $CN --out "$OUT" 2>&1 | tee -a "$LOG"
echo "== done $(date -u +%T)" | tee -a "$LOG"
