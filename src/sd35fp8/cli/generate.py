"""`sd35fp8 generate`: images from a prompt through `SD35Pipeline`.

Every parameter is checked before any model loads, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .common import LONG_PROMPT_HELP, add_engine_args, add_model_args, positive_int
from .lora import add_generate_args as add_lora_args
from .lora import apply_generate_args as apply_lora_args


def add_parsers(sub) -> dict[str, Callable[[argparse.Namespace], int]]:
    gen = sub.add_parser(
        "generate",
        help="make images from a prompt",
        description="Make images from a prompt. " + LONG_PROMPT_HELP,
        epilog="Defaults follow the reference (sd3_infer.py): Large 40 steps cfg 4.5 dpmpp_2m; "
        "Large Turbo 4 steps cfg 1 euler; Medium 50 steps dpmpp_2m with skip-layer guidance at "
        "cfg 4 (cfg 5 with --no-slg); the shipped model uses its own recorded defaults.",
    )
    gen.add_argument("prompt", help="the text prompt. " + LONG_PROMPT_HELP)
    add_model_args(gen)
    s = gen.add_argument_group("sampling")
    s.add_argument("--negative", default="", help="negative prompt (default: empty prompt)")
    s.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: per model)")
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale; 1 skips the negative pass")
    s.add_argument("--sampler", default=None, help="ComfyUI sampler name (default: per model); see `sd35fp8 samplers`")
    s.add_argument("--scheduler", default=None, help="ComfyUI scheduler name (default: normal)")
    s.add_argument("--shift", type=float, default=None, help="flow-matching shift (default 3.0)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (same image on every device)")
    s.add_argument("--width", type=int, default=None, help="image width, multiple of 16 (default: per model)")
    s.add_argument("--height", type=int, default=None, help="image height, multiple of 16 (default: per model)")
    s.add_argument("--batch", type=positive_int, default=1, help="images per prompt (seeds are one batch, like ComfyUI)")
    s.add_argument("--fp8", default=None, choices=["none", "weight_only", "dynamic", "static"],
                   help="FP8 mode of the MMDiT (default: FP8 files run as FP8, others in --dtype)")
    s.add_argument("--no-slg", action="store_true", help="disable skip-layer guidance (Medium)")
    add_engine_args(gen, "off (the fused FP8 step runs eager, with CUDA graphs on CUDA)")
    add_lora_args(gen.add_argument_group("LoRA"))
    gen.add_argument("-o", "--output", default="out.png",
                     help="output PNG; with --batch > 1, _0, _1, ... are added before the suffix")
    return {"generate": cmd_generate}


def validate_generate(args: argparse.Namespace) -> None:
    """Check every parameter before any model loads."""
    from ..pipeline import resolve_device
    from ..sampling import check_scheduler, get_sampler

    device = resolve_device(args.device)
    if args.compile and device.type != "cuda":
        raise InputError(f"--compile needs a CUDA device (got {device}); on the CPU the engine runs eager")
    for name in ("cfg", "shift"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{name} must be a finite number, got {value}")

    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 16):
            raise InputError(f"--{name} must be a positive multiple of 16, got {value}")
    if args.cfg is not None and args.cfg < 0:
        raise InputError(f"--cfg must be >= 0, got {args.cfg}")
    if args.shift is not None and args.shift <= 0:
        raise InputError(f"--shift must be > 0, got {args.shift}")
    if args.sampler is not None:
        get_sampler(args.sampler)  # InputError naming the valid ones
    if args.scheduler is not None:
        check_scheduler(args.scheduler)
    if not 0 <= args.seed < 2**64:
        raise InputError(f"--seed must be in [0, 2**64), got {args.seed}")
    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise InputError(f"-o must name a .png file, got {args.output}")
    if not out.parent.exists():
        raise InputError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise InputError(f"-o {args.output} is a folder; name a .png file")


def cmd_generate(args: argparse.Namespace) -> int:
    validate_generate(args)
    from ..pipeline import SD35Pipeline, dtype_from_name

    pipe = SD35Pipeline.from_pretrained(
        args.model,
        clip_l=args.clip_l,
        clip_g=args.clip_g,
        t5xxl=args.t5xxl,
        t5_tokenizer=args.t5_tokenizer,
        device=args.device,
        dtype=dtype_from_name(args.dtype),
        fp8=args.fp8,
        offload=args.offload,
        compile=args.compile,
    )
    print(f"sd35fp8: {pipe.summary()}", file=sys.stderr)

    for line in apply_lora_args(pipe, args):
        print(f"sd35fp8: {line}", file=sys.stderr)
    result = pipe(
        args.prompt,
        negative_prompt=args.negative,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        height=args.height,
        width=args.width,
        seed=args.seed,
        sampler=args.sampler,
        scheduler=args.scheduler,
        shift=args.shift,
        num_images_per_prompt=args.batch,
        slg=False if args.no_slg else None,
    )
    if args.verbose:
        from ..offload import peak_memory_report

        print(peak_memory_report(pipe.stats), file=sys.stderr)  # seconds and peak GPU memory per stage
    paths = result.save(args.output)
    for path in paths:
        print(path)
    return 0
