"""Where along the trajectory the tiny model fails: held-out captions are generated img2img from the
world's own render of the caption's scene (the right answer) at several `denoise` strengths, with the
model's defaults otherwise, and scored by the detector. denoise 1.0 is plain text-to-image; at low
denoise the model only has to keep and sharpen a correct layout. A score that stays high down to
denoise d and falls above it says the model fails in the noisier part of the schedule (layout and
shape formation); a score low even at small d says it fails at the detail end. Writes JSON.

    python benchmarks/tiny_denoise_probe.py --n 200 --denoise 1.0 0.9 0.8 0.7 0.5 --device cpu
"""

from __future__ import annotations

import argparse
import os
import numpy as np
import torch

from sd35fp8.tiny import detector, world
from sd35fp8.tiny.evaluate import add_benchmark_args, benchmark_pipeline, write_result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_args(p, n=200, batch=50)
    p.add_argument("--denoise", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.5])
    a = p.parse_args(argv)
    pipe, dev, model = benchmark_pipeline(a)
    size = pipe.defaults.width
    items = world.heldout_prompts(a.n, a.seed)
    renders = [world.render(it.scene, size) for it in items]  # uint8 [H, W, 3]
    rows = {}
    for d in a.denoise:
        images = []
        for b, start in enumerate(range(0, len(items), a.batch)):
            chunk = items[start:start + a.batch]
            x = torch.from_numpy(np.stack(renders[start:start + a.batch])).permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]
            out = pipe([it.caption for it in chunk], seed=a.seed + b, denoise=d, image=None if d >= 1.0 else x,
                       progress=False)
            images.extend(np.asarray(im.convert("RGB")) for im in out.images)
        agg = detector.aggregate(detector.score_many(images, items, workers=os.cpu_count() or 1))
        rows[str(d)] = agg
        pc = agg["per_category"]
        print(f"denoise {d:.2f}: " + " ".join(f"{c} {pc[c]:.3f}" for c in world.CATEGORIES if c in pc)
              + f" overall {agg['overall']:.3f} | shape {agg['per_aspect']['shape']:.3f}", flush=True)
    d = pipe.defaults
    result = {"benchmark": "tiny_denoise_probe", "model": str(model), "n": a.n, "seed": a.seed,
              "defaults": {"sampler": d.sampler, "steps": d.steps, "cfg": d.cfg, "scheduler": d.scheduler},
              "by_denoise": rows}
    write_result(result, "tiny_denoise_probe", dev, a.out)
    return result


if __name__ == "__main__":
    main()
