"""One MMDiT step: sd35fp8 vs diffusers' SD3Transformer2DModel, same random weights, BF16.

For each model (SD3.5 Large, Medium): build our MMDiT on the GPU with random weights, run one step
at 1024x1024 (latent 128x128), batch 2 (cfg), context 333 tokens (77 CLIP + 256 T5); convert the
same weights with diffusers' own converter into SD3Transformer2DModel and compare outputs; then time
both, eager and torch.compile (CUDA events, median), with peak memory. Prints a table and writes
JSON to <out>/bf16_step_<device>.json.

    python benchmarks/mmdit_parity_gpu.py --models large,medium
    python benchmarks/mmdit_parity_gpu.py --tiny --no-compile      # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from results_io import device_slug  # benchmarks/ is this script's folder

from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REL_TOL = 2e-2


def step_flops(cfg: MMDiTConfig, batch: int, n_img: int, n_ctx: int) -> float:
    """Matmul FLOPs of one forward (linears + attention); embeddings and adaLN are negligible."""
    h = cfg.hidden_size
    flops = 2.0 * batch * n_ctx * cfg.context_dim * h
    for i in range(cfg.depth):
        attn2 = i in cfg.x_block_self_attn_layers
        flops += 2.0 * batch * n_img * h * h * (16 if attn2 else 12)
        flops += 2.0 * batch * n_ctx * h * h * (3 if i == cfg.depth - 1 else 12)
        flops += 4.0 * batch * (n_img + n_ctx) ** 2 * h + (4.0 * batch * n_img ** 2 * h if attn2 else 0.0)
    return flops + 2.0 * batch * n_img * h * cfg.patch_size ** 2 * cfg.out_channels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(name: str, fn: Callable[[], torch.Tensor], device: torch.device, args: argparse.Namespace,
            flops: float) -> tuple[dict, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()  # first call (compiles when compiled)
    sync(device)
    first_s = time.perf_counter() - t0
    times = time_ms(fn, device, args.steps, args.warmup)
    med = statistics.median(times)
    row = {
        "contender": name,
        "median_ms": med,
        "min_ms": min(times),
        "first_call_s": first_s,
        "tflops": flops / (med * 1e-3) / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    print(f"  {name:<18} {med:9.2f} ms  (min {min(times):.2f}, first call {first_s:.1f} s)", flush=True)
    return row, out.detach().float()


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    return {
        "rel_l2": ((out - ref).norm() / ref.norm()).item(),
        "max_abs_rel": ((out - ref).abs().max() / ref.abs().max()).item(),
        "ref_std": ref.std().item(),
    }


def build_ours(cfg: MMDiTConfig, dtype: torch.dtype, device: torch.device, seed: int) -> MMDiT:
    with torch.device("meta"):
        model = MMDiT(cfg).to(dtype)
    model.to_empty(device=device)  # allocates once, in the target dtype
    return init_random_(model, torch.Generator(device).manual_seed(seed)).eval().requires_grad_(False)


def build_diffusers(cfg: MMDiTConfig, ours: MMDiT):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    # converter output shares storage with our tensors where it copies, so no second 16 GB copy
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(ours.state_dict()))
    with torch.device("meta"):
        ref = SD3Transformer2DModel(
            sample_size=cfg.pos_embed_max_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
            num_layers=cfg.depth, attention_head_dim=cfg.hidden_size // cfg.num_heads,
            num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
            caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.pooled_dim,
            out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
            dual_attention_layers=cfg.x_block_self_attn_layers, qk_norm="rms_norm" if cfg.qk_norm else None,
        )
    ref.load_state_dict(converted, strict=True, assign=True)
    bad = [n for n, t in list(ref.named_parameters()) + list(ref.named_buffers()) if t.is_meta]
    if bad:
        raise RuntimeError(f"diffusers model left on meta: {bad[:5]}")
    return ref.eval().requires_grad_(False)


def run_model(label: str, cfg: MMDiTConfig, args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype) -> dict:
    latent = args.latent
    g = torch.Generator(device).manual_seed(args.seed + 1)
    x = torch.randn(args.batch, cfg.in_channels, latent, latent, generator=g, device=device).to(dtype)
    sigma = torch.full((args.batch,), 0.75, device=device)
    context = torch.randn(args.batch, args.context_len, cfg.context_dim, generator=g, device=device).to(dtype)
    pooled = torch.randn(args.batch, cfg.pooled_dim, generator=g, device=device).to(dtype)
    n_img = (latent // cfg.patch_size) ** 2
    flops = step_flops(cfg, args.batch, n_img, args.context_len)
    print(f"{label}: {cfg.describe()}\n  latent {latent}x{latent}, batch {args.batch}, context {args.context_len}, "
          f"{flops / 1e12:.1f} TFLOP/step", flush=True)
    rows, outs = [], {}

    with torch.inference_mode():
        ours = build_ours(cfg, dtype, device, args.seed)
        row, outs["ours"] = measure("sd35fp8 eager", lambda m=ours: m(x, sigma, context, pooled), device, args, flops)
        rows.append(row)
        if args.compile:
            compiled = torch.compile(ours, mode=args.compile_mode)
            row, out_c = measure("sd35fp8 compile", lambda: compiled(x, sigma, context, pooled), device, args, flops)
            rows.append(row | {"vs_eager": compare(out_c, outs["ours"])})
            print(f"    compiled vs eager (bf16 noise floor): rel L2 {rows[-1]['vs_eager']['rel_l2']:.2e}")
            del compiled, out_c
            free(device)

        ref = build_diffusers(cfg, ours)
        del ours
        free(device)
        t = sigma * 1000  # diffusers takes the timestep, not sigma

        def ref_step(model=ref):
            return model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                         timestep=t, return_dict=False)[0]

        row, outs["ref"] = measure("diffusers eager", ref_step, device, args, flops)
        rows.append(row)
        if args.compile:
            compiled = torch.compile(ref, mode=args.compile_mode)
            row, out_c = measure("diffusers compile", lambda: ref_step(compiled), device, args, flops)
            rows.append(row | {"vs_eager": compare(out_c, outs["ref"])})
            print(f"    compiled vs eager (bf16 noise floor): rel L2 {rows[-1]['vs_eager']['rel_l2']:.2e}")
            del compiled, out_c
        del ref
        free(device)

    parity = compare(outs["ours"], outs["ref"])
    parity["pass"] = parity["rel_l2"] < REL_TOL
    print(f"  parity vs diffusers: rel L2 {parity['rel_l2']:.2e}, max abs / max|ref| {parity['max_abs_rel']:.2e}, "
          f"ref std {parity['ref_std']:.3f} -> {'PASS' if parity['pass'] else 'FAIL'} (rel L2 < {REL_TOL})", flush=True)
    return {"config": cfg.describe(), "config_fields": {k: v for k, v in vars(cfg).items()},
            "latent": [latent, latent], "batch": args.batch, "context_len": args.context_len,
            "tflop_per_step": flops / 1e12, "parity": parity, "timings": rows}


def print_table(results: dict) -> None:
    print(f"\n{'model':<8} {'contender':<18} {'ms/step':>9} {'TFLOP/s':>8} {'peak GiB':>9}")
    for label, res in results.items():
        for row in res["timings"]:
            mem = f"{row['peak_mem_gib']:.2f}" if row["peak_mem_gib"] is not None else "-"
            print(f"{label:<8} {row['contender']:<18} {row['median_ms']:9.2f} {row['tflops']:8.1f} {mem:>9}")
        p = res["parity"]
        print(f"{label:<8} parity rel L2 {p['rel_l2']:.2e}  max abs rel {p['max_abs_rel']:.2e}  "
              f"{'PASS' if p['pass'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="large,medium", help="comma list of: large, medium")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the JSON")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="eager only")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per contender (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=128, help="latent side (128 = 1024 px)")
    ap.add_argument("--context-len", type=int, default=333, help="77 CLIP + 256 T5 tokens")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny MMDiT-X config, small latent; runs on CPU")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny and no GPU")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        print("error: full-size models need a CUDA GPU; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    if args.tiny:
        configs = {"tiny": MMDiTConfig.tiny()}
        args.latent = min(args.latent, 16)
        args.context_len = min(args.context_len, 77)
    else:
        presets = {"large": MMDiTConfig.large, "medium": MMDiTConfig.medium}
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in presets]
        if unknown:
            print(f"error: unknown model(s) {unknown}; choose from {sorted(presets)}", file=sys.stderr)
            return 2
        configs = {m: presets[m]() for m in names}
    import diffusers

    dtype = DTYPES[args.dtype]
    results = {label: run_model(label, cfg, args, device, dtype) for label, cfg in configs.items()}
    print_table(results)

    report = {
        "benchmark": "mmdit_parity_gpu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": args.dtype,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile_mode": args.compile_mode if args.compile else None,
        "rel_tol": REL_TOL,
        "models": results,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.dtype}_step_{device_slug(device)}{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    return 0 if all(r["parity"]["pass"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
