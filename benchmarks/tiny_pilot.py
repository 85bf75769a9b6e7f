"""Pilot runs for the tiny model's training recipe: several MMDiT training settings, each for the same
wall-clock budget on one shared dataset, each scored on held-out prompts. Picks the recipe of the
real (<= 15 min) run; writes JSON to benchmarks/results/.

    python benchmarks/tiny_pilot.py --minutes 2 --arms p2_b4096_lr2e-3 p1_b2048_lr2e-3 --out DIR

An arm is `p<patch>_b<batch>_lr<lr>` (compiled training step). Every arm starts from scratch (MMDiT and
text towers), takes the VAE and spiece.model of --from (the shipped files), and uses the training
code of `sd35fp8.tiny.train` unchanged (train_mmdit, evaluate).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sd35fp8.models.vae import to_model_space
from sd35fp8.tiny import train
from sd35fp8.tiny.data import make_tokenizer, render_dataset, token_rows
from sd35fp8.tiny.spec import TinySpec

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "sd35fp8" / "tiny" / "weights"
ARM = re.compile(r"p(\d+)_b(\d+)_lr([0-9.e-]+)$")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", required=True)
    p.add_argument("--minutes", type=float, default=2.0, help="MMDiT training budget per arm (compile included)")
    p.add_argument("--n-images", type=int, default=150_000)
    p.add_argument("--eval-items", type=int, default=200)
    p.add_argument("--cfg", type=float, default=6.0)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--from", dest="src", type=Path, default=WEIGHTS / "sd35fp8_tiny.safetensors")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    clock = train.Clock()
    spiece = WEIGHTS / "spiece.model"
    base = TinySpec.from_checkpoint(a.src, 128)
    data = render_dataset(a.n_images, 0, base.image_size, spiece, 16)
    empty = token_rows(make_tokenizer(spiece), "")
    device = torch.device("cuda")
    images = torch.from_numpy(data.images).to(device)
    vae = train.load_vae_from(base, a.src, device)
    latents = to_model_space(train.encode_all(vae, images, device))
    del images
    train.log(f"data ready: {len(data)} images", clock)
    result = {"benchmark": "tiny_pilot", "device": torch.cuda.get_device_name(device),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__}, "minutes_per_arm": a.minutes, "ema": a.ema,
              "n_images": len(data), "eval_items": a.eval_items, "cfg": a.cfg, "arms": {}}
    for arm in a.arms:
        m = ARM.match(arm)
        if not m:
            raise SystemExit(f"arm {arm!r} is not p<patch>_b<batch>_lr<lr>")
        patch, batch, lr = int(m[1]), int(m[2]), float(m[3])
        spec = base.with_patch(patch)
        args = train.parse_args(["--out", str(a.out), "--batch", str(batch), "--lr", str(lr), "--compile",
                                 "--minutes-mmdit", str(a.minutes), "--ema", str(a.ema), "--eval-items",
                                 str(a.eval_items), "--cfg-grid", str(a.cfg), "--workers", "16"])
        rec: dict = {}
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        mmdit, towers = train.train_mmdit(spec, latents, data, empty, args, device, clock, rec)
        rec["train_s"] = round(time.time() - t0, 1)
        rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res = train.evaluate(mmdit, vae, towers, spiece, args, device, spec.image_size, clock)
        res.pop("samples")
        loss = rec.pop("mmdit_loss")
        rec.update(patch=patch, batch=batch, lr=lr, final_loss=loss[-1][2], loss_curve=loss[::10],
                   heldout=res["heldout"], in_distribution=res["in_distribution"])
        result["arms"][arm] = rec
        train.log(f"{arm}: {rec['mmdit_steps']} steps, loss {loss[-1][2]:.4f}, held-out "
                  f"{res['heldout']['per_category']} aspects {res['heldout']['per_aspect']}", clock)
        del mmdit, towers
        torch.cuda.empty_cache()
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "tiny_pilot.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
