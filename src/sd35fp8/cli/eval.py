"""`sd35fp8 eval`: score the (tiny) model in BF16 and each FP8 mode with the shape detector
(tiny/evaluate.py, imported inside the handler so that `sd35fp8 --help` does not load torch)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .common import check_output, new_file


def add_parsers(subparsers) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `sd35fp8 eval` -> {"eval": handler(args) -> exit code}."""
    p = subparsers.add_parser(
        "eval", help="score the (tiny) model in BF16 and each FP8 mode with the shape detector",
        description="Generate held-out captions of the tiny world in BF16 (float32 on CPU) and in each FP8 "
        "mode with the same seeds; print detector accuracy per category, PSNR vs BF16 and time per "
        "image; write JSON and a contact sheet PNG.")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped small model)")
    p.add_argument("--fp8-model", default=None, help="separate fp8 MMDiT file for the FP8 modes "
                   "(default: the model's MMDiT quantised on load)")
    p.add_argument("--n", type=int, default=100, help="number of held-out items (default 100)")
    p.add_argument("--seed", type=int, default=0, help="item and noise seed (default 0)")
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of bf16 and the FP8 modes (fp8.device.MODES: weight_only, "
                   "dynamic, static) (default: all this device offers)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--batch", type=int, default=16, help="prompts per pipeline call (default 16)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--sampler", default=None, help="ComfyUI sampler name (default: the model's); see `sd35fp8 samplers`")
    p.add_argument("--scheduler", default=None, help="ComfyUI scheduler name (default: the model's)")
    p.add_argument("--size", type=int, default=None, help="image side, multiple of 16 (default: the model's)")
    p.add_argument("--out", default=None, help="JSON path (default: a new tiny_eval_<device>_NNNNN.json in the "
                   "current folder; the committed results in benchmarks/results/ are overwritten only with --force)")
    p.add_argument("--sheet", default=None, help="contact sheet PNG (default: the JSON path with .png)")
    p.add_argument("--force", action="store_true", help="allow --out / --sheet to overwrite files tracked by git")
    return {"eval": cmd_eval}


def cmd_eval(args: argparse.Namespace) -> int:
    from ..pipeline import resolve_device
    from ..sampling import check_scheduler, get_sampler
    from ..tiny.evaluate import evaluate, parse_modes

    modes = parse_modes(args.modes) if args.modes is not None else None  # checked before loading
    if args.n < 1 or args.batch < 1 or (args.steps is not None and args.steps < 1):
        raise InputError(f"--n, --batch and --steps must be >= 1, got {args.n}, {args.batch}, {args.steps}")
    if args.size is not None and (args.size <= 0 or args.size % 16):
        raise InputError(f"--size must be a positive multiple of 16, got {args.size}")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise InputError(f"--cfg must be a finite number >= 0, got {args.cfg}")
    dev = resolve_device(args.device)
    if args.out is None:
        from ..tiny.evaluate import device_slug

        args.out = str(new_file(f"tiny_eval_{device_slug(dev)}", ".json"))
    check_output(args.out, args.force, "--out")
    out = Path(args.out)
    sheet = Path(args.sheet) if args.sheet is not None else out.with_suffix(".png")
    if sheet.resolve() == out.resolve():
        sheet = out.with_name(out.stem + "_sheet.png")
    check_output(sheet, args.force, "--sheet")
    if args.sampler is not None:
        get_sampler(args.sampler)  # InputError naming the valid ones
    if args.scheduler is not None:
        check_scheduler(args.scheduler)
    evaluate(model=args.model, n=args.n, seed=args.seed, modes=modes, device=args.device, batch=args.batch,
             steps=args.steps, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler, size=args.size,
             out=args.out, sheet=args.sheet, fp8_model=args.fp8_model)
    return 0
