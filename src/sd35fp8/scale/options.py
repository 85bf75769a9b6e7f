"""`sd35fp8 serve` options for replicas on Ray Serve and for one image on several GPUs (the serve
command registers them here; torch-free, so `--help` stays light).

    add_scale_args(parser)            # --replicas, --min-replicas/--max-replicas, --ray-address, --attach, ...
    scale = scale_options(args)       # None without --replicas/--attach, else create_ray_app's keywords
    add_gpus_args(parser)             # --gpus-per-image K, --cfg-parallel C
    layout = gpus_per_image(args)     # None: one process; else (K, C) for scale.gpus
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from sd35fp8.errors import InputError


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_scale_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("replicas on Ray Serve (pip install 'sd35fp8[scale]')")
    g.add_argument("--replicas", type=_at_least_one, default=None,
                   help="run prompts on N engine replicas under Ray Serve (one GPU each; CPU replicas without GPUs)")
    g.add_argument("--min-replicas", type=_at_least_one, default=None, help="autoscale from this many replicas")
    g.add_argument("--max-replicas", type=_at_least_one, default=None, help="autoscale up to this many replicas")
    g.add_argument("--max-ongoing-requests", type=_at_least_one, default=1,
                   help="prompts (or cross-prompt batches) one replica runs at once (default 1)")
    g.add_argument("--replica-gpus", type=float, default=None, help="GPUs per replica (default 1 with CUDA, else 0)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to join ('auto' = the local `ray start` head); default: start a local one")
    g.add_argument("--attach", action="store_true",
                   help="use the engine app a `serve deploy` config already runs (see deploy/ray_serve.yaml)")
    g.add_argument("--ray-app", default="sd35fp8", help="Ray Serve application name (default sd35fp8)")


def scale_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.replicas is None and not args.attach and args.min_replicas is None and args.max_replicas is None:
        return None
    deployment: dict[str, Any] = {"max_ongoing_requests": args.max_ongoing_requests, "num_cpus": args.replica_cpus}
    if args.replica_gpus is not None:
        deployment["num_gpus"] = args.replica_gpus
    if args.min_replicas is not None or args.max_replicas is not None:
        deployment["min_replicas"], deployment["max_replicas"] = args.min_replicas, args.max_replicas
    return {"replicas": args.replicas or 1, "ray_address": args.ray_address, "attach": args.attach,
            "app_name": args.ray_app, "deployment": deployment}


def add_gpus_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "one image on several GPUs (torch.distributed)",
        "Every image is sampled by K processes, one per GPU (gloo processes with --device cpu): rank 0 serves "
        "HTTP and the others follow it (README, 'Serving at scale'). serve starts them itself, or run "
        "`torchrun --nproc-per-node K -m sd35fp8 serve ...`. The parallel MMDiT runs eager, without offload "
        "or ControlNet.")
    g.add_argument("--gpus-per-image", type=_at_least_one, default=None, metavar="K",
                   help="processes (GPUs) that sample each image together; 1 = off (default; under torchrun: its "
                   "WORLD_SIZE). Needs K GPUs on this machine with CUDA")
    g.add_argument("--cfg-parallel", type=int, choices=(1, 2), default=1, metavar="C",
                   help="2: the conditional and unconditional halves of each step on two rank groups (one "
                   "exchange per step; K must be even); the K/C ranks of a group split the image tokens "
                   "(sequence parallel, an all-to-all per attention). Default 1: sequence parallel only, the "
                   "choice for cfg 1 models (Turbo), whose steps have no unconditional half")


def gpus_per_image(args: argparse.Namespace) -> tuple[int, int] | None:
    """(K, cfg parallel) for `--gpus-per-image K` (or torchrun's WORLD_SIZE), None for one process."""
    k = args.gpus_per_image
    if k is None:
        k = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: every process runs `serve`
    if k <= 1:
        if args.cfg_parallel != 1:
            raise InputError("--cfg-parallel 2 needs --gpus-per-image 2 or more")
        return None
    return k, args.cfg_parallel
