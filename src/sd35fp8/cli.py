"""`sd35fp8` command line: generate images, describe files (and, as they land, calibrate,
quantize, eval, run workflows, serve the ComfyUI API).

Every parameter is checked before any model loads, so a typo costs nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SD35Error

LONG_PROMPT_HELP = (
    "Prompts longer than 77 CLIP tokens are split into 77-token chunks that are encoded "
    "separately and concatenated, as ComfyUI does (the pooled vector comes from the first "
    "chunk); T5 sees the whole prompt."
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd35fp8",
        description="Stable Diffusion 3.5 (Large, Large Turbo, Medium) with FP8 weights and math.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and chosen")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="make images from a prompt",
        description="Make images from a prompt. " + LONG_PROMPT_HELP,
        epilog="Defaults follow the reference (sd3_infer.py): Large 40 steps cfg 4.5 dpmpp_2m; "
        "Large Turbo 4 steps cfg 1 euler; Medium 50 steps dpmpp_2m with skip-layer guidance at "
        "cfg 4 (cfg 5 with --no-slg); the shipped model uses its own recorded defaults.",
    )
    gen.add_argument("prompt", help="the text prompt. " + LONG_PROMPT_HELP)
    _add_model_args(gen)
    s = gen.add_argument_group("sampling")
    s.add_argument("--negative", default="", help="negative prompt (default: empty prompt)")
    s.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: per model)")
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale; 1 skips the negative pass")
    s.add_argument("--sampler", default=None, help="ComfyUI sampler name (default: per model); see `sd35fp8 samplers`")
    s.add_argument("--scheduler", default=None, help="ComfyUI scheduler name (default: normal)")
    s.add_argument("--shift", type=float, default=None, help="flow-matching shift (default 3.0)")
    s.add_argument("--seed", type=int, default=0, help="noise seed (same image on every device)")
    s.add_argument("--width", type=int, default=None, help="image width, multiple of 16 (default: per model)")
    s.add_argument("--height", type=int, default=None, help="image height, multiple of 16 (default: per model)")
    s.add_argument("--batch", type=_positive_int, default=1, help="images per prompt (seeds are one batch, like ComfyUI)")
    s.add_argument("--fp8", default=None, choices=["none", "weight_only", "dynamic", "static"],
                   help="FP8 mode of the MMDiT (default: FP8 files run as FP8, others in --dtype)")
    s.add_argument("--no-slg", action="store_true", help="disable skip-layer guidance (Medium)")
    s.add_argument("--offload", default="none", choices=["none", "model", "sequential"],
                   help="none: every model on the GPU; model: each model on the GPU only while it runs "
                   "(12 GB cards); sequential: also stream MMDiT/T5 blocks with prefetch (8 GB cards)")
    s.add_argument("--compile", action="store_true",
                   help="fast MMDiT step: fused FP8 kernels, torch.compile, CUDA graphs (CUDA, --offload none); "
                   "the first image of a size compiles, cached in ~/.cache/sd35fp8")
    gen.add_argument("-o", "--output", default="out.png",
                     help="output PNG; with --batch > 1, _0, _1, ... are added before the suffix")

    info = sub.add_parser("info", help="describe a model file or folder",
                          description="Describe a checkpoint: model kind, precision, fp8 scaling, keys, size.")
    info.add_argument("path", help="file, diffusers folder or cached repo id")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")

    run = sub.add_parser(
        "run",
        help="run a ComfyUI workflow (API or UI format JSON)",
        description="Run a ComfyUI workflow: API format ({id: {class_type, inputs}}) or the UI's "
        "saved workflow (nodes + links). Model names resolve in a ComfyUI-style models folder.",
    )
    run.add_argument("workflow", help="workflow .json file")
    run.add_argument("--models", default="models",
                     help="ComfyUI-style models folder (checkpoints/, diffusion_models/, text_encoders/, vae/)")
    run.add_argument("--output", default=None, help="output folder (default: output/ beside the models folder)")
    run.add_argument("--extra-model-paths", default=None, help="ComfyUI extra_model_paths.yaml")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                     help="override an input, e.g. --set 3.seed=42 (repeatable; values parse as JSON)")
    run.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")

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

    sub.add_parser("samplers", help="list sampler and scheduler names")
    from .tiny.evaluate import add_subcommand as add_eval

    COMMANDS["eval"] = add_eval(sub)
    from .fp8.commands import add_subcommands as add_fp8

    COMMANDS.update(add_fp8(sub))
    for p in sub.choices.values():  # `sd35fp8 generate ... -v` as well as `sd35fp8 -v generate ...`
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log what is loaded and chosen")
    return parser


def _validate_generate(args: argparse.Namespace) -> None:
    """Check every parameter before any model loads."""
    import math

    from .errors import InputError
    from .pipeline import resolve_device
    from .sampling import check_scheduler, get_sampler

    resolve_device(args.device)
    for name in ("cfg", "shift"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{name} must be a finite number, got {value}")

    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 16):
            raise InputError(f"--{name} must be a positive multiple of 16, got {value}")
    if args.cfg is not None and args.cfg < 0:
        raise InputError(f"--cfg must be >= 0, got {args.cfg}")
    if args.shift is not None and args.shift <= 0:
        raise InputError(f"--shift must be > 0, got {args.shift}")
    if args.sampler is not None:
        get_sampler(args.sampler)  # InputError naming the valid ones
    if args.scheduler is not None:
        check_scheduler(args.scheduler)
    if not 0 <= args.seed < 2**64:
        raise InputError(f"--seed must be in [0, 2**64), got {args.seed}")
    if not args.prompt.strip():
        raise InputError("the prompt is empty")
    if args.compile and args.offload != "none":
        raise InputError(f"--compile keeps the MMDiT on the GPU: it needs --offload none, got --offload {args.offload}")
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise InputError(f"-o must name a .png file, got {args.output}")
    if not out.parent.exists():
        raise InputError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise InputError(f"-o {args.output} is a folder; name a .png file")


def _cmd_generate(args: argparse.Namespace) -> int:
    _validate_generate(args)
    from .pipeline import SD35Pipeline, dtype_from_name

    pipe = SD35Pipeline.from_pretrained(
        args.model,
        clip_l=args.clip_l,
        clip_g=args.clip_g,
        t5xxl=args.t5xxl,
        t5_tokenizer=args.t5_tokenizer,
        device=args.device,
        dtype=dtype_from_name(args.dtype),
        fp8=args.fp8,
        offload=args.offload,
        compile=args.compile,
    )
    print(f"sd35fp8: {pipe.summary()}", file=sys.stderr)
    result = pipe(
        args.prompt,
        negative_prompt=args.negative,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        height=args.height,
        width=args.width,
        seed=args.seed,
        sampler=args.sampler,
        scheduler=args.scheduler,
        shift=args.shift,
        num_images_per_prompt=args.batch,
        slg=False if args.no_slg else None,
    )
    if args.verbose:
        from .offload import peak_memory_report

        print(peak_memory_report(pipe.stats), file=sys.stderr)  # seconds and peak GPU memory per stage
    paths = result.save(args.output)
    for path in paths:
        print(path)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .checkpoints.info import describe_file, format_info

    info = describe_file(args.path)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


def _cmd_samplers(args: argparse.Namespace) -> int:
    from .sampling import SAMPLERS, SCHEDULERS

    print("samplers:   " + " ".join(sorted(SAMPLERS)))
    print("schedulers: " + " ".join(SCHEDULERS))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import resolve_device
    from .workflow import run_workflow

    def hooks(event: str, data: dict) -> None:
        if event == "executing" and data.get("node") is not None:
            logging.getLogger("sd35fp8.run").info("executing node %s", data["node"])

    result = run_workflow(args.workflow, args.models, output_dir=args.output, sets=args.sets,
                          device=str(resolve_device(args.device)), hooks=hooks,
                          extra_model_paths=args.extra_model_paths)
    if not result.success:
        err = result.error or {}
        print(f"sd35fp8 run: node {err.get('node_id')} ({err.get('node_type')}) failed: "
              f"{err.get('exception_message', 'interrupted' if result.interrupted else '')}", file=sys.stderr)
        return 1
    for node, ui in result.outputs.items():
        for image in (ui or {}).get("images", []):
            print(result.output_dir / image.get("subfolder", "") / image["filename"])
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from .pipeline import resolve_device
    from .server import serve

    pending = serve(listen=args.listen, port=args.port, models_dir=args.models, output_dir=args.output,
                    auth_token=args.auth_token, insecure=args.insecure, input_dir=args.input,
                    extra_model_paths=args.extra_model_paths, max_queue=args.max_queue,
                    max_upload_bytes=args.max_upload_mb * 1024 * 1024, device=str(resolve_device(args.device)),
                    max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
    if pending:
        print(f"sd35fp8 serve: stopped with {len(pending)} prompts not run: {', '.join(pending)}", file=sys.stderr)
    return 0


COMMANDS = {"generate": _cmd_generate, "info": _cmd_info, "samplers": _cmd_samplers, "run": _cmd_run,
            "serve": _cmd_serve}


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


if __name__ == "__main__":
    raise SystemExit(main())
