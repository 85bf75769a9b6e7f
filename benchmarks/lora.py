"""LoRA cost on the fused FP8 step: unmerged overhead, swap time, merge time (SD3.5 Large, random weights).

    python benchmarks/lora.py                      # GPU: Large, rank 64 on every linear, 1024², CFG batch 2
    python benchmarks/lora.py --tiny               # CPU smoke: tiny config, 64², rank 8

Rows (median ms per MMDiT step over --steps timed steps after warm-up, same inputs):
- base: the engine's step without LoRA;
- unmerged: the same engine with one rank-R LoRA on every Linear of the MMDiT (the low-rank term inside
  each joint-block FP8 GEMM, lora/fused.py; the adaLN LoRAs grouped; embedders and final layer through
  their hooks, lora/apply.py apply_lora);
- unmerged_separate: the same with SD35FP8_LORA_FUSED=0 (apply_lora after every GEMM, the earlier road);
- merged: the LoRA fused into the FP8 weights (requantised), i.e. the base step's cost;
and the time to switch the active LoRA between two loaded LoRAs (set_active), the first step after
switching to a LoRA not used before (CUDA graph capture: graphs are keyed on the active LoRA set) and
the steps after switching back (replay), to merge (fuse) and to unmerge (unfuse). The unmerged output is checked against the merged one (SQNR), so a LoRA silently
ignored by the step cannot pass as "no overhead". JSON: benchmarks/results/lora_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from sd35fp8.fp8.quantize import quantize_model  # noqa: E402
from sd35fp8.fp8.scaling import sqnr  # noqa: E402
from sd35fp8.lora import LoraSet, fused, parse_lora  # noqa: E402
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_  # noqa: E402
from sd35fp8.tiny.evaluate import write_result  # noqa: E402


def random_lora(model: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """kohya-layout LoRA on every Linear of the MMDiT (embedders and final layer included)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in model.named_modules():
        n_out, k = getattr(mod, "out_features", None), getattr(mod, "in_features", None)
        if n_out is None:
            continue
        stem = "lora_unet_" + name.replace(".", "_")
        sd[stem + ".lora_down.weight"] = (torch.randn(rank, k, generator=g) / k ** 0.5).half()
        sd[stem + ".lora_up.weight"] = (torch.randn(n_out, rank, generator=g) * 0.02).half()
        sd[stem + ".alpha"] = torch.tensor(float(rank))
    return sd


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn, dev, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def timed(fn, dev) -> float:
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return (time.perf_counter() - t0) * 1e3


def profile_step(step, dev) -> list[str]:
    """One step under torch.profiler: the top kernels by device time (a replayed CUDA graph shows as
    one launch, so this is most useful with the graph's kernels visible: run it on an eager engine)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70).splitlines()


def build_engine(model, dev, mode: str, compile_: bool, graphs: bool = True):
    """The MMDiT engine (sd35fp8.fast.build_engine where it exists, else MMDiTEngine)."""
    import sd35fp8.fast as fast

    if hasattr(fast, "build_engine"):
        return fast.build_engine(model, dev, compile=compile_, cuda_graphs=None if graphs else False)
    return fast.MMDiTEngine(model, fp8_mode=mode, compile=compile_, cuda_graphs=False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke size")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--size", type=int, default=None, help="image side in pixels")
    ap.add_argument("--mode", default=None, help="FP8 mode (default dynamic; weight_only off sm_89+)")
    ap.add_argument("--compile", action="store_true", help="compile the engine's blocks")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-graphs", action="store_true", help="no CUDA graphs (kernels visible to --profile)")
    ap.add_argument("--variants", nargs="*", default=[], metavar="DOWN:KTILE",
                    help="also time the unmerged step with other fused-pack options (lora/fused.py "
                         "SD35FP8_LORA_DOWN bf16|fp8, SD35FP8_LORA_KTILE), e.g. fp8:128 bf16:16")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one unmerged step (torch.profiler: top kernels by device time, in the JSON)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = MMDiTConfig.tiny() if args.tiny else MMDiTConfig.large()
    rank = args.rank or (8 if args.tiny else 64)
    size = args.size or (64 if args.tiny else 1024)
    steps = args.steps or (5 if args.tiny else 20)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    mode = args.mode or "dynamic"
    with torch.device("meta"):
        model = MMDiT(cfg)
    model.to_empty(device=dev)
    init_random_(model, torch.Generator(dev).manual_seed(0))
    model = model.to(dtype).eval()
    sd_a, sd_b = random_lora(model, rank, 1), random_lora(model, rank, 2)
    quantize_model(model, mode=mode)
    g = torch.Generator(dev).manual_seed(3)
    lat, ctx_len = size // 8, (154 if args.tiny else 333)
    x = torch.randn(2, cfg.in_channels, lat, lat, generator=g, device=dev).to(dtype)
    sigma = torch.full((2,), 0.75, device=dev)
    ctx = torch.randn(2, ctx_len, cfg.context_dim, generator=g, device=dev).to(dtype)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g, device=dev).to(dtype)

    loras = LoraSet({"mmdit": model}, dtype=dtype)  # slots exist before the engine reads the layers
    t0 = time.perf_counter()
    loras.load(parse_lora(sd_a, "a", cfg.depth, "a"), "a", strength=None)
    loras.load(parse_lora(sd_b, "b", cfg.depth, "b"), "b", strength=None)
    load_ms = (time.perf_counter() - t0) * 1e3 / 2
    loras.set_active({"a": 0.0})  # creates every slot (empty) for the engine to share
    engine = build_engine(model, dev, mode, args.compile, graphs=not args.no_graphs)

    def step():
        with torch.no_grad():
            return engine(x, sigma, ctx, pooled)

    rows = {}
    base_out = step().float()
    rows["base"] = statistics.median(time_ms(step, dev, steps, args.warmup))
    swap = [timed(lambda: loras.set_active({"a": 1.0}), dev)]
    unmerged_out = step().float()
    rows["unmerged"] = statistics.median(time_ms(step, dev, steps, args.warmup))
    kernels = profile_step(step, dev) if args.profile else None
    variant_out = {}
    for v in args.variants:  # the pack options are part of the packs' and the graphs' keys
        down, tile = v.split(":")
        os.environ[fused.DOWN_ENV], os.environ[fused.KTILE_ENV] = down, tile
        variant_out[v] = step().float()
        rows[f"unmerged_{down}_k{tile}"] = statistics.median(time_ms(step, dev, steps, args.warmup))
        del os.environ[fused.DOWN_ENV], os.environ[fused.KTILE_ENV]
    os.environ[fused.ENV] = "0"  # the separate road (apply_lora after each GEMM) on the same engine; the
    separate_out = step().float()  # switch is part of the graphs' key (MMDiTEngine.lora_state)
    rows["unmerged_separate"] = statistics.median(time_ms(step, dev, steps, args.warmup))
    kernels_separate = profile_step(step, dev) if args.profile else None
    del os.environ[fused.ENV]
    first_step_ms, back_step_ms = [], []
    for i in range(3):
        swap.append(timed(lambda: loras.set_active({"b": 1.0}), dev))
        first_step_ms.append(timed(step, dev))  # i = 0: b's first step (CUDA graph capture); then replays
        swap.append(timed(lambda: loras.set_active({"a": 1.0}), dev))
        back_step_ms.append(timed(step, dev))  # back to a: its graph replays
    swapped_out = step().float()
    def fuse():
        loras.fuse()
        getattr(engine, "refresh_weights", lambda: None)()  # the engine re-reads the rewritten weights

    merge_ms = timed(fuse, dev)
    merged_out = step().float()
    rows["merged"] = statistics.median(time_ms(step, dev, steps, args.warmup))
    unmerge_ms = timed(lambda: loras.unfuse(), dev)
    result = {
        "config": "tiny" if args.tiny else "large", "rank": rank, "size": size, "fp8_mode": mode,
        "compile": args.compile, "cuda_graphs": not args.no_graphs, "batch": 2, "context": ctx_len, "engine": type(engine).__name__,
        "step_ms": rows, "unmerged_overhead": rows["unmerged"] / rows["base"] - 1,
        "swap_ms_median": statistics.median(swap), "load_ms_per_lora": load_ms, "merge_ms": merge_ms,
        "unmerge_ms": unmerge_ms,
        "first_step_after_new_lora_ms": first_step_ms[0], "step_after_swap_ms": first_step_ms[1:] + back_step_ms,
        "swapped_back_equals_unmerged": bool(torch.equal(swapped_out, unmerged_out)),
        "sqnr_unmerged_vs_merged_db": sqnr(merged_out, unmerged_out),
        "sqnr_unmerged_separate_vs_merged_db": sqnr(merged_out, separate_out),
        "unmerged_separate_overhead": rows["unmerged_separate"] / rows["base"] - 1,
        "sqnr_base_vs_merged_db": sqnr(merged_out, base_out),
        "pack_options": dict(zip(("down", "k_tile"), fused.pack_options())),
        "variants": {v: {"step_ms": rows[f"unmerged_{v.split(':')[0]}_k{v.split(':')[1]}"],
                         "overhead": rows[f"unmerged_{v.split(':')[0]}_k{v.split(':')[1]}"] / rows["base"] - 1,
                         "sqnr_vs_merged_db": sqnr(merged_out, o)} for v, o in variant_out.items()},
        "lora_params": sum(v.numel() for k, v in sd_a.items() if "lora_" in k),
        "command": "python benchmarks/lora.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    if kernels is not None:
        result["unmerged_profile_top"] = kernels
        result["unmerged_separate_profile_top"] = kernels_separate
        print("\n".join(kernels[:30]))
        print("\n".join(kernels_separate[:20]))
    print(f"{result['config']} rank {rank} {size}px {mode}{' compiled' if args.compile else ''} on {dev}:")
    print("| step | ms |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.2f} |")
    print(f"unmerged overhead {100 * result['unmerged_overhead']:.1f} % (separate road "
          f"{100 * result['unmerged_separate_overhead']:.1f} %, SQNR {result['sqnr_unmerged_separate_vs_merged_db']:.1f} dB), swap {result['swap_ms_median']:.2f} ms, "
          f"merge {merge_ms:.1f} ms, unmerge {unmerge_ms:.1f} ms; SQNR unmerged vs merged "
          f"{result['sqnr_unmerged_vs_merged_db']:.1f} dB (base vs merged {result['sqnr_base_vs_merged_db']:.1f} dB)")
    if result["sqnr_unmerged_vs_merged_db"] <= result["sqnr_base_vs_merged_db"] + 3:
        raise SystemExit("the unmerged LoRA does not reach the step's output: the engine ignores the slots")
    write_result(result, "lora", dev, args.out)
    return result


if __name__ == "__main__":
    main()
