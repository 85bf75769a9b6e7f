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
from .common import LONG_PROMPT_HELP, add_engine_args, add_model_args, check_output, new_file, positive_int
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
    s.add_argument("--seed", type=seed_arg, default=0,
                   help="noise seed (same image on every device), or `random` (printed and stored in the metadata)")
    s.add_argument("--width", type=int, default=None, help="image width, multiple of 16 (default: per model)")
    s.add_argument("--height", type=int, default=None, help="image height, multiple of 16 (default: per model)")
    s.add_argument("--batch", type=positive_int, default=1, help="images per prompt (seeds are one batch, like ComfyUI)")
    s.add_argument("--fp8", default=None, choices=["none", "weight_only", "dynamic", "static"],
                   help="FP8 mode of the MMDiT (default: FP8 files run as FP8, others in --dtype)")
    s.add_argument("--no-slg", action="store_true", help="disable skip-layer guidance (Medium)")
    i = gen.add_argument_group("img2img and inpainting")
    i.add_argument("--image", default=None, help="init image (img2img; it sets the size)")
    i.add_argument("--denoise", type=float, default=None,
                   help="how much of the schedule runs on the init image, (0, 1] (default with --image: 0.75)")
    i.add_argument("--mask", default=None, help="inpainting mask image: white (or, for an image with alpha, "
                   "transparent as ComfyUI's LoadImage) = repaint; needs --image (ComfyUI's SetLatentNoiseMask)")
    gen.add_argument("--vae", default=None, help="a separate VAE file used instead of the checkpoint's")
    add_engine_args(gen, "off (the fused FP8 step runs eager, with CUDA graphs on CUDA)")
    add_lora_args(gen.add_argument_group("LoRA"))
    gen.add_argument("-o", "--output", default=None,
                     help="output .png, .jpg or .webp (parameters in the metadata); with --batch > 1, _0, _1, ... "
                     "are added before the suffix. Default: a new sd35fp8_NNNNN.png in the current folder")
    gen.add_argument("--force", action="store_true", help="allow -o to overwrite a file tracked by git")
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
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise InputError(f"--seed must be in [0, 2**64), got {args.seed}")
    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    from ..output import image_format

    if args.output is None:
        args.output = str(new_file("sd35fp8", ".png"))
    image_format(args.output)  # .png, .jpg/.jpeg or .webp
    check_output(args.output, args.force)
    for flag in ("image", "mask", "vae"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise InputError(f"--{flag} {value}: no such file")
    if args.mask is not None and args.image is None:
        raise InputError("--mask needs --image (the picture to inpaint)")
    if args.denoise is not None:
        if args.image is None:
            raise InputError("--denoise needs --image (img2img)")
        if not 0 < args.denoise <= 1:
            raise InputError(f"--denoise must be in (0, 1], got {args.denoise}")


def seed_arg(text: str) -> int | None:
    """argparse type: an integer seed, or `random` (None here; drawn in cmd_generate)."""
    if text.strip().lower() == "random":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or `random`, got {text!r}") from None


def read_mask(path: str):
    """A mask file -> float tensor [1, 1, H, W] in [0, 1], 1 = repaint: an image with alpha gives
    1 - alpha (ComfyUI's LoadImage mask), any other image its luminance (white = repaint)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        if "A" in im.getbands():
            m = 1.0 - np.asarray(im.getchannel("A"), dtype=np.float32) / 255.0
        else:
            m = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(m)[None, None]


def prompt_length_note(tokenizer, prompt: str) -> str | None:
    """What the encoders will see of a prompt longer than one 77-token CLIP window (None if it fits)."""
    tokens = tokenizer.tokenize(prompt)
    chunks = len(tokens["l"])
    if chunks <= 1:
        return None
    t5 = "" if tokens["t5"] is None else f"; T5 sees all {len(tokens['t5'])} tokens"
    return (f"warning: the prompt is longer than one 77-token CLIP window: CLIP-L and CLIP-G see it as {chunks} "
            f"windows of 77 tokens encoded separately and concatenated (the pooled vector comes from the first "
            f"window only){t5}; the context has {chunks * 77 + (len(tokens['t5']) if tokens['t5'] else 0)} tokens, "
            f"which makes every step slower")


def cmd_generate(args: argparse.Namespace) -> int:
    validate_generate(args)
    if args.seed is None:
        import secrets

        args.seed = secrets.randbelow(2**63)
        print(f"sd35fp8: seed {args.seed}", file=sys.stderr)
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
        attention=args.attention,
    )
    if args.vae is not None:
        from ..checkpoints.load import load_vae

        pipe.vae = load_vae(args.vae, device=pipe.device if pipe.offload == "none" else "cpu", dtype=pipe.dtype)
        if pipe._offloader is not None:
            pipe._offloader.register(pipe.vae, "vae")
    print(f"sd35fp8: {pipe.summary()}", file=sys.stderr)
    note = prompt_length_note(pipe.text_encoder.tokenizer, args.prompt)
    if note is not None:
        print(f"sd35fp8: {note}", file=sys.stderr)

    for line in apply_lora_args(pipe, args):
        print(f"sd35fp8: {line}", file=sys.stderr)
    init = mask = None
    if args.image is not None:
        from PIL import Image

        with Image.open(args.image) as im:
            init = im.convert("RGB")
        mask = None if args.mask is None else read_mask(args.mask)
    result = pipe.generate(
        args.prompt,
        image=init,
        mask=mask,
        denoise=1.0 if init is None else (0.75 if args.denoise is None else args.denoise),
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
        cache_threshold=args.cache_threshold,
    )
    if pipe.stats.cache:
        c = pipe.stats.cache
        print(f"sd35fp8: step cache {args.cache_threshold:g}: {c['full']} of {c['calls']} MMDiT evaluations computed",
              file=sys.stderr)
    if args.verbose:
        from ..offload import peak_memory_report

        print(peak_memory_report(pipe.stats), file=sys.stderr)  # seconds and peak GPU memory per stage
    paths = result.save(args.output)
    for path in paths:
        print(path)
    return 0
