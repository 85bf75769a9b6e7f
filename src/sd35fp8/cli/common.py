"""Arguments and argparse types shared by several `sd35fp8` commands."""

from __future__ import annotations

import argparse

LONG_PROMPT_HELP = (
    "Prompts longer than 77 CLIP tokens are split into 77-token chunks that are encoded "
    "separately and concatenated, as ComfyUI does (the pooled vector comes from the first "
    "chunk); T5 sees the whole prompt."
)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, the separate text encoder files, --t5-tokenizer, --device, --dtype."""
    g = p.add_argument_group("model files")
    g.add_argument(
        "--model",
        default=None,
        help="checkpoint file, diffusers folder or Hugging Face repo id already in the local "
        "cache (offline). Default: the small model shipped with sd35fp8.",
    )
    g.add_argument("--clip-l", default=None, help="separate clip_l.safetensors")
    g.add_argument("--clip-g", default=None, help="separate clip_g.safetensors")
    g.add_argument("--t5xxl", default=None, help="separate t5xxl_*.safetensors (fp16, fp8 or scaled fp8)")
    g.add_argument(
        "--t5-tokenizer",
        default=None,
        help="T5 SentencePiece model (spiece.model) or a folder holding it; searched next to the "
        "model files and in the Hugging Face cache when not given",
    )
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="compute dtype (default: bf16 on GPU, fp32 on CPU)",
    )


OFFLOAD_MODES = ("none", "model", "sequential")
OFFLOAD_HELP = ("none: every model stays on the GPU; model: the FP8 MMDiT stays on the GPU, text encoders and "
                "VAE move in and out (12 GB cards); sequential: the MMDiT's and T5's blocks stream from pinned "
                "CPU memory with prefetch (8 GB cards)")


def add_engine_args(p: argparse.ArgumentParser, compile_default: str) -> None:
    """--offload (and ComfyUI's --lowvram / --novram spellings) and --compile / --no-compile.

    `compile_default` says in the help what None (neither flag) means for this command; the
    engine decides it from the device (sd35fp8.fast.default_compile)."""
    g = p.add_argument_group("engine")
    off = g.add_mutually_exclusive_group()
    off.add_argument("--offload", default="none", choices=OFFLOAD_MODES, help=OFFLOAD_HELP)
    off.add_argument("--lowvram", dest="offload", action="store_const", const="model",
                     help="ComfyUI's spelling of --offload model")
    off.add_argument("--novram", dest="offload", action="store_const", const="sequential",
                     help="ComfyUI's spelling of --offload sequential")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the fused FP8 MMDiT step (CUDA; the first image of a size compiles, "
                   f"cached in ~/.cache/sd35fp8). Default: {compile_default}")


def parse_shape(text: str) -> tuple[int, int, int]:
    """argparse type: 'WxH' or 'WxHxB' -> (width, height, batch); sides positive multiples of 16."""
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT or WIDTHxHEIGHTxBATCH (e.g. 1024x1024x2), got {text!r}")
    width, height, batch = values if len(values) == 3 else (*values, 1)
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive multiples of 16")
    if batch < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the batch must be >= 1")
    return width, height, batch
