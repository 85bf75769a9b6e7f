"""One sampling step with a ControlNet vs the plain step: SD3.5 Large + an SD3.5 Large ControlNet, FP8.

    python benchmarks/controlnet.py                       # GPU: Large (38 blocks) + 19-layer ControlNet
    python benchmarks/controlnet.py --tiny --device cpu   # CPU smoke run on tiny random configs

Random weights at the real shapes (the Stability sd3.5_large_controlnet_* form: 19 single-stream
layers of width 2432, each output feeding two joint blocks), 1024² (latent 128), CFG batch 2,
context 333. Both networks quantised with fp8.quantize_model (--mode; the ControlNet's embedders stay
16-bit as the base model's). Times the eager MMDiT forward (models/mmdit.py, the `control=` contract)
alone and with the ControlNet's residuals computed and added; prints a table, writes JSON to
benchmarks/results/.
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mode", default="weight_only", choices=("weight_only", "dynamic", "bf16"))
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
    net = build_controlnet(cfg, layers, dtype, dev, seed=1)
    if a.mode != "bf16":
        quantize_model(base, a.mode)
        quantize_controlnet(net, a.mode)
    x, sigma, ctx, pooled = make_inputs(cfg, 2, a.context_len, latent, dev, dtype, seed=2)
    hint = torch.randn(1, 16, latent, latent, device=dev, dtype=dtype)

    def plain():
        with torch.no_grad():
            return base(x, sigma, ctx, pooled)

    def controlled():
        with torch.no_grad():
            return base(x, sigma, ctx, pooled, control=net(x, sigma, ctx, pooled, hint, base, 1.0))

    t_plain = sorted(time_ms(plain, dev, a.steps, a.warmup))
    t_ctl = sorted(time_ms(controlled, dev, a.steps, a.warmup))
    med = lambda t: t[len(t) // 2]  # noqa: E731
    result = {
        "benchmark": "controlnet_step", "model": "tiny" if a.tiny else "large", "mode": a.mode,
        "controlnet_layers": layers, "latent": latent, "batch": 2, "context_len": a.context_len,
        "plain_ms": med(t_plain), "controlnet_ms": med(t_ctl), "overhead": med(t_ctl) / med(t_plain) - 1.0,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "path": "eager models/mmdit.py forward with control= (the fused engine's per-block add is not timed here)",
    }
    print(f"{'step':24s} {'median ms':>10s}")
    print(f"{'plain (' + a.mode + ')':24s} {result['plain_ms']:10.2f}")
    label = f"+ ControlNet x{layers}"
    print(f"{label:24s} {result['controlnet_ms']:10.2f}   overhead {100 * result['overhead']:.1f} %")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"controlnet_step_{result['model']}_{a.mode}_{device_slug(dev)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
