"""FP8 accuracy of one MMDiT step and of T5-XXL, against our BF16, at the real configs.

For SD3.5 Large and Medium (random weights, realistic init via init_random_): one step at 1024x1024
(latent 128x128), CFG batch 2, context 333 tokens; SQNR of the FP8 output vs BF16 for weight_only,
dynamic, static (calibrated on a few random inputs drawn like real ones) and static with a policy
measured here (per-layer sensitivity, `--sensitivity`); weight bytes in each mode; the calibration
gain over dynamic. T5-XXL (d_model 4096, 24 layers, 64 heads, d_ff 10240, vocab 32128; transformers'
init) on 2x256 tokens. FP8 layers are built one at a time from the BF16 model (fp8_swapped): peak
memory is BF16 + FP8 weights. Prints a table and writes JSON to
benchmarks/results/fp8_accuracy_<device>.json.

    python benchmarks/fp8_accuracy.py                       # GPU: Large, Medium, T5-XXL
    python benchmarks/fp8_accuracy.py --sensitivity --write-policy src/sd35fp8/fp8/policies/sd35_default.json
    python benchmarks/fp8_accuracy.py --tiny                # CPU smoke test
Bars: single-step Large SQNR >= 22 dB in every mode, T5 >= 22 dB, MMDiT FP8 bytes <= 52% of BF16.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch
from results_io import device_slug, versions as base_versions  # benchmarks/ is this script's folder
from torch import nn

from sd35fp8.checkpoints.fp8_load import patch_t5_for_fp8
from sd35fp8.fp8.calibrate import ActivationStats, fp8_swapped
from sd35fp8.fp8.policy_sd35 import (default_policy, default_t5_policy, measure_sensitivity, policy_from_sensitivity,
                                     predicted_sqnr, write_policy)
from sd35fp8.fp8.quantize import Policy, model_weight_bytes
from sd35fp8.fp8.scaling import amax_to_scale, sqnr
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

BAR_DB = 22.0
BAR_BYTES = 0.52


def mmdit_inputs(cfg: MMDiTConfig, latent: int, n_ctx: int, device, dtype, seed: int) -> tuple:
    """Drawn like real ones: unit-variance noisy latents, sigma in (0,1), CLIP part of the context
    ~N(0,1) on 2048 features zero-padded to 4096, T5 part ~N(0,0.2), pooled ~N(0,1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, latent, latent, generator=g)
    sigma = torch.rand(1, generator=g).expand(2) * 0.9 + 0.05
    ctx = torch.zeros(2, n_ctx, cfg.context_dim)
    n_clip = min(77, n_ctx // 2) if n_ctx < 333 else 77
    ctx[:, :n_clip, : cfg.context_dim // 2] = torch.randn(2, n_clip, cfg.context_dim // 2, generator=g)
    ctx[:, n_clip:] = 0.2 * torch.randn(2, n_ctx - n_clip, cfg.context_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype if t.is_floating_point() and t is not sigma else None)
                 for t in (x, sigma, ctx, pooled))


@torch.no_grad()
def static_scales(model: nn.Module, calls: list[tuple]) -> dict[str, float]:
    stats = ActivationStats(model)
    try:
        for c in calls:
            model(*c)
    finally:
        stats.remove()
    return {n: float(amax_to_scale(torch.tensor(a))) for n, a in stats.amax_floats().items()}


@torch.no_grad()
def bench_mmdit(name: str, cfg: MMDiTConfig, device, dtype, latent: int, n_ctx: int, args) -> dict:
    t0 = time.time()
    with torch.device("meta"):
        model = MMDiT(cfg)
    model.to_empty(device=device)
    init_random_(model, torch.Generator(device=device).manual_seed(0))
    model.to(dtype).eval()
    calib = [mmdit_inputs(cfg, latent, n_ctx, device, dtype, s) for s in (1, 2, 3)]
    test = mmdit_inputs(cfg, latent, n_ctx, device, dtype, 100)
    ref = model(*test).float()
    bf16_bytes = model_weight_bytes(model)
    policy = default_policy()
    scales = static_scales(model, calib)
    row: dict = {"model": name, "config": cfg.describe(), "bf16_bytes": bf16_bytes, "modes": {}}
    runs = [("weight_only", {}), ("dynamic", {}), ("static", {"input_scales": scales})]
    for mode, kw in runs:
        with fp8_swapped(model, mode, policy, "channel", **kw):
            out = model(*test).float()
            row["modes"][mode] = {"sqnr_db": sqnr(ref, out), "bytes": model_weight_bytes(model)}
        del out
    if args.sensitivity:
        layers = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        sens = measure_sensitivity(model, [test], "dynamic", layers=layers)
        pol, info = policy_from_sensitivity(sens, args.budget_db, max_keep=args.max_keep)
        with fp8_swapped(model, "static", pol, "channel", input_scales=scales):
            out = model(*test).float()
            row["modes"]["static+policy"] = {"sqnr_db": sqnr(ref, out), "bytes": model_weight_bytes(model)}
        row["policy"] = info
        row["policy_keep"] = list(pol.keep)
        if args.write_policy and name == args.policy_from:
            write_policy(args.write_policy, pol, info, f"{name} random weights (init_random_), {latent * 8}px, "
                         f"{n_ctx} ctx tokens, {device_slug(device)}, dynamic per-layer sensitivity")
    m = row["modes"]
    row["calibration_gain_db"] = m["static"]["sqnr_db"] - m["dynamic"]["sqnr_db"]
    row["fp8_bytes_fraction"] = m["dynamic"]["bytes"] / bf16_bytes
    row["seconds"] = time.time() - t0
    del model, calib, test, ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


@torch.no_grad()
def bench_t5(device, dtype, tiny: bool, tokens: int, args) -> dict:
    from transformers import T5Config, T5EncoderModel

    dims = dict(d_model=64, d_kv=16, d_ff=160, num_layers=2, num_heads=4, vocab_size=128) if tiny else \
        dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128)
    cfg = T5Config(**dims, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                   dropout_rate=0.0, relative_attention_num_buckets=32)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built and initialised in `dtype`: no float32 copy (T5-XXL: 19 GB)
    try:
        with torch.device(device):
            model = T5EncoderModel(cfg).to(dtype).eval()  # transformers' T5 init
    finally:
        torch.set_default_dtype(default)
    patch_t5_for_fp8(model)
    ids = torch.randint(0, cfg.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0)).to(device)

    def run(m: nn.Module) -> torch.Tensor:
        return m(input_ids=ids).last_hidden_state.float()

    ref = run(model)
    row = {"model": "t5xxl" if not tiny else "t5-tiny", "bf16_bytes": model_weight_bytes(model), "modes": {}}

    def measure(label: str, mode: str, policy: Policy) -> None:
        with fp8_swapped(model, mode, policy, "channel"):
            row["modes"][label] = {"sqnr_db": sqnr(ref, run(model)), "bytes": model_weight_bytes(model),
                                   "kept_layers": len(policy.keep)}

    for mode in ("weight_only", "dynamic"):
        measure(mode, mode, Policy(keep=()))
    shipped = default_t5_policy(cfg.num_layers)
    if shipped.keep:
        for mode in ("weight_only", "dynamic"):
            measure(f"{mode}+shipped policy", mode, shipped)
    if args.sensitivity:  # T5's default FP8 mode is weight_only (fp8_load.load_t5_fp8): its policy comes from it
        layers = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        sens = measure_sensitivity(model, run, "weight_only", layers=layers)
        # Noise powers do not add in T5 (measured: 17.6 dB all-FP8 vs 12.7 dB predicted), so the number of
        # kept layers is found by measurement: the fewest least-robust layers that bring the output SQNR
        # to the target (binary search; SQNR grows with every layer kept, up to rounding).
        ranked = [n for n, _ in sorted(sens, key=lambda r: r[1])]
        tries: list[dict] = []

        def measured(k: int) -> float:
            with fp8_swapped(model, "weight_only", Policy(keep=tuple(ranked[:k])), "channel"):
                got = sqnr(ref, run(model))
            tries.append({"kept": k, "measured_db": round(got, 2)})
            return got

        lo, hi = 0, len(ranked)  # measured(hi) meets the target (all 16-bit); find the least such k
        while lo < hi:
            mid = (lo + hi) // 2
            if measured(mid) >= args.t5_budget_db:
                hi = mid
            else:
                lo = mid + 1
        pol = Policy(keep=tuple(ranked[:hi]))
        info = {"budget_db": args.t5_budget_db, "predicted_sqnr_all_fp8_db": round(predicted_sqnr(sens), 2),
                "kept": list(pol.keep), "per_layer_sqnr_db": {n: round(v, 2) for n, v in sorted(sens, key=lambda r: r[1])},
                "search": sorted(tries, key=lambda t: t["kept"])}
        for mode in ("weight_only", "dynamic"):
            measure(f"{mode}+policy", mode, pol)
        row["policy"] = info
        if args.write_t5_policy:
            write_policy(args.write_t5_policy, pol, {"num_layers": cfg.num_layers, **info},
                         f"T5-XXL random weights (transformers' init), {tokens} tokens x2, {device_slug(device)}, "
                         "weight_only per-layer sensitivity")
    del model
    gc.collect()
    return row


def versions() -> dict:
    import transformers

    return {**base_versions(), "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs, CPU float32 (smoke test)")
    p.add_argument("--models", default="large,medium")
    p.add_argument("--no-t5", action="store_true")
    p.add_argument("--sensitivity", action="store_true", help="measure per-layer sensitivity -> policy")
    p.add_argument("--budget-db", type=float, default=30.0, help="policy target output SQNR (dB)")
    p.add_argument("--max-keep", type=int, default=12, help="most layers the policy keeps 16-bit")
    p.add_argument("--write-policy", default=None, help="write the measured policy JSON here")
    p.add_argument("--policy-from", default="large", help="which model's measurement --write-policy uses")
    p.add_argument("--t5-budget-db", type=float, default=23.0,
                   help="T5 policy target: measured output SQNR (dB) of weight_only FP8 with the kept layers")
    p.add_argument("--write-t5-policy", default=None, help="write the measured T5 policy JSON here")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.tiny:
        configs = {"tiny": MMDiTConfig.tiny()}
        latent, n_ctx, t5_tokens = 8, 12, 16
        if args.policy_from == "large":
            args.policy_from = "tiny"
    else:
        configs = {n: getattr(MMDiTConfig, n)() for n in args.models.split(",") if n not in ("", "none")}
        latent, n_ctx, t5_tokens = 128, 333, 256
    rows = [bench_mmdit(n, c, device, dtype, latent, n_ctx, args) for n, c in configs.items()]
    if not args.no_t5:
        rows.append(bench_t5(device, dtype, args.tiny, t5_tokens, args))

    print(f"{'model':10} {'mode':14} {'SQNR dB':>8} {'weights GiB':>12} {'of bf16':>8}")
    ok = True
    for r in rows:
        print(f"{r['model']:10} {'bf16':14} {'ref':>8} {r['bf16_bytes'] / 2**30:12.3f} {'100%':>8}")
        for mode, m in r["modes"].items():
            frac = m["bytes"] / r["bf16_bytes"]
            print(f"{'':10} {mode:14} {m['sqnr_db']:8.2f} {m['bytes'] / 2**30:12.3f} {frac:8.1%}")
            if r["model"] == "large" and m["sqnr_db"] < BAR_DB:
                ok = False
        if r["model"] == "t5xxl":  # the bar holds for the mode and policy T5 loads with (weight_only + policy)
            best = max(m["sqnr_db"] for mode, m in r["modes"].items() if mode.startswith("weight_only"))
            ok = ok and best >= BAR_DB
        if "calibration_gain_db" in r:
            print(f"{'':10} static - dynamic: {r['calibration_gain_db']:+.2f} dB")
            if r["model"] == "large" and r["fp8_bytes_fraction"] > BAR_BYTES:
                ok = False
    result = {"device": device_slug(device), "dtype": str(dtype).replace("torch.", ""), "versions": versions(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "latent": latent, "context_tokens": n_ctx, "t5_tokens": t5_tokens, "bars": {
                  "sqnr_db": BAR_DB, "bytes_fraction": BAR_BYTES, "met": ok}, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"fp8_accuracy_{'tiny_' if args.tiny else ''}{device_slug(device)}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"bars {'met' if ok else 'NOT met'}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
