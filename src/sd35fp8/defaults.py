"""Per-model generation defaults, as the reference's sd3_infer.py sets them.

The model kind comes from the weights (depth, MMDiT-X layers); Large and Large Turbo share an
architecture, so Turbo is recognised from the file's model-spec metadata or, failing that, its
name — the only place a name is used, and only for defaults, never for the config.
A file may carry its own defaults as JSON under the metadata key ``sd35fp8.defaults`` (the
shipped model does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Mapping

DEFAULTS_METADATA_KEY = "sd35fp8.defaults"

# Skip-layer guidance, the one place its defaults live: the reference sd3_infer.py (Stability-AI/sd3.5
# at fbf8f48) CONFIGS["sd3.5_medium"]["skip_layer_config"] = scale 2.5, start 0.01, end 0.20, layers
# [7, 8, 9], and cfg 4.0 while it is on (5.0 without). sampling.SLGConfig takes its defaults from here.
SLG_SCALE = 2.5
SLG_START = 0.01
SLG_END = 0.20
SLG_LAYERS = (7, 8, 9)
SLG_CFG = 4.0


@dataclass(frozen=True)
class GenerationDefaults:
    name: str
    steps: int
    cfg: float
    sampler: str
    scheduler: str = "normal"
    shift: float = 3.0
    width: int = 1024
    height: int = 1024
    slg_scale: float = 0.0  # 0: no skip-layer guidance
    slg_start: float = SLG_START
    slg_end: float = SLG_END
    slg_layers: tuple[int, ...] = ()
    slg_cfg: float | None = None  # cfg while skip-layer guidance is on (None: `cfg`)

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


LARGE = GenerationDefaults("SD3.5 Large", steps=40, cfg=4.5, sampler="dpmpp_2m")
LARGE_TURBO = GenerationDefaults("SD3.5 Large Turbo", steps=4, cfg=1.0, sampler="euler")
MEDIUM = GenerationDefaults(
    "SD3.5 Medium", steps=50, cfg=5.0, sampler="dpmpp_2m",
    slg_scale=SLG_SCALE, slg_start=SLG_START, slg_end=SLG_END, slg_layers=SLG_LAYERS, slg_cfg=SLG_CFG,
)
GENERIC = GenerationDefaults("SD3.5-layout model", steps=28, cfg=4.5, sampler="dpmpp_2m")


def _looks_turbo(metadata: Mapping[str, str], file_name: str) -> bool:
    spec = " ".join(v for k, v in metadata.items() if k.startswith("modelspec.")).lower()
    return "turbo" in spec or "turbo" in file_name.lower()


def defaults_for(depth: int, mmdit_x: bool, metadata: Mapping[str, str] | None = None,
                 file_name: str = "") -> GenerationDefaults:
    """Pick defaults from the inferred architecture, then apply the file's own defaults if any."""
    metadata = dict(metadata or {})
    if depth == 38 and not mmdit_x:
        base = LARGE_TURBO if _looks_turbo(metadata, file_name) else LARGE
    elif depth == 24 and mmdit_x:
        base = MEDIUM
    else:
        base = GENERIC
    own = metadata.get(DEFAULTS_METADATA_KEY)
    if own:
        values = json.loads(own)
        if "slg_layers" in values:
            values["slg_layers"] = tuple(values["slg_layers"])
        base = replace(base, **values)
    return base


# Step caching (step_cache.py): the threshold of `--cache-threshold` given without a value (off when
# the flag is absent), on the "error" rule's scale (linear forecast, estimated forecast error), with the
# cache's warmup (first 20% computed) and run caps (step_cache.RUNS). Chosen on the shipped model with
# euler, 256 held-out items, CPU (benchmarks/results/faster_tiny_euler_cpu.json): 1.0 = 1.82x (20 steps) /
# 1.87x (28 steps) fewer MMDiT evaluations at mean PSNR 33.8 / 41.0 dB against the uncached image,
# detector score -0.7 / -2.0 points; 0.5 gives 1.68x at 20 steps (35.7 dB, -1.9), 2.0 the same as 1.0 at 28
# and +1.2 at 20. Without warmup and caps (faster_tiny_euler_cpu_no_warmup.json) 0.2 gave 1.82x / 2.02x at
# 33.0 / 38.3 dB, -3.1 / -2.0 points. The earlier TeaCache-style cache (rule "input") used 0.10.
DEFAULT_CACHE_THRESHOLD = 1.0

# Live sampler previews (ComfyUI --preview-method / --preview-size; workflow/previews.py). ComfyUI's default is none.
PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
DEFAULT_PREVIEW_SIZE = 512
