"""`sd35fp8 serve` options for replicas on Ray Serve (the serve command registers them here).

    add_scale_args(parser)            # --replicas, --min-replicas/--max-replicas, --ray-address, --attach, ...
    scale = scale_options(args)       # None without --replicas/--attach, else create_ray_app's keywords
"""

from __future__ import annotations

import argparse
from typing import Any


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
