"""`sd35fp8 info` (describe a model file or folder) and `sd35fp8 samplers` (list the names)."""

from __future__ import annotations

import argparse
import json
from typing import Callable


def add_parsers(sub) -> dict[str, Callable[[argparse.Namespace], int]]:
    info = sub.add_parser("info", help="describe a model file or folder",
                          description="Describe a checkpoint: model kind, precision, fp8 scaling, keys, size.")
    info.add_argument("path", help="file, diffusers folder or cached repo id")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_parser("samplers", help="list sampler and scheduler names")
    return {"info": cmd_info, "samplers": cmd_samplers}


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoints.info import describe_file, format_info
    from ..lora.commands import describe_lora, format_lora, is_lora_file

    if is_lora_file(args.path):
        info = describe_lora(args.path)
        print(json.dumps(info, indent=2, default=str) if args.json else format_lora(info))
        return 0
    info = describe_file(args.path)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from ..sampling import SAMPLERS, SCHEDULERS

    print("samplers:   " + " ".join(sorted(SAMPLERS)))
    print("schedulers: " + " ".join(SCHEDULERS))
    return 0
