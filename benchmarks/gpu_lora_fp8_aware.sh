#!/bin/bash
# Issue 21, "FP8 within 2 points of BF16": the shipped brown LoRA fine-tuned around the FP8 engine's rounding
# (train_lora --init SHIPPED --fp8-aware: fp8/fake_quant.py, straight-through, QLoRA-style), then every
# variant scored on the concept at 416 items in BF16, FP8 dynamic unmerged and FP8 dynamic merged.
#   bash benchmarks/gpu_lora_fp8_aware.sh OUTDIR          # one H100 / H200, ~500 s
#   bash benchmarks/gpu_lora_fp8_aware.sh OUTDIR tiny     # CPU dry run at toy sizes
# FP8_AWARE_VARIANTS="name:options;..." replaces the variant list; FP8_AWARE_SEED: the evaluation's sampling seed.
set -o pipefail
OUT=${1:?usage: gpu_lora_fp8_aware.sh OUTDIR [tiny]}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/log.txt
T0=$(date +%s)
SHIPPED=src/sd35fp8/tiny/weights/sd35fp8_tiny_brown_lora.safetensors
if [ "$2" = tiny ]; then
    export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
    DEV=cpu; LIM=(600 300); THREADS=1
    TAIL="--steps 2"  # after the variants' options: later ones win
    TRAIN="--steps 2 --batch 2 --n-images 8 --invert-steps 2 --invert-batch 4 --workers 1 --save-every 0"
    EVAL="--n 4 --n-base 4 --batch 4 --steps 3"
else
    source benchmarks/gpu_run.sh > "$OUT/preamble.txt" 2>&1
    tee -a "$LOG" < "$OUT/preamble.txt"
    DEV=cuda; LIM=(330 150); THREADS=4
    # the shipped recipe's data (3000 images, the brown ones decoder-inverted, reg 0.07), fewer steps from its weights
    TRAIN="--batch 128 --n-images 3000 --invert-steps 40 --invert-batch 256 --invert-seconds 120 --invert-region image \
        --invert-reg 0.07 --minutes 5.2 --workers 5 --save-every 0"
    EVAL="--n 416 --n-base 8 --batch 104"
fi
VARIANTS=(
    "all_lr5e4:--fp8-aware all --steps 2000 --lr 5e-4"
    "all_lr1e3:--fp8-aware all --steps 2000 --lr 1e-3"
    "half_lr1e3:--fp8-aware all --fp8-aware-p 0.5 --steps 2000 --lr 1e-3"
)
if [ -n "$FP8_AWARE_VARIANTS" ]; then IFS=';' read -r -a VARIANTS <<< "$FP8_AWARE_VARIANTS"; fi
SEED=${FP8_AWARE_SEED:-0}
echo "== train ${#VARIANTS[@]} variants from $SHIPPED $(date -u +%T)" | tee -a "$LOG"
for v in "${VARIANTS[@]}"; do
    name=${v%%:*}; extra=${v#*:}
    ( timeout ${LIM[0]} python3 -m sd35fp8.tiny.train_lora --device $DEV --rank 32 --init $SHIPPED $TRAIN $extra $TAIL \
        --threads $THREADS --out "$OUT/lora_$name.safetensors" > "$OUT/train_$name.log" 2>&1
      echo "rc $?" >> "$OUT/train_$name.log" ) &
done
wait
for v in "${VARIANTS[@]}"; do
    name=${v%%:*}; echo "-- train $name: ${v#*:}" | tee -a "$LOG"; tail -n 4 "$OUT/train_$name.log" | tee -a "$LOG"
    rm -f "$OUT/train_$name.log"
done
echo "== evaluate (seed $SEED) $(date -u +%T) ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"
for v in shipped "${VARIANTS[@]}"; do
    name=${v%%:*}; file=$OUT/lora_$name.safetensors; [ $name = shipped ] && file=$SHIPPED
    [ -f "$file" ] || continue
    for part in lora fp8 fp8_merged; do
        timeout ${LIM[1]} python3 benchmarks/tiny_lora.py --device $DEV $EVAL --seed $SEED --parts $part \
            --threads $THREADS --lora "$file" --work "$OUT/parts_$name" > /dev/null 2>&1 &
    done
done
wait
python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'variant':14s} {'bf16':>6s} {'fp8':>6s} {'merged':>6s} {'d_fp8':>6s} {'d_merged':>8s}")
for d in sorted(out.glob("parts_*")):
    s = {}
    for f in d.glob("*.json"):
        s.update({k.split("_")[-1] if "fp8" in k else "bf16": v["score"] for k, v in json.loads(f.read_text())["concept"].items()})
    g = lambda k: s.get(k, float("nan"))
    print(f"{d.name[6:]:14s} {g('bf16'):6.3f} {g('unmerged'):6.3f} {g('merged'):6.3f} "
          f"{100 * (g('unmerged') - g('bf16')):+6.1f} {100 * (g('merged') - g('bf16')):+8.1f}")
EOF
rm -rf "$OUT"/parts_*
echo "== done $(date -u +%T) ($(( $(date +%s) - T0 )) s)" | tee -a "$LOG"
