"""`sd35fp8 generate --lora FILE[:STRENGTH] --lora-merge`: the arguments and their use on a loaded
pipeline (its LoRA methods, lora/pipeline.py). Nothing of lora/ is imported here, so that building
the parser stays free of torch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import InputError


def parse_lora_arg(text: str) -> tuple[str, float]:
    """'FILE' -> (FILE, 1.0); 'FILE:0.7' -> (FILE, 0.7). A Windows drive letter is not a strength."""
    path, sep, tail = text.rpartition(":")
    if sep and path and "/" not in tail and "\\" not in tail:
        try:
            return path, float(tail)
        except ValueError:
            pass  # not a number: the colon is part of the file name
    return text, 1.0


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", type=parse_lora_arg,
                        help="apply a LoRA (repeatable; strength default 1.0, may be negative): any of the "
                             "diffusers/peft, kohya/sd-scripts, ComfyUI or Stability layouts, DoRA")
    parser.add_argument("--lora-merge", action="store_true",
                        help="merge the LoRAs into the weights (FP8: requantised with fresh scales) for the "
                             "fastest step, instead of the unmerged low-rank term beside the base matmul")


def apply_generate_args(pipe: Any, args: argparse.Namespace) -> list[str]:
    """Load every --lora into the pipeline (active), merge with --lora-merge; returns lines to print."""
    lines = []
    for path, strength in args.lora:
        if not Path(path).is_file():
            raise InputError(f"--lora {path}: no such file")
        name = pipe.load_lora_weights(path, adapter_name=f"{len(lines)}:{Path(path).name}", weight=strength)
        lora = pipe.loras.adapters[name]
        lines.append(f"LoRA {path} ({lora.format}, rank {'/'.join(map(str, lora.ranks))}) strength {strength:g}"
                     + (f"; {len(lora.skipped)} keys skipped" if lora.skipped else ""))
    if args.lora and args.lora_merge:
        pipe.fuse_lora()
        lines.append("LoRAs merged into the weights")
    elif args.lora_merge:
        raise InputError("--lora-merge needs at least one --lora")
    return lines
