"""`sd35fp8 run`: run a ComfyUI workflow (API or UI format) once, without a server."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ..errors import InputError
from .common import add_engine_args, check_output_folder


def add_parsers(sub) -> dict[str, Callable[[argparse.Namespace], int]]:
    run = sub.add_parser(
        "run",
        help="run a ComfyUI workflow (API or UI format JSON)",
        description="Run a ComfyUI workflow: API format ({id: {class_type, inputs}}) or the UI's "
        "saved workflow (nodes + links). Model names resolve in a ComfyUI-style models folder.",
    )
    run.add_argument("workflow", help="workflow .json file, or an image ComfyUI/this server saved (PNG, WebP, "
                     "JPEG) with its workflow embedded")
    run.add_argument("--models", default="models",
                     help="ComfyUI-style models folder (checkpoints/, diffusion_models/, text_encoders/, vae/)")
    run.add_argument("--output", default=None, help="output folder (default: output/ beside the models folder)")
    run.add_argument("--extra-model-paths", default=None, help="ComfyUI extra_model_paths.yaml")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input, e.g. --set 3.seed=42 (repeatable; values parse as JSON)")
    run.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    add_engine_args(run, "on for CUDA (the device's default), off on the CPU")
    return {"run": cmd_run}


def cmd_run(args: argparse.Namespace) -> int:
    from ..pipeline import resolve_device
    from ..workflow import run_workflow
    from ..workflow.progress_bars import ProgressBars

    bars = ProgressBars()  # a sampling bar per node (KSampler steps), on stderr

    def hooks(event: str, data: dict) -> None:
        if event == "executing" and data.get("node") is not None:
            logging.getLogger("sd35fp8.run").info("executing node %s", data["node"])
        bars(event, data)

    if args.output is not None:
        check_output_folder(args.output)  # before any model loads or step runs
    device = resolve_device(args.device)
    if args.compile and device.type != "cuda":
        raise InputError(f"--compile needs a CUDA device (got {device}); on the CPU the engine runs eager")
    try:
        result = run_workflow(args.workflow, args.models, output_dir=args.output, sets=args.sets,
                              device=str(device), hooks=hooks, extra_model_paths=args.extra_model_paths,
                              compile=args.compile, offload=args.offload,
                              attention=args.attention, cache_threshold=args.cache_threshold)
    finally:
        bars.close()
    if not result.success:
        err = result.error or {}
        print(f"sd35fp8 run: node {err.get('node_id')} ({err.get('node_type')}) failed: "
              f"{err.get('exception_message', 'interrupted' if result.interrupted else '')}", file=sys.stderr)
        return 1
    for node, ui in result.outputs.items():
        for image in (ui or {}).get("images", []):
            print(result.output_dir / image.get("subfolder", "") / image["filename"])
    return 0
