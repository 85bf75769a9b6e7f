"""Sampler settings for the shipped tiny model: detector scores on held-out prompts for several
(sampler, scheduler, steps, cfg) settings, one pipeline load, BF16 (float32 on CPU). Picks the
defaults written into the model's metadata; writes JSON to benchmarks/results/.

    python benchmarks/tiny_sampler_sweep.py --n 400 --batch 64 \
        --settings euler/normal/20/8 euler_ancestral/normal/20/8 euler_ancestral/normal/30/8

A setting is `sampler/scheduler/steps/cfg[/shift]` (ComfyUI names; without shift, the model's
default). Every setting sees the same items and the same initial noise (`seed + batch index`, as `sd35fp8 eval`).
"""

from __future__ import annotations

import argparse
import os
import time

from sd35fp8.errors import InputError
from sd35fp8.sampling import check_scheduler, get_sampler
from sd35fp8.tiny import detector, world
from sd35fp8.tiny.evaluate import add_benchmark_args, benchmark_pipeline, generate_items, write_result


def parse_setting(text: str) -> dict:
    parts = text.split("/")
    if len(parts) not in (4, 5):
        raise InputError(f"setting {text!r} is not sampler/scheduler/steps/cfg[/shift]")
    sampler, scheduler, steps, cfg = parts[:4]
    get_sampler(sampler)  # InputError naming the valid ones
    check_scheduler(scheduler)
    shift = float(parts[4]) if len(parts) == 5 else None
    return {"sampler": sampler, "scheduler": scheduler, "steps": int(steps), "cfg": float(cfg), "shift": shift}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", required=True, help="sampler/scheduler/steps/cfg[/shift] ...")
    add_benchmark_args(p, n=400, batch=64)
    args = p.parse_args(argv)
    settings = [parse_setting(s) for s in args.settings]  # checked before loading

    pipe, dev, model = benchmark_pipeline(args)
    size = pipe.defaults.width
    items = world.heldout_prompts(args.n, args.seed)
    rows = []
    for s in settings:
        t0 = time.perf_counter()
        images, sec = generate_items(pipe, items, seed=args.seed, batch=args.batch, size=size, **s)
        agg = detector.aggregate(detector.score_many(images, items, workers=os.cpu_count() or 1))
        rows.append({**s, "scores": agg, "seconds_per_image": sec, "wall_s": time.perf_counter() - t0})
        pc = agg["per_category"]
        shift = s["shift"] or pipe.defaults.shift
        print(f"{s['sampler']:>16} {s['scheduler']:>8} {s['steps']:>3} cfg {s['cfg']:>4} shift {shift}: "
              + " ".join(f"{c} {pc[c]:.3f}" for c in world.CATEGORIES if c in pc) + f"  overall {agg['overall']:.3f}",
              flush=True)
    result = {"benchmark": "tiny_sampler_sweep", "model": str(model), "n": args.n, "seed": args.seed,
              "batch": args.batch, "dtype": str(pipe.dtype).replace("torch.", ""), "settings": rows}
    write_result(result, "tiny_sampler_sweep", dev, args.out)
    return result


if __name__ == "__main__":
    main()
