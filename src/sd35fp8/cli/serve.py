"""`sd35fp8 serve`: the argparse side of ComfyUI's HTTP/WebSocket server; the wiring is
`sd35fp8.server.serve.serve`.

The server's modules are imported inside `cmd_serve` (they load torch, FastAPI and the workflow
engine): the request limits default to None here, meaning the server's own default, which `--help`
names without importing it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..defaults import DEFAULT_PREVIEW_SIZE, PREVIEW_METHODS
from ..errors import InputError
from ..scale.options import add_gpus_args, add_scale_args, gpus_per_image, scale_options
from .common import add_engine_args, parse_shape, positive_int

# the server's defaults, shown in --help (tests/test_cli.py checks them against server/)
SERVER_DEFAULTS = {
    "max_body_bytes": 16 * 1024 * 1024, "max_json_depth": 64, "max_nodes": 2000, "max_text_chars": 8192,
    "max_prompt_tokens": 512,
    "max_pixel_steps": 2048 * 2048 * 8 * 100, "max_model_nodes": 2,  # validation.Limits
    "max_upload_pixels": 8192 * 8192,  # files.DEFAULT_MAX_UPLOAD_PIXELS
    "header_timeout": 10.0, "keep_alive": 5, "max_connections": 256,  # connections.DEFAULT_*
}
DRAIN_SECONDS, HANG_SECONDS = 60.0, 900.0  # server.lifecycle.DEFAULT_DRAIN_SECONDS / DEFAULT_HANG_SECONDS
LIMITS_FIELDS = ("max_body_bytes", "max_json_depth", "max_nodes", "max_text_chars", "max_prompt_tokens",
                 "max_pixel_steps", "max_model_nodes")
LIMIT_FLAGS = (
    ("--max-body-bytes", positive_int, "largest JSON request body (413 beyond)"),
    ("--max-json-depth", positive_int, "deepest JSON nesting accepted"),
    ("--max-nodes", positive_int, "most nodes in one prompt"),
    ("--max-text-chars", positive_int, "longest text input (prompt) in characters; longer is refused (400)"),
    ("--max-prompt-tokens", positive_int, "tokens per prompt text and encoder (CLIP, T5) kept; a longer text is "
     "cut, with a warning in the /prompt answer"),
    ("--max-pixel-steps", positive_int, "budget for width x height x batch x steps of one prompt"),
    ("--max-model-nodes", positive_int, "model merge and save nodes in one prompt (each merge builds a new copy "
     "of the MMDiT, each save writes one to disk)"),
    ("--max-upload-pixels", positive_int, "largest image an upload may declare, in pixels"),
    ("--header-timeout", float, "seconds a connection may take to send its request headers"),
    ("--keep-alive", positive_int, "seconds an idle keep-alive connection stays open"),
    ("--max-connections", positive_int, "concurrent connections before the server answers 503"),
)


def add_parsers(sub) -> dict[str, Callable[[argparse.Namespace], int]]:
    srv = sub.add_parser(
        "serve",
        help="serve ComfyUI's HTTP/WebSocket API (and its web UI) on the FP8 engine",
        description="Serve ComfyUI's API (/prompt, /queue, /history, /view, /upload/image, /object_info, "
        "/ws, ...) so ComfyUI clients and the ComfyUI web UI work unchanged. Binds 127.0.0.1 by default; "
        "another address needs an auth token (--auth-token-file) or --insecure.",
    )
    srv.add_argument("--listen", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8188, help="port (default 8188)")
    srv.add_argument("--models", default="models", help="ComfyUI-style models folder")
    srv.add_argument("--output", default=None, help="output folder (default: output/ beside the models folder)")
    srv.add_argument("--input", default=None, help="input folder for uploads (default: input/ beside it)")
    srv.add_argument("--extra-model-paths", default=None, help="ComfyUI extra_model_paths.yaml")
    srv.add_argument("--auth-token-file", default=None,
                     help="file whose first line is the bearer token required on HTTP and WS (or set SD35FP8_AUTH_TOKEN)")
    srv.add_argument("--auth-token", default=None,
                     help="the token itself; visible to local users in ps while the server runs: prefer --auth-token-file")
    srv.add_argument("--insecure", action="store_true", help="allow a non-loopback address without a token")
    srv.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="a Host name besides localhost/127.0.0.1/::1 that browsers may use (DNS rebinding guard; "
                     "repeatable; '*' = any)")
    srv.add_argument("--enable-cors-header", nargs="?", const="*", default=None, metavar="ORIGIN",
                     help="as ComfyUI: send CORS headers for ORIGIN (default '*') instead of refusing cross-origin "
                     "requests")
    srv.add_argument("--max-queue", type=int, default=100, help="pending prompts before /prompt answers 429")
    srv.add_argument("--max-upload-mb", type=int, default=100, help="largest accepted upload")
    srv.add_argument("--max-batch", type=int, default=8,
                     help="queued prompts differing only in texts/seeds (deterministic samplers) sampled as one "
                     "batch, at most this many (1 disables); each image equals the prompt run alone (bit for bit "
                     "on the CPU; on CUDA GEMMs of another batch size may round differently)")
    srv.add_argument("--batch-wait-ms", type=float, default=20.0,
                     help="how long a taken prompt waits for compatible ones (0: only those already queued)")
    srv.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    srv.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="a sampling progress bar per prompt on stderr (default on)")
    srv.add_argument("--preview-method", default="none", choices=PREVIEW_METHODS,
                     help="live previews of each sampling step over /ws, as ComfyUI's flag: latent2rgb (and auto) "
                     "is SD3's latent -> RGB map at 1/8 of the image's size; taesd decodes at the image's size "
                     "with models/vae_approx/taesd3_decoder.* (latent2rgb without one); a prompt's "
                     "extra_data.preview_method (the web UI's 'Live preview method' setting) overrides it. "
                     "Default none")
    srv.add_argument("--preview-size", type=positive_int, default=DEFAULT_PREVIEW_SIZE, metavar="PX",
                     help=f"largest side of a live preview (default {DEFAULT_PREVIEW_SIZE})")
    life = srv.add_argument_group("durable queue and lifecycle")
    life.add_argument("--state-dir", default="auto",
                      help="folder of the queue + history journal (SQLite); accepted prompts survive a crash or "
                      "restart (default: sd35fp8-state/ beside the output folder; 'none' keeps them in memory only)")
    life.add_argument("--on-restart", choices=["requeue", "fail"], default="requeue",
                      help="prompts left pending or running by the last run: run them again (default) or mark them "
                      "failed in /history")
    life.add_argument("--drain-seconds", type=float, default=DRAIN_SECONDS,
                      help="on SIGTERM/SIGINT: how long the running prompt may take to finish (new prompts get 503; "
                      f"default {DRAIN_SECONDS:g}); a second signal stops at once")
    life.add_argument("--hang-seconds", type=float, default=HANG_SECONDS,
                      help=f"a busy worker without progress this long (default {HANG_SECONDS:g}) is hung: /ready "
                      "turns false and it is restarted")
    life.add_argument("--warmup", default=None, metavar="WORKFLOW",
                      help="at start-up, before the first prompt: load this workflow's models (API or UI JSON, or a "
                      "PNG carrying one) and warm them up (first-use kernels; compiled MMDiT graphs per size); /ready "
                      "is false until that is done. A later prompt with the same loaders reuses the loaded models")
    life.add_argument("--warmup-shapes", nargs="+", type=parse_shape, default=None, metavar="WxH[xB]",
                      help="sizes to warm up for (width x height x images per prompt, e.g. 1024x1024 832x1216x2; "
                      "default: the sizes of the --warmup workflow's empty-latent nodes)")
    lim = srv.add_argument_group("request limits")
    for flag, kind, what in LIMIT_FLAGS:
        lim.add_argument(flag, type=kind, default=None,
                         help=f"{what} (default {SERVER_DEFAULTS[flag[2:].replace('-', '_')]})")
    add_engine_args(srv, "on for CUDA (compiled and captured per image size), off on the CPU")
    add_scale_args(srv)  # --replicas etc.: scale/options.py
    add_gpus_args(srv)  # --gpus-per-image, --cfg-parallel: scale/options.py, scale/gpus.py
    return {"serve": cmd_serve}


def models_folder_warning(models: str) -> str | None:
    """What to tell a user whose --models folder cannot serve a prompt yet: missing, not a folder, or holding no
    model file in any ComfyUI subfolder. None when it has models."""
    from pathlib import Path

    root = Path(models).expanduser()
    if not root.exists():
        return f"models folder {root} does not exist: no model can load until it does (checkpoints/, diffusion_models/," \
               " text_encoders/, vae/ inside it; or pass --models DIR)"
    if not root.is_dir():
        return f"--models {root} is a file, not a folder (ComfyUI's models/ layout: checkpoints/, text_encoders/, ...)"
    if not any(p.suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".sft", ".bin", ".gguf")
               for p in root.glob("*/**/*")):
        return f"models folder {root} holds no model file yet (looked in its subfolders: checkpoints/, " \
               "diffusion_models/, text_encoders/, vae/, loras/, controlnet/ ...)"
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    if args.auth_token:  # before the slow imports: the token shows in ps until the title is rewritten
        from ..server.tokens import TOKEN_ENV, mask_process_title

        hidden = mask_process_title(sys.argv, args.auth_token)
        print("sd35fp8 serve: warning: --auth-token puts the token on the command line, where other local "
              "users can read it (ps, /proc/<pid>/cmdline); "
              + ("the process title is now rewritten with it masked, but it was visible during start-up; "
                 if hidden else "it stays visible while the server runs; ")
              + f"use --auth-token-file FILE (chmod 600) or {TOKEN_ENV}", file=sys.stderr)
    from ..pipeline import resolve_device
    from ..server.serve import serve
    from ..server.validation import Limits

    if args.warmup_shapes and not args.warmup:
        raise InputError("--warmup-shapes needs --warmup WORKFLOW.json (its loader nodes name the models to warm up)")
    device = resolve_device(args.device)
    if args.compile and device.type != "cuda":
        raise InputError(f"--compile needs a CUDA device (got {device}); on the CPU the engine runs eager")
    layout = gpus_per_image(args)  # (K, cfg parallel) or None
    scale = scale_options(args)
    if layout is not None:
        _check_gpus_per_image(args, device, scale)
    limits = Limits(**{k: getattr(args, k) for k in LIMITS_FIELDS if getattr(args, k) is not None})
    if args.extra_model_paths is None and (warning := models_folder_warning(args.models)) is not None:
        print(f"sd35fp8 serve: warning: {warning}", file=sys.stderr)
    given = {k: getattr(args, k) for k in ("max_upload_pixels", "header_timeout", "keep_alive", "max_connections")
             if getattr(args, k) is not None}  # the others keep the server's defaults
    options = dict(listen=args.listen, port=args.port, models_dir=args.models, output_dir=args.output,
                   auth_token=args.auth_token, auth_token_file=args.auth_token_file, insecure=args.insecure,
                   allow_hosts=args.allow_host, cors_origin=args.enable_cors_header, limits=limits,
                   input_dir=args.input, extra_model_paths=args.extra_model_paths, max_queue=args.max_queue,
                   max_upload_bytes=args.max_upload_mb * 1024 * 1024, device=str(device),
                   max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, scale=scale,
                   state_dir=None if args.state_dir == "none" else args.state_dir, on_restart=args.on_restart,
                   drain_seconds=args.drain_seconds, hang_seconds=args.hang_seconds, compile=args.compile,
                   offload=args.offload, console_progress=args.progress, attention=args.attention,
                   cache_threshold=args.cache_threshold, preview_method=args.preview_method,
                   preview_size=args.preview_size,
                   **({"warmup_workflow": args.warmup, "warmup_shapes": args.warmup_shapes} if args.warmup else {}),
                   **given)
    if layout is None:
        pending = serve(**options)
    else:
        import logging

        from ..scale.gpus import RankOptions, serve_ranks

        ranks = RankOptions(world=layout[0], cfg=layout[1], device=device.type, models_dir=args.models,
                            input_dir=args.input, extra_model_paths=args.extra_model_paths, attention=args.attention,
                            cache_threshold=args.cache_threshold, preview_method=args.preview_method,
                            preview_size=args.preview_size, max_prompt_tokens=limits.max_prompt_tokens,
                            max_text_chars=limits.max_text_chars, max_pixel_steps=limits.max_pixel_steps,
                            log_level=logging.getLogger().level)
        pending = serve_ranks(ranks, lambda executor: serve(**options, executor=executor), output_dir=args.output)
    if pending:
        print(f"sd35fp8 serve: stopped with {len(pending)} prompts not run: {', '.join(pending)}"
              + (" (journaled: they run on the next start)" if args.state_dir != "none" else ""), file=sys.stderr)
    return 0


def _check_gpus_per_image(args: argparse.Namespace, device, scale) -> None:
    """What --gpus-per-image does not combine with (scale.gpus checks the layout and the GPU count)."""
    if scale is not None:
        raise InputError("--gpus-per-image does not combine with --replicas / --attach yet: run one server per "
                         "group of GPUs, or replicas of one GPU each")
    if args.compile:
        raise InputError("--compile: the parallel MMDiT of --gpus-per-image runs eager (no compiled step); "
                         "leave --compile out")
    if args.offload != "none":
        raise InputError(f"--offload {args.offload} does not combine with --gpus-per-image: every rank holds the "
                         "whole MMDiT on its GPU")
    if device.index is not None:
        raise InputError(f"--device {device} names one GPU; with --gpus-per-image give the type (cuda or cpu): "
                         "rank r takes cuda:r (cuda:LOCAL_RANK under torchrun)")
