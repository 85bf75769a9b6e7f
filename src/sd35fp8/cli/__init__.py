"""`sd35fp8` command line: one module per command group, assembled here.

    generate.py  sd35fp8 generate          (images from a prompt, SD35Pipeline)
    info.py      sd35fp8 info | samplers   (describe a file, list sampler names)
    workflow.py  sd35fp8 run               (a ComfyUI workflow, once)
    serve.py     sd35fp8 serve             (argparse only; the wiring is server/serve.py)
    fp8.py       sd35fp8 calibrate | quantize
    eval.py      sd35fp8 eval              (the tiny model's score in BF16 and each FP8 mode)
    common.py    arguments and argparse types shared by the commands

The command modules import the engine (torch, transformers) inside their handlers, so that
`sd35fp8 --help` and argument errors answer without loading it.

Every parameter is checked before any model loads, so a typo costs nothing. `python -m sd35fp8`
and `python -m sd35fp8.cli` run `main()` too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from ..errors import SD35Error
from . import eval, fp8, generate, info, serve, workflow
from .common import LONG_PROMPT_HELP, add_model_args, positive_int

_positive_int = positive_int  # the name other modules and older code import

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd35fp8",
        description="Stable Diffusion 3.5 (Large, Large Turbo, Medium) with FP8 weights and math.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and chosen")
    sub = parser.add_subparsers(dest="command", required=True)
    COMMANDS.update(generate.add_parsers(sub))
    COMMANDS.update(info.add_parsers(sub))
    COMMANDS.update(workflow.add_parsers(sub))
    COMMANDS.update(serve.add_parsers(sub))
    COMMANDS.update(eval.add_parsers(sub))
    COMMANDS.update(fp8.add_parsers(sub))
    for p in sub.choices.values():  # `sd35fp8 generate ... -v` as well as `sd35fp8 -v generate ...`
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log what is loaded and chosen")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (SD35Error, OSError, json.JSONDecodeError) as exc:  # bad input or files: one line, no traceback
        print(f"sd35fp8 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sd35fp8 {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "LONG_PROMPT_HELP", "add_model_args", "build_parser", "main", "positive_int"]
