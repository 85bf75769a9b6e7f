"""One sampling step with a ControlNet vs the plain step: SD3.5 Large + an SD3.5 Large ControlNet, FP8.

    python benchmarks/controlnet.py --mode dynamic        # GPU: Large (38 blocks) + 19-layer ControlNet
    python benchmarks/controlnet.py --tiny --device cpu   # CPU smoke run on tiny random configs
    python benchmarks/controlnet.py --road eager          # the old measurement: models/mmdit.py forward

Random weights at the real shapes (the Stability sd3.5_large_controlnet_* form: 19 single-stream
layers of width 2432, each output feeding two joint blocks), 1024² (latent 128), CFG batch 2,
context 333. The base model is quantised with fp8.quantize_model (--mode), the ControlNet with
checkpoints.controlnet.quantize_controlnet (--controlnet-mode, default the same; "bf16" keeps it 16-bit,
as a workflow's ControlNetLoader does for a 16-bit file unless asked for FP8).

--road engine (default) times what `sd35fp8 run` / the server do per sampler step with a ControlNet:
the base model as its engine (fast.build_engine: the fused step, FP8 attention where the device has
it, CUDA graphs on CUDA, no compile as `generate`), called through sampling.guidance.CFGDenoiser with
control.ControlApply on the cond and uncond conditionings (one ControlApply shared by both, as
ControlNetApplyAdvanced makes it, so the ControlNet runs once over both CFG rows; on the engine it
runs as fast/controlnet.py's ControlNetEngine: fused FP8 linears, FP8 attention where the base has
it, CUDA graphs on CUDA; its residuals enter the fused step after each joint block). The hint
latent is set directly (no VAE). Rows: plain step, step with the ControlNet, the ControlNet's own
call alone, and its residuals' SQNR against the eager 16-bit net with the same random weights.
--road eager times the eager models/mmdit.py forward with `control=` (the first measurement).
Prints a table, writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mmdit_parity_gpu import build_ours, device_slug, time_ms  # noqa: E402
from speed import make_inputs  # noqa: E402

from sd35fp8.checkpoints.controlnet import quantize_controlnet  # noqa: E402
from sd35fp8.fp8.quantize import quantize_model  # noqa: E402
from sd35fp8.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402
from sd35fp8.models.mmdit import MMDiTConfig  # noqa: E402


def build_controlnet(cfg: MMDiTConfig, layers: int, dtype: torch.dtype, device: torch.device, seed: int) -> ControlNet:
    net_cfg = ControlNetConfig(kind="sd35", num_layers=layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                               pooled_dim=cfg.pooled_dim, control_type=1)
    with torch.device("meta"):
        net = ControlNet(net_cfg).to(dtype)
    net.to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan = p[0].numel() if p.ndim > 1 else 400
            p.copy_((torch.randn(p.shape, generator=g, device=device) / fan ** 0.5).to(dtype))
    return net.eval().requires_grad_(False)


def median(t: list[float]) -> float:
    t = sorted(t)
    return t[len(t) // 2]


def versions() -> dict:
    import sd35fp8
    from results_io import versions as base_versions

    return {**base_versions(), "sd35fp8": getattr(sd35fp8, "__version__", None)}


def engine_road(base, nets: dict, cfg: MMDiTConfig, a, dev: torch.device, dtype: torch.dtype, latent: int,
                layers: int) -> dict:
    """Plain step vs step with each ControlNet in `nets`, through build_engine + CFGDenoiser + ControlApply."""
    from sd35fp8.control import ControlApply
    from sd35fp8.fast import build_engine
    from sd35fp8.fast.controlnet import controlnet_engine
    from sd35fp8.fp8.scaling import sqnr
    from sd35fp8.sampling.guidance import CFGDenoiser, Conditioning
    from sd35fp8.sampling.model_sampling import FlowMatching

    engine = build_engine(base, dev, attention=a.attention)
    print(engine.describe(), flush=True)
    x, sigma, ctx, pooled = make_inputs(cfg, 2, a.context_len, latent, dev, dtype, seed=2)
    x, sigma = x[:1].float(), sigma[:1]  # the sampler's latent: one image, float32
    ms = FlowMatching(3.0)
    hint = torch.randn(1, 16, latent, latent, device=dev, dtype=dtype)

    def applied(net) -> ControlApply:
        apply = ControlApply(net, torch.zeros(1, latent * 8, latent * 8, 3), strength=1.0, vae=object())
        apply._hints[(latent, latent, str(x.device))] = hint  # the VAE-encoded control image, given
        return apply

    def denoiser(apply) -> CFGDenoiser:
        return CFGDenoiser(engine, Conditioning(ctx[:1], pooled[:1], control=apply),
                           Conditioning(ctx[1:], pooled[1:], control=apply), cfg=4.5, model_sampling=ms, dtype=dtype)

    rows = {}
    plain = denoiser(None)
    rows["plain_ms"] = median(time_ms(lambda: plain(x, sigma), dev, a.steps, a.warmup))
    print(f"{'plain step':32s} {rows['plain_ms']:10.2f}", flush=True)
    xx, ss = torch.cat([x, x]).to(dtype), torch.cat([sigma, sigma])
    with torch.no_grad():  # accuracy reference: the eager 16-bit net (same random weights) on the CFG rows
        ref_net = nets["bf16"] if "bf16" in nets else build_controlnet(cfg, layers, dtype, dev, seed=1)
        ref = ref_net.layer_outputs(xx, ss, ctx, pooled, hint, engine.model)
    for name, net in nets.items():
        apply = applied(net)
        d = denoiser(apply)
        rows[f"controlnet_{name}_ms"] = t = median(time_ms(lambda: d(x, sigma), dev, a.steps, a.warmup))
        rows[f"overhead_{name}"] = t / rows["plain_ms"] - 1.0
        with torch.no_grad():  # the residuals reach the output (not a no-op road)
            rows[f"controlnet_{name}_changes_output"] = float((d(x, sigma) - plain(x, sigma)).abs().max())
        print(f"{'+ ControlNet (' + name + ')':32s} {t:10.2f}   overhead {100 * rows[f'overhead_{name}']:.1f} %",
              flush=True)

        def alone():  # what control_residuals runs: the shared ControlApply once over the cond + uncond rows
            apply(xx, ss, ctx, pooled, engine, ms, chunks=2)

        rows[f"controlnet_{name}_alone_ms"] = t = median(time_ms(alone, dev, a.steps, a.warmup))
        print(f"{'  its ControlNet call alone':32s} {t:10.2f}", flush=True)
        cn = controlnet_engine(net, engine)
        rows[f"controlnet_{name}_engine"] = cn.describe()
        with torch.no_grad():  # residual accuracy against the eager 16-bit net, per layer
            got = cn.layer_outputs(xx, ss, ctx, pooled, hint)
            db = [sqnr(r.float(), g.float()) for r, g in zip(ref, got)]
        rows[f"controlnet_{name}_sqnr_db_min"], rows[f"controlnet_{name}_sqnr_db_last"] = min(db), db[-1]
        print(f"{'  residual SQNR vs eager bf16':32s} min {min(db):.1f} dB, last layer {db[-1]:.1f} dB", flush=True)
    rows["engine"] = engine.describe()
    return rows


def eager_road(base, nets: dict, cfg: MMDiTConfig, a, dev: torch.device, dtype: torch.dtype, latent: int,
               layers: int) -> dict:
    x, sigma, ctx, pooled = make_inputs(cfg, 2, a.context_len, latent, dev, dtype, seed=2)
    hint = torch.randn(1, 16, latent, latent, device=dev, dtype=dtype)
    rows = {}

    def plain():
        with torch.no_grad():
            return base(x, sigma, ctx, pooled)

    rows["plain_ms"] = median(time_ms(plain, dev, a.steps, a.warmup))
    print(f"{'plain forward':32s} {rows['plain_ms']:10.2f}", flush=True)
    for name, net in nets.items():
        def controlled():
            with torch.no_grad():
                return base(x, sigma, ctx, pooled, control=net(x, sigma, ctx, pooled, hint, base, 1.0))

        rows[f"controlnet_{name}_ms"] = t = median(time_ms(controlled, dev, a.steps, a.warmup))
        rows[f"overhead_{name}"] = t / rows["plain_ms"] - 1.0
        print(f"{'+ ControlNet (' + name + ')':32s} {t:10.2f}   overhead {100 * rows[f'overhead_{name}']:.1f} %")
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--road", default="engine", choices=("engine", "eager"))
    ap.add_argument("--mode", default="dynamic", choices=("weight_only", "dynamic", "bf16"), help="base model")
    ap.add_argument("--controlnet-mode", action="append", choices=("weight_only", "dynamic", "bf16"),
                    help="ControlNet precision(s) to time (repeatable; default: --mode)")
    ap.add_argument("--attention", default="auto", help="build_engine attention (auto | fp8 | bf16)")
    ap.add_argument("--layers", type=int, default=None, help="ControlNet layers (default: 19 Large, 1 tiny)")
    ap.add_argument("--latent", type=int, default=None, help="latent side (default 128 = 1024 px; tiny 16)")
    ap.add_argument("--context-len", type=int, default=333)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)

    dev = torch.device(a.device)
    cfg = MMDiTConfig.tiny() if a.tiny else MMDiTConfig.large()
    layers = a.layers or (1 if a.tiny else 19)
    latent = a.latent or (16 if a.tiny else 128)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    base = build_ours(cfg, dtype, dev, seed=0)
    if a.mode != "bf16":
        quantize_model(base, a.mode)
    nets = {}
    for mode in a.controlnet_mode or [a.mode]:
        net = build_controlnet(cfg, layers, dtype, dev, seed=1)
        if mode != "bf16":
            quantize_controlnet(net, mode)
        nets[mode] = net
    road = engine_road if a.road == "engine" else eager_road
    rows = road(base, nets, cfg, a, dev, dtype, latent, layers)
    first = next(iter(nets))
    result = {
        "benchmark": "controlnet_step", "model": "tiny" if a.tiny else "large", "mode": a.mode,
        "controlnet_modes": list(nets), "road": a.road, "controlnet_layers": layers, "latent": latent,
        "image": f"{latent * 8}x{latent * 8}", "batch": 2, "context_len": a.context_len,
        "steps_timed": a.steps, "warmup": a.warmup, **rows,
        "controlnet_ms": rows[f"controlnet_{first}_ms"], "overhead": rows[f"overhead_{first}"],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", **versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/controlnet.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "path": ("fast.build_engine (fused step, CUDA graphs on CUDA) through sampling.guidance.CFGDenoiser + "
                 "control.ControlApply (ControlNet as fast.controlnet.ControlNetEngine once over both CFG rows, "
                 "residuals added in the fused step)"
                 if a.road == "engine" else
                 "eager models/mmdit.py forward with control= (the fused engine's per-block add is not timed here)"),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if a.road == "eager" else "_engine"
    path = a.out / f"controlnet_step_{result['model']}_{a.mode}{suffix}_{device_slug(dev)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
