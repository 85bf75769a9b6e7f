"""Persistent torch.compile cache for the engine.

torch.compile's generated kernels and graphs are cached on disk by Inductor (TORCHINDUCTOR_CACHE_DIR,
default /tmp/torchinductor_<user>, lost on reboot). `enable_compile_cache` points it at a persistent
folder (argument, else $SD35FP8_CACHE_DIR, else ~/.cache/sd35fp8/inductor) before the first compile,
so a second process compiles from cache (build_engine calls it whenever compile=True; the
measured cold vs warm start is in benchmarks/results/paths_<device>.json).
`save_compile_artifacts(path)` / `load_compile_artifacts(path)` wrap torch.compiler's mega-cache
(one file holding every cache entry of this process) to ship a warm cache to another machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

CACHE_ENV = "SD35FP8_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sd35fp8") / "inductor"


def enable_compile_cache(path: str | os.PathLike | None = None) -> Path:
    """Persistent Inductor/FX-graph cache; call before the first torch.compile. Returns the folder.

    Leaves an explicit TORCHINDUCTOR_CACHE_DIR alone when no path is given.
    """
    if path is None and os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    else:
        folder = Path(path) if path is not None else default_cache_dir()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    inductor_config.fx_graph_cache = True
    return folder


def save_compile_artifacts(path: str | os.PathLike) -> int:
    """Write torch.compiler's mega-cache of this process to `path`; returns bytes written (0: nothing)."""
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        return 0
    data, _info = result
    Path(path).write_bytes(data)
    return len(data)


def load_compile_artifacts(path: str | os.PathLike) -> bool:
    """Preload a mega-cache file written by save_compile_artifacts (before compiling)."""
    return torch.compiler.load_cache_artifacts(Path(path).read_bytes()) is not None
