"""Can the shipped model's VAE carry a colour outside its palette? (why the shipped "brown" LoRA stays low)

    python benchmarks/tiny_vae_colours.py --n 16

For each candidate colour: n single-object training scenes with the object recoloured to it (tiny/concept.py's
recolouring), scored by the concept detector (a blob of the right shape named that colour over the palette +
it) on the renders, on their VAE round trip decode(encode(x)), and (--invert-steps) on decode(z) for z fitted
to the render by Adam from the encoder's latent (tiny/train_lora.invert_latents). A LoRA on the MMDiT and the
text encoders can only produce latents; if the decoder never draws the colour from the latents the LoRA is
trained on, the detector cannot see it. JSON: benchmarks/results/tiny_vae_colours_<device>.json.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from sd35fp8.models.vae import image_to_uint8, to_model_space
from sd35fp8.pipeline import SD35Pipeline
from sd35fp8.tiny import concept, detector, world
from sd35fp8.tiny.evaluate import write_result
from sd35fp8.tiny.train_lora import invert_latents

CANDIDATES = {"brown": (130, 75, 30), "magenta": (230, 30, 230), "lime": (170, 240, 30), "teal": (0, 128, 128),
              "maroon": (128, 0, 0), "olive": (128, 128, 0), "navy": (20, 20, 120), "violet": (200, 150, 255),
              "mint": (150, 255, 180), "gold": (200, 160, 0), "skyblue": (120, 180, 255), "crimson": (170, 0, 70)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--invert-steps", type=int, default=0, help="also score decoder inversions (brown only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pipe = SD35Pipeline.from_pretrained(None, device=args.device, dtype=torch.float32, fp8="none")
    vae = pipe.vae.requires_grad_(False)
    rng = np.random.default_rng(3)
    scenes = [world.sample_scene(rng, "train", mix={"single": 1}) for _ in range(args.n)]
    palette = detector._srgb_to_lab(np.array(list(world.COLOUR_RGB.values()), dtype=np.float64))
    rows = {}
    for name, rgb in CANDIDATES.items():
        extra = {name: rgb}

        def right(image: np.ndarray, scene: world.Scene) -> bool:
            return any(d.shape == scene.objects[0].shape and detector.name_colour(d.rgb, extra=extra) == name
                       for d in detector.detect(image))

        images = []
        for sc in scenes:  # concept._recolour draws the object in NEW_RGB: the candidate's rgb here
            concept.NEW_RGB = rgb
            images.append(concept._recolour(world.render(sc, 128), sc, 0, 128, sc.objects[0].colour))
        x = torch.from_numpy(np.stack(images)).to(args.device).float().movedim(-1, 1) / 127.5 - 1.0  # [n, 3, H, W]
        with torch.no_grad():
            z = to_model_space(vae.encode(x))
            trip = [np.asarray(i) for i in image_to_uint8(vae.decode(vae.encode(x)).float())]
        lab = detector._srgb_to_lab(np.array(rgb, dtype=np.float64))[None]
        rows[name] = {"rgb": list(rgb), "cielab_to_palette": round(float(np.linalg.norm(palette - lab, axis=1).min()), 1),
                      "render": float(np.mean([right(i, s) for i, s in zip(images, scenes)])),
                      "vae_round_trip": float(np.mean([right(i, s) for i, s in zip(trip, scenes)]))}
        if args.invert_steps and name == "brown":
            from sd35fp8.models.vae import to_vae_space

            zi = invert_latents(vae, x, z, args.invert_steps)
            with torch.no_grad():
                inv = [np.asarray(i) for i in image_to_uint8(vae.decode(to_vae_space(zi)).float())]
            rows[name]["decoder_inversion"] = float(np.mean([right(i, s) for i, s in zip(inv, scenes)]))
            rows[name]["inversion_steps"] = args.invert_steps
        print(name, rows[name], flush=True)
    concept.NEW_RGB = CANDIDATES["brown"]
    res = {"n": args.n, "scenes": "world.sample_scene(default_rng(3), 'train', mix={'single': 1})", "colours": rows}
    write_result(res, "tiny_vae_colours", torch.device(args.device), args.out)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
