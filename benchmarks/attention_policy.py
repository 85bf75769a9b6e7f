"""Measure which joint blocks of the shipped model should keep 16-bit attention under FP8 attention
(fp8/attention_policy.py), on the CPU: FP8 attention is the kernel's torch emulation (`fp8_emulated`).

Inputs are the MMDiT calls of real sampling runs (the shipped model's defaults, --prompts held-out captions,
16-bit attention, CFG batches), so every sigma of the schedule is represented. Prints the per-block output
SQNR, the all-FP8 SQNR and the policy at --budget; writes JSON to --out; --write adds or replaces the shipped
model's entry in src/sd35fp8/fp8/policies/attention_default.json.

    python benchmarks/attention_policy.py [--prompts 8] [--budget 30] [--write]      # CPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from results_io import write_json  # benchmarks/ is this script's folder

from sd35fp8.fast.step import MMDiTEngine
from sd35fp8.fp8 import attention_policy as ap
from sd35fp8.pipeline import SD35Pipeline, shipped_model_path
from sd35fp8.tiny import world

POLICY = Path(__file__).resolve().parents[1] / "src" / "sd35fp8" / "fp8" / "policies" / ap.POLICY_FILE


def trajectory_inputs(pipe, prompts: list[str], seed: int) -> list[tuple]:
    """The (x, sigma, context, pooled) of every MMDiT call while the pipeline samples `prompts`."""
    calls = []
    hook = pipe.mmdit.register_forward_pre_hook(lambda mod, args: calls.append(tuple(a.clone() for a in args[:4])))
    try:
        pipe(prompts, seed=seed, progress=False)
    finally:
        hook.remove()
    return calls


def main(argv=None) -> int:
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--prompts", type=int, default=8)
    ap_.add_argument("--seed", type=int, default=0)
    ap_.add_argument("--budget", type=float, default=30.0, help="predicted output SQNR the policy reaches (dB)")
    ap_.add_argument("--max-keep", type=int, default=1)
    ap_.add_argument("--out", default="benchmarks/results")
    ap_.add_argument("--write", action="store_true", help="update the shipped attention policy file")
    args = ap_.parse_args(argv)
    torch.manual_seed(args.seed)
    pipe = SD35Pipeline.from_pretrained(shipped_model_path(), device="cpu", attention="bf16")
    items = world.eval_items(args.prompts, seed=args.seed + 1000)  # not the score's held-out draw (seed 0)
    inputs = trajectory_inputs(pipe, [it.caption for it in items], args.seed)
    model = pipe.mmdit.model

    def build(blocks):
        return MMDiTEngine(model, pipe.mmdit.fp8_mode, attention_backend="fp8_emulated", attention_16bit_blocks=blocks)

    sens = ap.measure_attention_sensitivity(build, inputs, len(model.joint_blocks))
    blocks, info = ap.attention_policy(sens["per_block_sqnr_db"], args.budget, args.max_keep)
    print(f"{len(inputs)} MMDiT calls from {args.prompts} prompts; output SQNR against 16-bit attention:")
    for i, s in sens["per_block_sqnr_db"].items():
        print(f"  FP8 attention in block {i} only: {s:6.2f} dB")
    print(f"  every block FP8: {sens['all_fp8_sqnr_db']:.2f} dB (predicted from the blocks: "
          f"{sens['predicted_all_fp8_db']:.2f}); policy at {args.budget} dB: 16-bit blocks {blocks}, predicted "
          f"{info['predicted_sqnr_with_policy_db']} dB")
    entry = {"model": "shipped tiny model", "config": ap.config_key(model.config), "attention_16bit_blocks": blocks,
             "measured": {"calls": len(inputs), "prompts": args.prompts, "budget_db": args.budget,
                          "max_keep": args.max_keep, **{k: (v if k != "per_block_sqnr_db" else
                                                            {str(b): round(x, 2) for b, x in v.items()})
                                                        for k, v in sens.items()},
                          "predicted_with_policy_db": info["predicted_sqnr_with_policy_db"],
                          "command": "python benchmarks/attention_policy.py " + " ".join(argv or sys.argv[1:])}}
    write_json(args.out, "attention_policy_tiny", entry, "cpu")
    if args.write:
        data = json.loads(POLICY.read_text())
        data["models"] = [e for e in data["models"] if e["config"] != entry["config"]] + [entry]
        POLICY.write_text(json.dumps(data, indent=1) + "\n")
        print("updated", POLICY)
    return 0


if __name__ == "__main__":
    sys.exit(main())
