"""The MMDiT engine: fused FP8 step, CUDA graphs, torch.compile per block, block streaming, compile cache.

    from sd35fp8.fast import build_engine
    engine = build_engine(mmdit, device, compile=False, offload="none")  # how every road runs the MMDiT
    engine.warmup([(1024, 1024, 1)])           # optional: compile/capture per image shape up front
    v = engine(x, sigma, context, pooled)      # MMDiT.forward's contract; .model .config .fp8_mode .describe()

Modules: engine.py (build_engine: mode, device, flags, offload), step.py (MMDiTEngine: the fused forward),
weights.py (per-linear weight layout), graphs.py (CUDA graphs), kernels.py / attention*.py (Triton),
cache.py (persistent Inductor cache: `enable_compile_cache`, mega-cache artifacts).
"""

from __future__ import annotations

from sd35fp8.fast.cache import (CACHE_ENV, default_cache_dir, enable_compile_cache, load_compile_artifacts,
                                save_compile_artifacts)
from sd35fp8.fast.engine import OFFLOAD_MODES, PlainForward, build_engine, default_compile, fp8_mode_of
from sd35fp8.fast.step import MMDiTEngine, joint_block

__all__ = ["MMDiTEngine", "PlainForward", "build_engine", "default_compile", "fp8_mode_of", "OFFLOAD_MODES", "joint_block",
           "enable_compile_cache", "default_cache_dir", "save_compile_artifacts", "load_compile_artifacts",
           "CACHE_ENV"]
