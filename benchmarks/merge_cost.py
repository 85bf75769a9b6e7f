"""What a model merge costs at the Large config: ModelMergeSimple (ratio 0.5) of two random SD3.5 Large MMDiTs in
FP8 dynamic mode, resident on the GPU, through the node (workflow/engine.merge_models: every weight dequantised,
blended in float32, quantised again as the merged model loads, a new engine built). Reports the seconds, the GPU
memory the merge adds (its peak above the two inputs, and what the merged engine keeps), and one step of each engine
(1024², CFG batch 2) with the merged step's SQNR against the float32 forward of ComfyUI's merged weights.

    python benchmarks/merge_cost.py [--out FILE]   # CUDA only

Writes benchmarks/results/merge_cost_<device>.json (device, versions, date, numbers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from results_io import RESULTS, device_slug, versions  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def random_large(dev: torch.device, seed: int):
    from e2e import stack_configs  # noqa: E402  (random nets shaped like trained ones)

    from sd35fp8.fp8 import quantize_model
    from sd35fp8.fp8.policy_sd35 import default_policy
    from sd35fp8.models.mmdit import MMDiT, init_random_

    with torch.device("meta"):
        mmdit = MMDiT(stack_configs(False)["mmdit"]).eval()
    mmdit.to_empty(device=dev)
    init_random_(mmdit, torch.Generator(device=dev).manual_seed(seed))
    mmdit.to(torch.bfloat16)
    quantize_model(mmdit, "dynamic", policy=default_policy())
    return mmdit


def step_ms(engine, inputs, reps: int = 5) -> float:
    with torch.no_grad():
        for _ in range(3):
            engine(*inputs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            engine(*inputs)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("merge_cost.py needs a CUDA device")
    from sd35fp8.checkpoints.merge import ModuleSource, base_mmdit
    from sd35fp8.fp8.scaling import sqnr
    from sd35fp8.models.mmdit import MMDiT, MMDiTConfig
    from sd35fp8.workflow.engine import EngineOptions, SD3Model, merge_models
    from sd35fp8.checkpoints.merge import ratio_strengths

    dev = torch.device("cuda")
    cfg = MMDiTConfig.large()
    options = EngineOptions()
    m1 = SD3Model(options.mmdit(random_large(dev, 0), dev), name="a")
    m2 = SD3Model(options.mmdit(random_large(dev, 1), dev), name="b")
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, cfg.in_channels, 128, 128, generator=g).to(dev, torch.bfloat16),
              torch.full((2,), 0.5, device=dev),
              torch.randn(2, 154, cfg.context_dim, generator=g).to(dev, torch.bfloat16),
              torch.randn(2, cfg.pooled_dim, generator=g).to(dev, torch.bfloat16))
    base_ms = step_ms(m1.mmdit, inputs)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    merged = merge_models(m1, m2, ratio_strengths(0.5), "ModelMergeSimple", dev, torch.bfloat16, options)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - before
    kept = torch.cuda.memory_allocated() - before
    merged_ms = step_ms(merged.mmdit, inputs)
    # the float32 forward of ComfyUI's merged weights (w1 * 0.5 + 0.5 * w2), built key by key
    s1, s2 = ModuleSource(base_mmdit(m1.mmdit), "a"), ModuleSource(base_mmdit(m2.mmdit), "b")
    with torch.device("meta"):
        ref = MMDiT(cfg).eval()
    ref.to_empty(device=dev)
    with torch.no_grad():
        for k, p in ref.state_dict().items():
            p.copy_(s1.get(k, dev).float() * 0.5 + 0.5 * s2.get(k, dev).float())
        want = ref(*(t.float() for t in inputs)).float()
        got = merged.mmdit(*inputs).float()
    result = {
        "device": device_slug(dev), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "versions": versions(),
        "config": {"model": "Large", "weights": "random fp8 dynamic (two seeds)", "node": "ModelMergeSimple 0.5",
                   "size": 1024, "cfg_batch": 2},
        "merge_s": seconds, "merge_peak_gib": peak / 2**30, "merged_engine_gib": kept / 2**30,
        "step_ms": {"model1": base_ms, "merged": merged_ms},
        "merged_step_sqnr_db_vs_float32_merge": sqnr(want, got),
    }
    print(f"merge {seconds:.1f} s, peak +{peak / 2**30:.2f} GiB, kept +{kept / 2**30:.2f} GiB; step model1 "
          f"{base_ms:.2f} ms, merged {merged_ms:.2f} ms; merged SQNR {result['merged_step_sqnr_db_vs_float32_merge']:.2f} dB")
    out = Path(args.out) if args.out else RESULTS / f"merge_cost_{device_slug(dev)}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
