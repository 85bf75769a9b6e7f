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
import json
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
    images, _ = generate_items(pipe, items, args.seed, args.batch, args.steps or d.steps, d.cfg, d.sampler,
                               d.scheduler, args.size)
    return images


def concept_score(images, shapes) -> dict:
    right = [concept.concept_correct(im, s) for im, s in zip(images, shapes)]
    colours = [concept.colour_hits(im) for im in images]
    return {"score": float(np.mean(right)), "right": int(sum(right)), "n": len(right),
            "brown_anywhere": float(np.mean(["brown" in c for c in colours]))}


def base_score(images, items) -> dict:
    agg = detector.aggregate([detector.score(im, it) for im, it in zip(images, items)])
    return {"accuracy": agg["accuracy"], "overall": agg["overall"], "per_category": agg["per_category"]}


def part_base(args, dev, res) -> None:
    """Without any LoRA: the concept's base level and the base evaluation (images kept for later)."""
    pipe = SD35Pipeline.from_pretrained(shipped_model_path(), device=dev)
    hi = str(pipe.dtype).replace("torch.", "")
    res["concept"][f"base_{hi}"] = concept_score(run(pipe, args.concept_prompts, args), args.shapes)
    base_imgs = run(pipe, args.base_prompts, args)
    res["base_eval"]["base"] = base_score(base_imgs, args.base_items)
    np.savez_compressed(args.cache, np.stack(base_imgs))


def part_lora(args, dev, res) -> None:
    """The LoRA in the pipeline's precision on the concept."""
    pipe = SD35Pipeline.from_pretrained(shipped_model_path(), device=dev)
    hi = str(pipe.dtype).replace("torch.", "")
    pipe.load_lora_weights(args.lora, adapter_name="brown", weight=1.0)
    res["concept"][f"lora_{hi}"] = concept_score(run(pipe, args.concept_prompts, args), args.shapes)


def part_lora_off(args, dev, res) -> None:
    """The base evaluation with the LoRA loaded at strength 0, and after unloading it."""
    pipe = SD35Pipeline.from_pretrained(shipped_model_path(), device=dev)
    pipe.load_lora_weights(args.lora, adapter_name="brown", weight=1.0)
    pipe.set_adapters("brown", 0.0)
    zero = run(pipe, args.base_prompts, args)
    res["base_eval"]["lora_strength_0"] = base_score(zero, args.base_items)
    pipe.unload_lora_weights()
    after = run(pipe, args.base_prompts, args)
    res["base_eval"]["after_unload"] = base_score(after, args.base_items)
    np.savez_compressed(args.cache.with_name(args.cache.name.replace("base_", "lora_")), np.stack(zero),
                        np.stack(after))


def _att(args) -> str:
    return "" if args.attention == "auto" else f"_{args.attention}_attention"


def part_fp8(args, dev, res) -> None:
    """The LoRA on the FP8 model, unmerged."""
    pipe8 = SD35Pipeline.from_pretrained(shipped_model_path(), device=dev, fp8=args.fp8, attention=args.attention)
    pipe8.load_lora_weights(args.lora, adapter_name="brown")
    res["concept"][f"lora_fp8_{args.fp8}{_att(args)}_unmerged"] = concept_score(run(pipe8, args.concept_prompts, args),
                                                                     args.shapes)


def part_fp8_merged(args, dev, res) -> None:
    """The LoRA merged into the FP8 weights (dequantise, add, requantise)."""
    pipe8 = SD35Pipeline.from_pretrained(shipped_model_path(), device=dev, fp8=args.fp8, attention=args.attention)
    pipe8.load_lora_weights(args.lora, adapter_name="brown")
    t1 = time.perf_counter()
    pipe8.fuse_lora()
    res["merge_seconds"] = time.perf_counter() - t1
    res["concept"][f"lora_fp8_{args.fp8}{_att(args)}_merged"] = concept_score(run(pipe8, args.concept_prompts, args), args.shapes)


PARTS = {"base": part_base, "lora": part_lora, "lora_off": part_lora_off, "fp8": part_fp8,
         "fp8_merged": part_fp8_merged}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora", type=Path, default=SHIPPED_LORA)
    ap.add_argument("--n", type=int, default=16, help="concept items (2 per shape at 16)")
    ap.add_argument("--n-base", type=int, default=16, help="held-out items of the base evaluation")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the file's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fp8", default="dynamic", help="FP8 mode of the FP8 rows")
    ap.add_argument("--attention", default="auto", choices=("auto", "fp8", "bf16"),
                    help="attention of the FP8 rows (auto: FP8 flash attention on sm_89+ GPUs)")
    ap.add_argument("--parts", default=",".join(["base", "lora", "lora_off", "fp8", "fp8_merged"]),
                    help="which parts to run (separate processes may run parts in parallel; --combine joins them)")
    ap.add_argument("--combine", action="store_true", help="join the parts' JSON files into the result")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: parts run in parallel)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "results" / "tiny_lora_parts",
                    help="folder of the parts' JSON files and cached images (one per concurrent evaluation)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    slug = f"{dev.type}"
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.cache = work / f"base_images_{slug}.npz"
    if args.combine:
        return combine(args, dev, work, slug)
    t0 = time.perf_counter()
    args.shapes, args.concept_prompts = zip(*concept.concept_prompts(args.n))
    args.base_items = world.heldout_prompts(args.n_base, args.seed)
    args.base_prompts = [it.caption for it in args.base_items]
    for part in args.parts.split(","):
        res: dict = {"concept": {}, "base_eval": {}}
        PARTS[part](args, dev, res)
        res["seconds"] = time.perf_counter() - t0
        (work / f"{part}_{slug}.json").write_text(json.dumps(res, indent=1))
        print(part, json.dumps(res), flush=True)
    return res


def combine(args, dev, work: Path, slug: str) -> dict:
    res: dict = {"lora": args.lora.name, "lora_bytes": args.lora.stat().st_size, "n_concept": args.n,
                 "n_base": args.n_base, "concept": {}, "base_eval": {}, "fp8_mode": args.fp8}
    res["missing_parts"] = [part for part in PARTS if not (work / f"{part}_{slug}.json").exists()]
    for part in PARTS:
        if part in res["missing_parts"]:
            continue
        got = json.loads((work / f"{part}_{slug}.json").read_text())
        res["concept"].update(got["concept"])
        res["base_eval"].update(got["base_eval"])
        if "merge_seconds" in got:
            res["merge_seconds"] = got["merge_seconds"]
    base = np.load(args.cache)["arr_0"]
    lora = np.load(args.cache.with_name(args.cache.name.replace("base_", "lora_")))
    res["identical_pixels"] = {"strength_0": bool(np.array_equal(base, lora["arr_0"])),
                               "after_unload": bool(np.array_equal(base, lora["arr_1"]))}
    print(" | ".join(f"{k} {v['score']:.3f}" for k, v in res["concept"].items()))
    print("base eval accuracy:", {k: round(v["accuracy"], 3) for k, v in res["base_eval"].items()},
          "identical pixels:", res["identical_pixels"])
    write_result(res, "tiny_lora", dev, args.out)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
