"""`sd35fp8 calibrate` (static FP8 scales from sampling trajectories -> recipe JSON) and
`sd35fp8 quantize` (write an FP8 checkpoint). The work is fp8/calibrate.py and checkpoints/export.py;
they are imported inside the handlers so that `sd35fp8 --help` does not load torch.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .common import check_output, positive_int

MODES = ("weight_only", "dynamic", "static")  # fp8.device.MODES, written out so that --help imports no torch (tests/test_cli.py)

log = logging.getLogger(__name__)


# ---- calibrate -----------------------------------------------------------------------------------------
def _add_calibrate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="calibrate static FP8 scales on real sampling trajectories",
                       description="Run sampling trajectories with the high-precision MMDiT, record every "
                       "Linear's input amax at every step, pick static input scales, tune weight clipping and "
                       "(with --budget-db) keep sensitive layers 16-bit; writes a recipe JSON for "
                       "`sd35fp8 quantize --recipe` and `load_mmdit_fp8(recipe=)`.")
    p.add_argument("model", help="checkpoint file, folder or cached repo id (16-bit or fp8; fp8 is dequantised)")
    p.add_argument("--out", required=True, help="recipe JSON to write (checked before any work)")
    p.add_argument("--force", action="store_true", help="allow --out to overwrite a file tracked by git")
    p.add_argument("--clip-l", default=None, help="separate clip_l.safetensors (the official single files hold "
                   "only the MMDiT and VAE; the trajectories need the text encoders)")
    p.add_argument("--clip-g", default=None, help="separate clip_g.safetensors")
    p.add_argument("--t5xxl", default=None, help="separate t5xxl_*.safetensors (fp16, fp8 or scaled fp8)")
    p.add_argument("--t5-tokenizer", default=None,
                   help="T5 SentencePiece model (spiece.model) or a folder holding it; searched next to the model "
                   "files and in the Hugging Face cache when not given")
    p.add_argument("--prompts", default=None, help="text file, one prompt a line (default: 32 built-in prompts)")
    p.add_argument("--num-prompts", type=positive_int, default=None, help="use only the first N prompts")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: per model)")
    p.add_argument("--size", type=positive_int, default=None,
                   help="image side in pixels, a multiple of 16 (default: per model)")
    p.add_argument("--calls", type=positive_int, default=32, help="model calls kept for scoring and tuning (default 32)")
    p.add_argument("--budget-db", type=float, default=None,
                   help="keep the least robust layers 16-bit until the predicted output SQNR reaches this")
    p.add_argument("--no-tune", action="store_true", help="skip the per-layer weight clipping search")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="compute dtype of the reference trajectories (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first trajectory (default 0; +1 per prompt)")
    return p


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoints.fp8_load import load_mmdit_fp8
    from ..fp8.calibrate import PROMPTS, calibrate, record_trajectories
    from ..fp8.linear import FP8Linear
    from ..pipeline import SD35Pipeline, dtype_from_name, resolve_device

    if args.size is not None and args.size % 16:
        raise InputError(f"--size must be a multiple of 16, got {args.size}")
    resolve_device(args.device)
    check_output(args.out, args.force, "--out")
    if args.prompts:
        if not Path(args.prompts).is_file():
            raise InputError(f"--prompts {args.prompts} is not a file")
        prompts = [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
        if not prompts:
            raise InputError(f"{args.prompts} holds no prompts")
    else:
        prompts = list(PROMPTS)
    if args.num_prompts:
        prompts = prompts[: args.num_prompts]
    pipe = SD35Pipeline.from_pretrained(args.model, clip_l=args.clip_l, clip_g=args.clip_g, t5xxl=args.t5xxl,
                                        t5_tokenizer=args.t5_tokenizer, device=args.device,
                                        dtype=dtype_from_name(args.dtype))
    if any(isinstance(m, FP8Linear) for m in pipe.mmdit.modules()):  # an fp8 file: calibrate its 16-bit version
        log.info("calibrating the dequantised MMDiT of %s", args.model)
        pipe.mmdit = load_mmdit_fp8(args.model, pipe.device, pipe.dtype, "none")
    calls, amax = record_trajectories(pipe, prompts, args.steps, args.size, args.seed, args.calls)
    with torch.no_grad():
        recipe = calibrate(pipe.mmdit.model, calls, amax=amax, tune=not args.no_tune, budget_db=args.budget_db,
                           progress=True)
    recipe.stats["prompts"] = len(prompts)
    recipe.stats["model"] = str(args.model)
    recipe.save(args.out)
    s = recipe.stats
    print(f"output SQNR vs {pipe.dtype}: dynamic {s['dynamic_db']:.2f} dB, static {s['static_db']:.2f} dB "
          f"(margin {recipe.margin})" + (f", tuned {s['tuned_db']:.2f} dB" if "tuned_db" in s else "")
          + (f", with policy {s['policy_db']:.2f} dB" if "policy_db" in s else ""))
    print(f"wrote {args.out}")
    return 0


# ---- quantize ------------------------------------------------------------------------------------------
def _add_quantize(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("quantize", help="write an FP8 checkpoint (ComfyUI scaled fp8 or native)",
                       description="Stream a checkpoint (any layout the loaders read) tensor by tensor into an "
                       "FP8 file. comfy: ComfyUI scaled fp8 (loads in ComfyUI; all-in-ones stay all-in-ones). "
                       "native: per-channel scales + static input scales + recipe in the metadata.")
    p.add_argument("input", help="checkpoint file, folder or cached repo id")
    p.add_argument("output", help=".safetensors to write")
    p.add_argument("--format", dest="fmt", default="comfy", choices=["comfy", "native"],
                   help="comfy (default): ComfyUI scaled fp8; native: per-channel scales + input scales + recipe")
    p.add_argument("--recipe", default=None, help="recipe JSON from `sd35fp8 calibrate` (input scales, clipping, policy)")
    p.add_argument("--mode", default=None, choices=list(MODES),
                   help="static writes the recipe's input scales (required); weight_only/dynamic write none "
                        "(default: static when --recipe is given, else none)")
    p.add_argument("--t5", action="store_true", help="also quantise the T5-XXL of an all-in-one")
    p.add_argument("--all-linears", action="store_true",
                   help="quantise every Linear, keeping none 16-bit. The default policy keeps the embedders and "
                        "final layer 16-bit, which ComfyUI loads since its mixed-precision loader "
                        "(convert_old_quants); older ComfyUI casts such layers of a scaled-fp8 file to fp8 "
                        "without a scale, so use this flag for those versions")
    return p


def run_quantize(args: argparse.Namespace) -> int:
    from ..checkpoints.export import export

    if Path(args.output).exists():
        raise InputError(f"{args.output} exists; remove it first")
    if Path(args.output).suffix != ".safetensors":
        raise InputError(f"{args.output}: the output must be a .safetensors file")
    if not Path(args.output).parent.is_dir():
        raise InputError(f"{args.output}: folder {Path(args.output).parent} does not exist")
    if args.recipe is not None and not Path(args.recipe).is_file():
        raise InputError(f"--recipe {args.recipe} is not a file")
    report = export(args.input, args.output, args.fmt, args.recipe, args.mode, args.t5, all_linears=args.all_linears,
                    progress=True)
    print(report.describe())
    return 0


def add_parsers(subparsers) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add `calibrate` and `quantize` -> {name: handler(args) -> exit code}."""
    _add_calibrate(subparsers)
    _add_quantize(subparsers)
    return {"calibrate": run_calibrate, "quantize": run_quantize}
