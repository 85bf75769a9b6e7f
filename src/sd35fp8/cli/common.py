"""Arguments and argparse types shared by several `sd35fp8` commands."""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

LONG_PROMPT_HELP = (
    "Prompts longer than 77 CLIP tokens are split into 77-token chunks that are encoded "
    "separately and concatenated, as ComfyUI does (the pooled vector comes from the first "
    "chunk); T5 sees the whole prompt."
)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = float(text)
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, the separate text encoder files, --t5-tokenizer, --device, --dtype."""
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


OFFLOAD_MODES = ("none", "model", "sequential")
OFFLOAD_HELP = ("none: every model stays on the GPU; model: the FP8 MMDiT stays on the GPU, text encoders and "
                "VAE move in and out (12 GB cards); sequential: the MMDiT's and T5's blocks stream from pinned "
                "CPU memory with prefetch (8 GB cards)")


def add_engine_args(p: argparse.ArgumentParser, compile_default: str) -> None:
    """--offload (and ComfyUI's --lowvram / --novram spellings) and --compile / --no-compile.

    `compile_default` says in the help what None (neither flag) means for this command; the
    engine decides it from the device (sd35fp8.fast.default_compile)."""
    g = p.add_argument_group("engine")
    off = g.add_mutually_exclusive_group()
    off.add_argument("--offload", default="none", choices=OFFLOAD_MODES, help=OFFLOAD_HELP)
    off.add_argument("--lowvram", dest="offload", action="store_const", const="model",
                     help="ComfyUI's spelling of --offload model")
    off.add_argument("--novram", dest="offload", action="store_const", const="sequential",
                     help="ComfyUI's spelling of --offload sequential")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the fused FP8 MMDiT step (CUDA; the first image of a size compiles, "
                   f"cached in ~/.cache/sd35fp8). Default: {compile_default}")
    g.add_argument("--attention", default="auto", choices=("auto", "fp8", "bf16"),
                   help="MMDiT attention: fp8 = FP8 flash attention (Triton, sm_89+; its torch emulation on the "
                   "CPU), bf16 = SDPA (cuDNN on CUDA). Default auto: fp8 where the FP8 matmul modes run on an "
                   "sm_89+ GPU (FlashAttention-3's FP8 kernel on Hopper in dynamic mode when installed: "
                   "the fa3 extra: pip install -e '.[fa3]'), else bf16")
    from ..defaults import DEFAULT_CACHE_THRESHOLD  # torch-free: --help stays light

    g.add_argument("--cache-threshold", type=non_negative_float, nargs="?", const=DEFAULT_CACHE_THRESHOLD,
                   default=0.0, metavar="T",
                   help="step caching: skip the MMDiT on steps whose velocity the last two full steps forecast "
                   "well (linear in sigma) and use the forecast; T bounds the forecast's estimated error, "
                   "accumulated over the skipped steps (step_cache.py); never the first 20%% of the steps or "
                   "the last step, at most one skip in a row until 40%% of the steps, two until 85%%. "
                   f"Absent: off; the flag alone: {DEFAULT_CACHE_THRESHOLD:g} (measured on the shipped model with "
                   "euler at 20 / 28 steps: 1.82x / 1.87x fewer MMDiT steps at 34 / 41 dB PSNR; README)")


def parse_shape(text: str) -> tuple[int, int, int]:
    """argparse type: 'WxH' or 'WxHxB' -> (width, height, batch); sides positive multiples of 16."""
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT or WIDTHxHEIGHTxBATCH (e.g. 1024x1024x2), got {text!r}")
    width, height, batch = values if len(values) == 3 else (*values, 1)
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive multiples of 16")
    if batch < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the batch must be >= 1")
    return width, height, batch


def git_tracked(path: Path) -> bool:
    """True when `path` is an existing file that a git work tree tracks (False without git)."""
    if not path.is_file():
        return False
    try:
        done = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
                              capture_output=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):  # no git on this machine: nothing is tracked
        return False
    return done.returncode == 0


def check_output(path: str | Path, force: bool, flag: str = "-o") -> Path:
    """An output file checked before any work: its folder exists and takes a new file, it is not a
    folder, and it is not a file git tracks (unless force)."""
    from ..errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; name a file")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sd35fp8-write-test-"):
            pass
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from e
    if not force and git_tracked(path):
        raise InputError(f"{flag} {path} is a file tracked by git; pass --force to overwrite it, or name another file")
    return path


def check_output_folder(folder: str | Path, flag: str = "--output") -> Path:
    """An output folder checked before any work: created if missing (as ComfyUI does) and writable."""
    from ..errors import InputError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sd35fp8-write-test-"):
            pass
    except OSError as e:
        raise InputError(f"{flag} {folder}: cannot write there ({e.strerror})") from e
    return folder


def new_file(stem: str, suffix: str, folder: str | Path = ".") -> Path:
    """The first `stem_00001<suffix>`, `stem_00002<suffix>`... that does not exist in `folder`
    (ComfyUI's SaveImage numbering): a default output never overwrites anything."""
    folder = Path(folder)
    for i in range(1, 10**6):
        path = folder / f"{stem}_{i:05d}{suffix}"
        if not path.exists() and not path.with_name(f"{path.stem}_0{suffix}").exists():
            return path
    raise RuntimeError(f"no free file name {stem}_NNNNN{suffix} in {folder}")
