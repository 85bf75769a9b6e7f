"""GenEval-style evaluation of a (tiny) SD3.5-layout model in BF16 and in each FP8 mode.

    result = evaluate(model=None, n=100)          # the shipped model, every mode this device offers

One pipeline is loaded once (BF16 on GPU, float32 on CPU); every FP8 mode swaps in an MMDiT loaded
by the FP8 engine (`checkpoints.fp8_load.load_mmdit_fp8`) from the same file, so text encoders and VAE are
shared and the only difference between modes is the MMDiT's linear layers.

Seeds: items go through the pipeline `batch` prompts at a time; batch b draws its noise from
seed `seed + b` (ComfyUI: one CPU draw for the whole batch), so item i has the same noise in every
mode. Per mode: the detector's scores (`detector.aggregate`), PSNR of each image against the BF16
image of the same item, and seconds per image (after one warm-up call). "static" needs input
scales: taken from the file when every FP8 layer has one, else calibrated on a few in-distribution
(train split) captions with `collect_activation_amax` + `apply_static_scales`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import InputError
from ..fast import PlainForward
from . import ALL_MODES, BASELINE, detector, world

log = logging.getLogger(__name__)

CALIBRATION_PROMPTS = 4  # train-split captions sampled for static input scales
RESULTS_DIR = Path("benchmarks") / "results"


# ---------------------------------------------------------------- small pieces
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR (dB) of two uint8 images of one shape; inf when identical."""
    if a.shape != b.shape:
        raise InputError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(255.0 ** 2 / mse)


def available_modes(device: str | torch.device) -> tuple[tuple[str, ...], dict[str, str]]:
    """(modes to run on `device`, {mode left out: why}); FP8 matmul modes need `_scaled_mm` there."""
    from ..fp8.device import fp8_support

    support = fp8_support(device)
    if support.tensorwise:
        return ALL_MODES, {}
    why = f"no FP8 matmul on {support.describe()}"
    return (BASELINE, "weight_only"), {"dynamic": why, "static": why}


def parse_modes(text: str | Sequence[str]) -> tuple[str, ...]:
    """'bf16,dynamic' or a sequence -> validated tuple (baseline first, no repeats)."""
    modes = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown or not modes:
        raise InputError(f"eval modes {unknown or modes} not understood; choose from {', '.join(ALL_MODES)}")
    if len(set(modes)) != len(modes):
        raise InputError(f"eval modes repeat: {modes}")
    return tuple(sorted(modes, key=ALL_MODES.index))


def device_slug(device: torch.device) -> str:
    """'cpu' or the GPU's name as a file-name part, e.g. 'nvidia_h100_80gb_hbm3'."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return device.type


def _json_safe(obj):
    """inf / nan floats -> strings (JSON has no infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_result(result: dict, name: str, device: torch.device, out: str | Path | None = None) -> Path:
    """Stamp a benchmark result with device, torch version and UTC date, write it as JSON to `out`
    (default benchmarks/results/<name>_<device>.json) and return the path."""
    from datetime import datetime, timezone

    result.update(device=str(device), torch=torch.__version__,
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}_{device_slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n")
    print(f"wrote {path}")
    return path


def add_benchmark_args(parser, n: int, batch: int, n_help: str = "held-out items") -> None:
    """The options every tiny-model benchmark shares: --model --n --seed --batch --device --out."""
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--n", type=int, default=n, help=n_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None)


def benchmark_pipeline(args) -> tuple:
    """(pipeline, device, model path) for `add_benchmark_args` options: the shipped model and the best
    device unless named."""
    from ..pipeline import SD35Pipeline, default_device, shipped_model_path

    dev = torch.device(args.device) if args.device else default_device()
    model = args.model or shipped_model_path()
    return SD35Pipeline.from_pretrained(model, device=dev), dev, model


# ---------------------------------------------------------------- generation
def generate_items(pipe, items: Sequence[world.EvalItem], seed: int, batch: int, steps: int, cfg: float,
                   sampler: str, scheduler: str, size: int,
                   shift: float | None = None) -> tuple[list[np.ndarray], float]:
    """Images (uint8 [H, W, 3]) for `items`, `batch` prompts per call -> (images, seconds per image).

    shift=None: the model's default sampling shift.
    """
    images: list[np.ndarray] = []
    seconds = 0.0
    for b, start in enumerate(tqdm(range(0, len(items), batch), desc=f"{len(items)} images", unit="batch",
                                   file=sys.stderr)):
        chunk = items[start:start + batch]
        t0 = time.perf_counter()
        out = pipe([it.caption for it in chunk], num_inference_steps=steps, guidance_scale=cfg, sampler=sampler,
                   scheduler=scheduler, shift=shift, width=size, height=size, seed=seed + b, progress=False)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        seconds += time.perf_counter() - t0
        images.extend(np.asarray(img.convert("RGB"), dtype=np.uint8) for img in out.images)
    return images, seconds / max(1, len(items))


def _load_fp8_mmdit(source, mode: str, pipe, calibrate: Callable[[], dict[str, float]]):
    """The FP8 MMDiT for `mode` -> (model, note on where static scales came from or None)."""
    from ..fp8 import FP8Linear, apply_static_scales
    from ..checkpoints.fp8_load import load_mmdit_fp8

    load_mode = "dynamic" if mode == "static" else mode
    model = load_mmdit_fp8(source, device=pipe.device, dtype=pipe.dtype, mode=load_mode)
    if mode != "static":
        return model, None
    layers = {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    if layers and all(m.input_scale is not None for m in layers.values()):
        for m in layers.values():
            m.set_mode("static")
        return model, f"input scales from {source}"
    amax = calibrate()
    apply_static_scales(model, amax, margin=1.0)
    return model, f"calibrated now on {CALIBRATION_PROMPTS} train-split captions (amax, margin 1.0)"


# ---------------------------------------------------------------- evaluation
def evaluate(model: str | Path | None = None, n: int = 100, seed: int = 0, modes: Sequence[str] | str | None = None,
             device: str | torch.device | None = None, batch: int = 16, steps: int | None = None,
             cfg: float | None = None, sampler: str | None = None, scheduler: str | None = None,
             size: int | None = None, out: str | Path | None = None, sheet: str | Path | None = None,
             fp8_model: str | Path | None = None, warmup: bool = True, sheet_rows: int = 40,
             verbose: bool = True, score_workers: int | None = None) -> dict:
    """Generate `n` held-out captions in every mode, score them, write JSON + contact sheet.

    model: checkpoint path (None: the shipped model); fp8_model: a separate (e.g. scaled fp8) MMDiT
    file for the FP8 modes (default: the model's own MMDiT, quantised as it loads). modes: default
    every mode `available_modes(device)` offers. steps / cfg / sampler / scheduler / size default to
    the model's recorded defaults. out: JSON path (default benchmarks/results/tiny_eval_<device>.json);
    sheet: PNG path (default: the JSON path with .png). score_workers: processes scoring images
    (default: the CPU count). Returns the JSON dict.
    """
    from ..pipeline import SD35Pipeline, default_device, shipped_model_path
    from ..fp8 import collect_activation_amax
    from .contact_sheet import contact_sheet

    score_workers = score_workers or os.cpu_count() or 1
    if n < 1 or batch < 1:
        raise InputError(f"evaluate: n and batch must be >= 1, got n={n}, batch={batch}")
    dev = torch.device(device) if device is not None else default_device()
    offered, skipped = available_modes(dev)
    wanted = offered if modes is None else parse_modes(modes)
    blocked = [m for m in wanted if m not in offered]
    if blocked:
        raise InputError(f"eval modes {blocked} cannot run on {dev}: {skipped[blocked[0]]}")
    run_modes = tuple(wanted) if BASELINE in wanted else (BASELINE,) + tuple(wanted)  # PSNR needs the baseline
    skipped = {m: r for m, r in skipped.items() if modes is None}
    say = print if verbose else log.info

    model_path = Path(model) if model is not None else shipped_model_path()
    if not model_path.exists():
        raise InputError(f"evaluate: model {model_path} does not exist")
    fp8_source = Path(fp8_model) if fp8_model is not None else model_path
    pipe = SD35Pipeline.from_pretrained(model_path, device=dev)
    d = pipe.defaults
    steps, cfg = steps or d.steps, d.cfg if cfg is None else float(cfg)
    sampler, scheduler, size = sampler or d.sampler, scheduler or d.scheduler, size or d.width
    params = dict(steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, width=size, height=size,
                  batch=batch, seed=seed, defaults=d.name)
    items = world.heldout_prompts(n, seed)
    gen = dict(seed=seed, batch=batch, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, size=size)
    say(f"eval: {model_path.name} on {dev} ({str(pipe.dtype).replace('torch.', '')}), {n} held-out items, "
        f"modes {', '.join(run_modes)}; {steps} steps cfg {cfg} {sampler}/{scheduler} {size}px, batch {batch}")

    bf16_mmdit = pipe.mmdit

    def calibrate() -> dict[str, float]:
        calib = [it.caption for it in world.eval_items(CALIBRATION_PROMPTS, seed + 1, "train")]
        plain = PlainForward(bf16_mmdit.model)  # the module forward, so the Linear hooks see every call
        pipe.mmdit = plain
        return collect_activation_amax(plain.model, lambda _m: pipe(
            calib, num_inference_steps=steps, guidance_scale=cfg, sampler=sampler, scheduler=scheduler,
            width=size, height=size, seed=seed + 10_000, progress=False))

    images: dict[str, list[np.ndarray]] = {}
    per_mode: dict[str, dict] = {}
    scores: dict[str, list[dict]] = {}
    for mode in run_modes:
        note = None
        if mode == BASELINE:
            pipe.mmdit = bf16_mmdit
        else:
            fp8_mmdit, note = _load_fp8_mmdit(fp8_source, mode, pipe, calibrate)
            pipe.mmdit = fp8_mmdit
        if warmup:
            generate_items(pipe, items[:1], **{**gen, "seed": seed + 20_000})
        imgs, sec = generate_items(pipe, items, **gen)
        images[mode] = imgs
        scores[mode] = detector.score_many(imgs, items, workers=score_workers)
        entry = {"effective_mode": pipe.fp8_mode, "dtype": str(pipe.dtype).replace("torch.", ""),
                 "scores": detector.aggregate(scores[mode]), "seconds_per_image": sec}
        if note:
            entry["static_scales"] = note
        if mode != BASELINE:
            p = [psnr(a, b) for a, b in zip(imgs, images[BASELINE])]
            entry["psnr_vs_bf16"] = {"mean": float(np.mean(p)), "min": float(np.min(p)), "max": float(np.max(p))}
        else:
            rerun, _ = generate_items(pipe, items[:batch], **gen)  # determinism: same seeds, same pixels
            entry["rerun_psnr_min"] = float(min(psnr(a, b) for a, b in zip(rerun, imgs)))
        per_mode[mode] = entry
        say(f"  {mode:<11} done: overall {entry['scores']['overall']:.3f}, {sec:.3f} s/image")
        if mode != BASELINE:
            pipe.mmdit = bf16_mmdit
            del fp8_mmdit
    pipe.mmdit = bf16_mmdit

    from ..fp8.device import fp8_support

    out_path = Path(out) if out is not None else RESULTS_DIR / f"tiny_eval_{device_slug(dev)}.json"
    sheet_path = Path(sheet) if sheet is not None else out_path.with_suffix(".png")
    if sheet_path.resolve() == out_path.resolve():  # `--out x.png`: keep the JSON and the sheet apart
        sheet_path = out_path.with_name(out_path.stem + "_sheet.png")
    result = {
        "model": str(model_path), "fp8_model": str(fp8_source),
        "fp8_support": fp8_support(dev).describe(), "n": n, "params": params,
        "modes": per_mode, "skipped": skipped,
        "items": [{"index": i, "category": it.category, "caption": it.caption, "seed": seed + i // batch,
                   "batch_index": i % batch,
                   "results": {m: {"correct": scores[m][i]["correct"], "detections": scores[m][i]["detections"],
                                   **({"psnr_vs_bf16": psnr(images[m][i], images[BASELINE][i])}
                                      if m != BASELINE else {})}
                               for m in run_modes}}
                  for i, it in enumerate(items)],
        "json": str(out_path), "sheet": str(sheet_path),
    }
    print(format_table(result))
    write_result(result, "tiny_eval", dev, out_path)  # + device, device_name, torch, date
    sheet_path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(items[:sheet_rows], {m: images[m][:sheet_rows] for m in run_modes},
                  {m: [s["correct"] for s in scores[m][:sheet_rows]] for m in run_modes}).save(sheet_path)
    say(f"wrote {sheet_path}")
    return result


def format_table(result: dict) -> str:
    """The per-mode table: detector accuracy per category and overall, PSNR vs BF16, time."""
    cats = [c for c in world.CATEGORIES if any(c in m["scores"]["per_category"] for m in result["modes"].values())]
    head = ["mode", "runs as"] + cats + ["overall", "PSNR mean", "PSNR min", "s/image"]
    rows = []
    for mode, m in result["modes"].items():
        pc = m["scores"]["per_category"]
        ps = m.get("psnr_vs_bf16")
        rows.append([mode, m["effective_mode"] if mode != BASELINE else m["dtype"]]
                    + [f"{pc[c]:.3f}" if c in pc else "-" for c in cats]
                    + [f"{m['scores']['overall']:.3f}",
                       f"{ps['mean']:.2f}" if ps else "-", f"{ps['min']:.2f}" if ps else "-",
                       f"{m['seconds_per_image']:.4f}"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head] + rows]
    lines.insert(1, "-" * len(lines[0]))
    for mode, why in result.get("skipped", {}).items():
        lines.append(f"{mode}: skipped ({why})")
    return "\n".join(lines)
