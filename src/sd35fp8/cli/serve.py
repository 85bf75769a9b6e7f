"""`sd35fp8 serve`: the argparse side of ComfyUI's HTTP/WebSocket server; the wiring is
`sd35fp8.server.serve.serve`."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..scale.options import add_scale_args, scale_options


def add_parsers(sub) -> dict[str, Callable[[argparse.Namespace], int]]:
    srv = sub.add_parser(
        "serve",
        help="serve ComfyUI's HTTP/WebSocket API (and its web UI) on the FP8 engine",
        description="Serve ComfyUI's API (/prompt, /queue, /history, /view, /upload/image, /object_info, "
        "/ws, ...) so ComfyUI clients and the ComfyUI web UI work unchanged. Binds 127.0.0.1 by default; "
        "another address needs --auth-token or --insecure.",
    )
    srv.add_argument("--listen", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8188, help="port (default 8188)")
    srv.add_argument("--models", default="models", help="ComfyUI-style models folder")
    srv.add_argument("--output", default=None, help="output folder (default: output/ beside the models folder)")
    srv.add_argument("--input", default=None, help="input folder for uploads (default: input/ beside it)")
    srv.add_argument("--extra-model-paths", default=None, help="ComfyUI extra_model_paths.yaml")
    srv.add_argument("--auth-token", default=None, help="bearer token required on HTTP and WS (or SD35FP8_AUTH_TOKEN)")
    srv.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a token")
    srv.add_argument("--max-queue", type=int, default=100, help="pending prompts before /prompt answers 429")
    srv.add_argument("--max-upload-mb", type=int, default=100, help="largest accepted upload")
    srv.add_argument("--max-batch", type=int, default=8,
                     help="queued prompts differing only in texts/seeds sampled as one batch (1 disables)")
    srv.add_argument("--batch-wait-ms", type=float, default=20.0,
                     help="how long a taken prompt waits for compatible ones (0: only those already queued)")
    srv.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    add_scale_args(srv)  # --replicas etc.: scale/options.py
    return {"serve": cmd_serve}


def cmd_serve(args: argparse.Namespace) -> int:
    from ..pipeline import resolve_device
    from ..server.serve import serve

    pending = serve(listen=args.listen, port=args.port, models_dir=args.models, output_dir=args.output,
                    auth_token=args.auth_token, insecure=args.insecure, input_dir=args.input,
                    extra_model_paths=args.extra_model_paths, max_queue=args.max_queue,
                    max_upload_bytes=args.max_upload_mb * 1024 * 1024, device=str(resolve_device(args.device)),
                    max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, scale=scale_options(args))
    if pending:
        print(f"sd35fp8 serve: stopped with {len(pending)} prompts not run: {', '.join(pending)}", file=sys.stderr)
    return 0
