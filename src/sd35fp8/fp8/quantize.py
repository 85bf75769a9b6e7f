"""Model-level FP8 pass (gpt-fast style, two phases): plan + compute scales, then swap modules.

    report = quantize_model(model, "dynamic")                 # every nn.Linear not kept -> FP8Linear
    amax = collect_activation_amax(model, lambda m: m(x, ...)) # static calibration (any mode)
    apply_static_scales(model, amax, margin=1.0)              # FP8Linear -> mode "static"

`Policy.keep` holds fnmatch patterns of module names that stay in high precision. The default
keeps the SD3.5 MMDiT embedders and final layer (small, and first/last in the chain); the list
is meant to be tuned from measured per-layer sensitivity.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from typing import Callable

import torch
from torch import nn

from sd35fp8.errors import InputError
from sd35fp8.fp8.device import MODES
from sd35fp8.fp8.linear import GRANULARITIES, FP8Linear

DEFAULT_KEEP: tuple[str, ...] = (
    "x_embedder*",
    "t_embedder.*",
    "y_embedder.*",
    "context_embedder",
    "final_layer.*",
)


@dataclass(frozen=True)
class Policy:
    """Which nn.Linear modules become FP8Linear: names matching `include` and no `keep` pattern."""

    keep: tuple[str, ...] = DEFAULT_KEEP
    include: tuple[str, ...] = ("*",)

    def decide(self, name: str) -> str | None:
        """None -> convert; else the reason the layer stays high precision."""
        for pat in self.keep:
            if fnmatchcase(name, pat):
                return f"policy keep pattern {pat!r}"
        if not any(fnmatchcase(name, pat) for pat in self.include):
            return f"not matched by policy include {list(self.include)}"
        return None

    def to_json(self) -> str:
        """'{"keep": [...], "include": [...]}'"""
        return json.dumps({k: list(v) for k, v in asdict(self).items()}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Policy:
        data = json.loads(text)
        unknown = set(data) - {"keep", "include"}
        if unknown:
            raise InputError(f"fp8 Policy JSON: unknown fields {sorted(unknown)} (expected keep, include)")
        return cls(**{k: tuple(str(p) for p in v) for k, v in data.items()})


@dataclass
class QuantReport:
    """What quantize_model did."""

    mode: str
    granularity: str
    converted: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # name -> reason
    fallback: dict[str, str] = field(default_factory=dict)  # converted but run weight_only (shape)
    bytes_before: int = 0
    bytes_after: int = 0

    def describe(self) -> str:
        mib = 1024 * 1024
        text = (
            f"fp8 {self.mode} ({self.granularity}): {len(self.converted)} Linear -> FP8Linear, "
            f"{len(self.kept)} kept high precision, {len(self.fallback)} weight_only by shape; "
            f"weights {self.bytes_before / mib:.1f} MiB -> {self.bytes_after / mib:.1f} MiB"
        )
        return text


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (fp8 counts 1 byte per element, bf16 2, fp32 4)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_model(
    model: nn.Module,
    mode: str,
    policy: Policy | None = None,
    granularity: str = "channel",
) -> QuantReport:
    """Swap (in place) every nn.Linear selected by `policy` for an FP8Linear in `mode`.

    Phase 1 plans and quantises (scales computed from the current weights; on a meta model
    this builds empty FP8Linear layers ready for load_state_dict(assign=True)); phase 2 swaps.
    The caller picks `mode` (see fp8.device.choose_mode). mode="static" layers need
    apply_static_scales before they can run.
    """
    if mode not in MODES:
        raise InputError(f"quantize_model: mode {mode!r} not in {MODES}")
    if granularity not in GRANULARITIES:
        raise InputError(f"quantize_model: granularity {granularity!r} not in {GRANULARITIES}")
    policy = policy or Policy()
    report = QuantReport(mode=mode, granularity=granularity, bytes_before=model_weight_bytes(model))

    # Phase 1: decide and compute scales.
    new: dict[str, FP8Linear] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        reason = policy.decide(name)
        if reason is not None:
            report.kept[name] = reason
            continue
        layer = FP8Linear.from_linear(module, mode=mode, granularity=granularity)
        if layer.fallback_reason:
            report.fallback[name] = layer.fallback_reason
        new[name] = layer

    # Phase 2: swap.
    for name, layer in new.items():
        _set_submodule(model, name, layer)
        report.converted.append(name)
    report.bytes_after = model_weight_bytes(model)
    return report


def _input_amax_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear))}


@torch.no_grad()
def collect_activation_amax(model: nn.Module, run_fn: Callable[[nn.Module], object]) -> dict[str, float]:
    """Max |input| seen by every nn.Linear / FP8Linear while `run_fn(model)` runs (running max).

    Run it on representative prompts/steps; FP8Linear layers should be in weight_only or dynamic
    mode while calibrating. Returns {module name: amax} (plain floats, JSON-serialisable).
    """
    amax: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().amax().to(torch.float32)
            amax[name] = a if name not in amax else torch.maximum(amax[name], a.to(amax[name].device))

        return hook

    for name, module in _input_amax_modules(model).items():
        handles.append(module.register_forward_pre_hook(make_hook(name)))
    try:
        run_fn(model)
    finally:
        for h in handles:
            h.remove()
    return {name: float(v) for name, v in amax.items()}


def apply_static_scales(
    model: nn.Module, amax: dict[str, float], margin: float = 1.0, set_mode: bool = True
) -> list[str]:
    """input_scale = amax * margin / 448 for every FP8Linear; optionally switch them to "static".

    Raises InputError if an FP8Linear has no calibration entry (never leaves one uncalibrated).
    Entries for modules that are not FP8Linear (kept layers) are ignored. Returns names updated.
    """
    if margin <= 0:
        raise InputError(f"apply_static_scales: margin must be > 0, got {margin}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
    missing = sorted(set(layers) - set(amax))
    if missing:
        raise InputError(
            f"apply_static_scales: no activation amax for {len(missing)} FP8Linear layers, e.g. {missing[:5]}"
        )
    for name, layer in layers.items():
        layer.set_input_scale(amax[name], margin)
        if set_mode:
            layer.set_mode("static")
    return sorted(layers)
