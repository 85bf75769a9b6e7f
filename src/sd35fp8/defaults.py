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
    slg_scale: float = 0.0
    slg_start: float = 0.01
    slg_end: float = 0.30
    slg_layers: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


LARGE = GenerationDefaults("SD3.5 Large", steps=40, cfg=4.5, sampler="dpmpp_2m")
LARGE_TURBO = GenerationDefaults("SD3.5 Large Turbo", steps=4, cfg=1.0, sampler="euler")
MEDIUM = GenerationDefaults(
    "SD3.5 Medium", steps=50, cfg=5.0, sampler="dpmpp_2m",
    slg_scale=2.5, slg_start=0.01, slg_end=0.30, slg_layers=(7, 8, 9),
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
