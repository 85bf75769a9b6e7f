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
