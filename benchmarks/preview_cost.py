"""What live previews cost a Large image: 20 euler steps at 1024x1024 (CFG batch 2, random FP8-dynamic weights,
the fused engine on auto's attention, CUDA graphs), sampled with no previews, with ComfyUI's Latent2RGB frame
after every step (`--preview-method latent2rgb`: one 128x128 JPEG a step), and with the OpenAI stream's three
partial images (`partial_images=3`: three decodes by the compiled VAE). One process, the three side by side.

    python benchmarks/preview_cost.py [--reps 3] [--out FILE]   # CUDA only

Writes benchmarks/results/preview_cost_<device>.json (device, versions, date, seconds per road, overhead).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from results_io import device_slug, versions  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("preview_cost.py needs a CUDA device")
    from e2e import fill_random_  # noqa: E402
    from faster import random_large_mmdit  # noqa: E402

    from sd35fp8.fast import build_engine
    from sd35fp8.fast.weights import auto_attention
    from sd35fp8.generation import SampleSettings, decode, sample
    from sd35fp8.models.mmdit import MMDiTConfig
    from sd35fp8.models.vae import SD3VAE, VAEConfig, to_vae_space
    from sd35fp8.sampling import Conditioning
    from sd35fp8.workflow.previews import StepPreview

    dev = torch.device("cuda")
    cfg = MMDiTConfig.large()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 154, cfg.context_dim, generator=g).to(dev, torch.bfloat16)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g).to(dev, torch.bfloat16)
    mmdit, _ = random_large_mmdit(dev)
    eng = build_engine(mmdit, dev, attention_backend=auto_attention(dev, "dynamic"))
    with torch.device("meta"):
        vae = SD3VAE(VAEConfig.sd3()).eval()
    vae.to_empty(device=dev)
    fill_random_(vae, torch.Generator(device=dev).manual_seed(1)).to(torch.bfloat16)
    vae.compile_decoder()

    def vae_image(z: torch.Tensor) -> torch.Tensor:  # denoised, model space -> IMAGE [1, H, W, 3]
        img = decode(vae, to_vae_space(z.float()).to(torch.bfloat16))
        return ((img.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    cond, uncond = Conditioning(ctx[:1].clone(), pooled[:1].clone()), Conditioning(ctx[1:].clone(), pooled[1:].clone())
    latent = torch.zeros(1, 16, 128, 128, device=dev)
    st = SampleSettings(steps=20, cfg=4.5, sampler="euler", scheduler="normal", shift=3.0)
    sent: list = []

    def road(preview: StepPreview | None):
        def callback(step, total, denoised):
            if preview is not None:
                preview(step, total, denoised, lambda event, data: sent.append((event, len(data["image"]))))
        return callback if preview is not None else None

    roads = {"none": lambda: None, "latent2rgb": lambda: StepPreview("latent2rgb"),
             "partial_images_3": lambda: StepPreview("none", 3, vae_image)}
    seconds, frames = {}, {}
    with torch.inference_mode():
        for name, make in roads.items():  # warm-up: capture, compile the decoder's shapes
            sample(eng, cond, uncond, latent, st, seed=1, dtype=torch.bfloat16, callback=road(make()))
        torch.cuda.synchronize()
        for name, make in roads.items():
            times = []
            for _ in range(args.reps):
                sent.clear()
                t0 = time.perf_counter()
                sample(eng, cond, uncond, latent, st, seed=1, dtype=torch.bfloat16, callback=road(make()))
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            seconds[name] = statistics.median(times)
            frames[name] = {"events": len(sent), "bytes": sum(n for _, n in sent)}
    base = seconds["none"]
    res = {"device": device_slug(dev), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "versions": versions(), "attention": eng.attention_backend,
           "config": {"model": "Large", "weights": "random fp8 dynamic", "size": 1024, "steps": 20, "cfg_batch": 2},
           "sampling_s": seconds, "frames": frames,
           "overhead_ms_per_step": {k: (v - base) * 1000 / 20 for k, v in seconds.items()}}
    print(f"{'road':<18}{'sampling s':>12}{'+ms/step':>10}{'events':>8}")
    for k, v in seconds.items():
        print(f"{k:<18}{v:>12.3f}{res['overhead_ms_per_step'][k]:>10.2f}{frames[k]['events']:>8}")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"preview_cost_{res['device']}.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
