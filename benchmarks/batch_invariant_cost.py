"""CPU cost of batch-invariant rows (models.mmdit.per_row / per_image, used by MMDiT.forward and the fused
engine when model.batch_invariant): one MMDiT step with batch_invariant True (conditioning vectors row by
row, patch embedding image by image) vs False (one batched call each: the code before), interleaved, one
thread, min and median of N steps each (the minimum is the robust number on a shared machine).

Models: the tiny random config (MMDiTConfig.tiny, engine and plain MMDiT; 64x64 px, 154 context tokens)
and the shipped small model through SD35Pipeline's engine (its file's precision, and FP8 dynamic).

    python benchmarks/batch_invariant_cost.py [--steps 15] [--out benchmarks/results/batch_invariant_cost_cpu.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

from sd35fp8.fast import build_engine
from sd35fp8.fp8 import quantize_model
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_


def timed(run, model, args, n: int) -> dict:
    ts = {True: [], False: []}
    with torch.no_grad():
        run(*args)
        for _ in range(n):
            for inv in (False, True):
                model.batch_invariant = inv
                t0 = time.perf_counter()
                run(*args)
                ts[inv].append(time.perf_counter() - t0)
    model.batch_invariant = True
    ms = lambda v: round(v * 1e3, 3)  # noqa: E731
    return {"batched_ms_min": ms(min(ts[False])), "per_row_ms_min": ms(min(ts[True])),
            "batched_ms_median": ms(statistics.median(ts[False])), "per_row_ms_median": ms(statistics.median(ts[True])),
            "overhead_min_pct": round(100 * (min(ts[True]) / min(ts[False]) - 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    res: dict = {}
    cfg = MMDiTConfig.tiny()
    for mode in (None, "dynamic"):
        m = init_random_(MMDiT(cfg), torch.Generator().manual_seed(0)).eval().requires_grad_(False)
        if mode:
            quantize_model(m, mode)
        eng = build_engine(m, "cpu")
        for B in (2, 6, 16):
            g = torch.Generator().manual_seed(1)
            args = (torch.randn(B, 16, 8, 8, generator=g), torch.rand(B, generator=g),
                    torch.randn(B, 154, cfg.context_dim, generator=g), torch.randn(B, cfg.pooled_dim, generator=g))
            for name, run in (("engine", eng), ("plain", m)):
                res[f"tiny random, {mode or 'float32'}, {name}, 64px, B={B}"] = timed(run, m, args, a.steps)
    from sd35fp8.pipeline import SD35Pipeline
    from sd35fp8.tiny import SHIPPED_CHECKPOINT

    for fp8 in (None, "dynamic"):
        pipe = SD35Pipeline.from_pretrained(SHIPPED_CHECKPOINT, device="cpu", fp8=fp8)
        eng = pipe.mmdit
        for size, B in ((64, 2), (64, 6), (128, 2), (128, 16)):
            res[f"shipped, {eng.fp8_mode or 'file precision'}, engine, {size}px, B={B}"] = timed(
                eng, eng.model, eng.warmup_inputs(size, size, B, 154), a.steps)
    out = {"what": __doc__.split("\n\n")[0], "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores shared, "
           "1 torch thread)", "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join(sys.argv), "load_average": os.getloadavg(), "results": res}
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
