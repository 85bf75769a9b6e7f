"""The shipped LoRA ("brown", tiny/concept.py) on the shipped model: detector scores in float32 / BF16,
FP8 unmerged and FP8 merged, and the base model's own score with strength 0 and after unloading.

    python benchmarks/tiny_lora.py --device cpu --n 24 --n-base 24

Concept items: "a photo of a brown <shape>" over the 8 shapes (right = a blob of that shape named
brown over the palette + brown). Base items: the world's held-out evaluation (world.heldout_prompts,
detector.score). Every configuration uses the same seeds and the shipped file's sampler defaults.
JSON: benchmarks/results/tiny_lora_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sd35fp8.pipeline import SD35Pipeline, shipped_model_path
from sd35fp8.tiny import concept, detector, world
from sd35fp8.tiny.evaluate import generate_items, write_result
from sd35fp8.tiny.train_lora import LORA_NAME

SHIPPED_LORA = Path(__file__).resolve().parents[1] / "src" / "sd35fp8" / "tiny" / "weights" / LORA_NAME


def run(pipe, prompts, args) -> list[np.ndarray]:
    d = pipe.defaults
    items = [SimpleNamespace(caption=p) for p in prompts]
    images, _ = generate_items(pipe, items, args.seed, args.batch, d.steps, d.cfg, d.sampler, d.scheduler,
                               args.size)
    return images


def concept_score(images, shapes) -> dict:
    right = [concept.concept_correct(im, s) for im, s in zip(images, shapes)]
    colours = [concept.colour_hits(im) for im in images]
    return {"score": float(np.mean(right)), "right": int(sum(right)), "n": len(right),
            "brown_anywhere": float(np.mean(["brown" in c for c in colours]))}


def base_score(images, items) -> dict:
    agg = detector.aggregate([detector.score(im, it) for im, it in zip(images, items)])
    return {"accuracy": agg["accuracy"], "overall": agg["overall"], "per_category": agg["per_category"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", type=Path, default=SHIPPED_LORA)
    ap.add_argument("--n", type=int, default=24, help="concept items (3 per shape at 24)")
    ap.add_argument("--n-base", type=int, default=24, help="held-out items of the base evaluation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fp8", default="dynamic", help="FP8 mode of the FP8 rows")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    shapes, concept_prompts = zip(*concept.concept_prompts(args.n))
    base_items = world.heldout_prompts(args.n_base, args.seed)
    base_prompts = [it.caption for it in base_items]
    res: dict = {"lora": args.lora.name, "lora_bytes": args.lora.stat().st_size, "n_concept": args.n,
                 "n_base": args.n_base, "concept": {}, "base_eval": {}, "identical_pixels": {}}

    pipe = SD35Pipeline.from_pretrained(shipped_model_path(), device=dev)
    res["precision"] = str(pipe.dtype).replace("torch.", "")
    hi = res["precision"]
    d = pipe.defaults
    res["sampling"] = {"steps": d.steps, "cfg": d.cfg, "sampler": d.sampler, "scheduler": d.scheduler}
    base_imgs = run(pipe, base_prompts, args)
    res["base_eval"]["base"] = base_score(base_imgs, base_items)
    res["concept"][f"base_{hi}"] = concept_score(run(pipe, concept_prompts, args), shapes)
    print("base:", res["concept"][f"base_{hi}"], res["base_eval"]["base"], flush=True)

    pipe.load_lora_weights(args.lora, adapter_name="brown", weight=0.0)
    zero = run(pipe, base_prompts, args)
    res["base_eval"]["lora_strength_0"] = base_score(zero, base_items)
    res["identical_pixels"]["strength_0"] = all(np.array_equal(a, b) for a, b in zip(zero, base_imgs))
    pipe.set_adapters("brown", 1.0)
    res["concept"][f"lora_{hi}"] = concept_score(run(pipe, concept_prompts, args), shapes)
    res["base_eval"]["lora_strength_1"] = base_score(run(pipe, base_prompts, args), base_items)
    print("lora:", res["concept"][f"lora_{hi}"], res["base_eval"]["lora_strength_1"], flush=True)
    pipe.unload_lora_weights()
    after = run(pipe, base_prompts, args)
    res["base_eval"]["after_unload"] = base_score(after, base_items)
    res["identical_pixels"]["after_unload"] = all(np.array_equal(a, b) for a, b in zip(after, base_imgs))

    pipe8 = SD35Pipeline.from_pretrained(shipped_model_path(), device=dev, fp8=args.fp8)
    res["concept"][f"base_fp8_{args.fp8}"] = concept_score(run(pipe8, concept_prompts, args), shapes)
    pipe8.load_lora_weights(args.lora, adapter_name="brown")
    res["concept"][f"lora_fp8_{args.fp8}_unmerged"] = concept_score(run(pipe8, concept_prompts, args), shapes)
    t1 = time.perf_counter()
    pipe8.fuse_lora()
    res["merge_seconds"] = time.perf_counter() - t1
    res["concept"][f"lora_fp8_{args.fp8}_merged"] = concept_score(run(pipe8, concept_prompts, args), shapes)
    res["seconds"] = time.perf_counter() - t0
    print(" | ".join(f"{k} {v['score']:.3f}" for k, v in res["concept"].items()))
    print("base eval accuracy:", {k: round(v["accuracy"], 3) for k, v in res["base_eval"].items()},
          "identical:", res["identical_pixels"])
    write_result(res, "tiny_lora", dev, args.out)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
