"""The LoRA parts of the command line: `generate --lora FILE[:STRENGTH] --lora-merge` and
`sd35fp8 info LORA.safetensors`.

    add_generate_args(parser); apply_generate_args(pipe, args)   # in the generate command
    is_lora_file(path) / describe_lora(path) / format_lora(info) # in the info command
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sd35fp8.errors import InputError

from .files import guess_base, read_lora
from .keys import split_key


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


def is_lora_file(path: str | Path) -> bool:
    """A safetensors file whose keys are LoRA factors (header only)."""
    from sd35fp8.checkpoints.safetensors_file import SafetensorsFile

    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    keys = SafetensorsFile(p).keys()
    return bool(keys) and sum(split_key(k) is not None for k in keys) >= len(keys) / 2


def describe_lora(path: str | Path) -> dict[str, Any]:
    lora = read_lora(path)
    comps = lora.components()
    kinds = sorted({m.rsplit(".", 1)[-1] if c != "mmdit" else ".".join(m.split(".")[2:]) or m
                    for c, m in lora.terms})
    meta = {k: v for k, v in lora.metadata.items() if len(v) < 400}
    return {"file": str(path), "kind": "LoRA", "format": lora.format, "ranks": lora.ranks,
            "targets": comps, "layer_kinds": kinds, "fits": guess_base(lora), "skipped": lora.skipped,
            "dora": lora.dora, "metadata": meta}


def format_lora(info: dict[str, Any]) -> str:
    targets = ", ".join(f"{c} {n} layers" for c, n in info["targets"].items())
    lines = [f"{info['file']}: LoRA, {info['format']}",
             f"  rank: {', '.join(map(str, info['ranks']))}",
             f"  targets: {targets}",
             f"  layers: {', '.join(info['layer_kinds'])}",
             f"  fits: {info['fits']}"]
    if info["skipped"]:
        lines.append(f"  skipped ({len(info['skipped'])} keys match no SD3.5 layer): {', '.join(info['skipped'][:5])}")
    return "\n".join(lines)
