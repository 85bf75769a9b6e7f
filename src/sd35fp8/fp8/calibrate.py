"""Static FP8 calibration of an MMDiT on real sampling trajectories -> a recipe JSON.

Stages, each scored by output SQNR (dB) against the high-precision model on recorded calls:
    dynamic   per-token activation scales computed at run time (the baseline)
    static    one input scale per layer = amax over every step of every trajectory * margin
              (margin picked from a small grid by output SQNR)
    tuned     + per-layer weight clipping ratio (grid search minimising that layer's output MSE on
              captured input rows; cheap: one matmul per candidate, no model forward)
    policy    optional: layers kept high precision under an accuracy budget (policy_sd35)
The recipe holds input scales, amax, clip ratios, policy and these numbers; `load_mmdit_fp8(...,
recipe=)` and `export` consume it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from sd35fp8.errors import InputError
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.fp8.policy_sd35 import default_policy, measure_sensitivity, policy_from_sensitivity
from sd35fp8.fp8.quantize import Policy
from sd35fp8.fp8.scaling import amax_to_scale, dequantize, quantize_weight, sqnr

log = logging.getLogger(__name__)

RECIPE_FORMAT = "sd35fp8.fp8.recipe/1"
MARGIN_GRID = (0.8, 1.0, 1.25)
CLIP_GRID = (1.0, 0.97, 0.94, 0.9, 0.85)
CAPTURE_ROWS = 64  # input rows kept per layer per call for weight tuning

PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dawn, soft pastel colors",
    "close-up portrait of an elderly fisherman, dramatic lighting, 85mm",
    "a bowl of ramen with steam rising, food photography",
    "an isometric pixel art city at night with neon signs",
    "a medieval castle on a cliff during a thunderstorm",
    "a red fox sleeping in fresh snow, wildlife photography",
    "the word 'FP8' written in bold graffiti letters on a brick wall",
    "a minimalist poster of a mountain range, flat vector style",
    "a busy street market in Marrakech, golden hour",
    "a cute robot watering plants in a greenhouse, 3d render",
    "an oil painting of a stormy sea in the style of Turner",
    "macro photo of a dew drop on a spider web",
    "a cyberpunk samurai standing in the rain, cinematic",
    "a cozy reading nook with a cat and a cup of tea",
    "an aerial view of rice terraces in Bali",
    "a black and white photo of a jazz band in a smoky club",
    "a child's crayon drawing of a family and a dog",
    "a glass chess set on a marble table, studio lighting",
    "an underwater coral reef with colorful fish",
    "a sci-fi spaceship interior with holographic displays",
    "a bouquet of sunflowers in a blue vase, still life",
    "a snowy Japanese temple with red lanterns",
    "a technical blueprint of a steam locomotive",
    "a surreal melting clock over a desert landscape",
    "a golden retriever puppy playing in autumn leaves",
    "a fantasy map with mountains, rivers and a dragon",
    "a modern kitchen interior, architectural photography",
    "an anime girl with blue hair looking at the stars",
    "a vintage car parked in front of a diner, 1950s",
    "a hand-drawn botanical illustration of a fern",
    "a crowded subway car, candid street photography",
)


@dataclass
class Recipe:
    """Calibration result (JSON). Layer names are module names without prefix."""

    input_scales: dict[str, float] = field(default_factory=dict)
    input_amax: dict[str, float] = field(default_factory=dict)
    margin: float = 1.0
    weight_clip: dict[str, float] = field(default_factory=dict)  # per-layer amax clipping ratio
    keep: list[str] | None = None  # policy keep patterns (None: the default policy)
    stats: dict = field(default_factory=dict)

    @property
    def policy(self) -> Policy | None:
        return None if self.keep is None else Policy(keep=tuple(self.keep))

    def to_dict(self) -> dict:
        return {"format": RECIPE_FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, obj: str | Path | Mapping) -> Recipe:
        data = dict(obj) if isinstance(obj, Mapping) else json.loads(Path(obj).read_text())
        if data.pop("format", None) != RECIPE_FORMAT:
            raise InputError(f"{obj if not isinstance(obj, Mapping) else 'recipe'} is not a {RECIPE_FORMAT} recipe")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise InputError(f"recipe: unknown fields {sorted(unknown)}")
        return cls(**data)


# ---- swapping FP8 layers in and out (no second copy of the model) ------------------------------------------
@contextmanager
def fp8_swapped(model: nn.Module, mode: str, policy: Policy | None = None, granularity: str = "channel",
                input_scales: Mapping[str, float] | None = None, weight_clip: Mapping[str, float] | None = None
                ) -> Iterator[dict[str, FP8Linear]]:
    """Temporarily replace the policy's nn.Linear layers by FP8Linear (built one at a time from the
    originals, which come back on exit). Only the FP8 weights are extra memory."""
    policy = policy or Policy(keep=())
    originals: dict[str, nn.Linear] = {}
    layers: dict[str, FP8Linear] = {}
    try:
        for name, mod in list(model.named_modules()):
            if type(mod) is not nn.Linear or policy.decide(name) is not None:
                continue
            clip = 1.0 if weight_clip is None else weight_clip.get(name, 1.0)
            q, s = quantize_weight(mod.weight, granularity, clip)
            bias = None if mod.bias is None else mod.bias.detach()
            xs = None if input_scales is None else input_scales.get(name)
            layer = FP8Linear.from_fp8(q, s, bias, mode="weight_only", input_scale=xs)
            layer.set_mode(mode)
            originals[name] = mod
            layers[name] = layer
            _set_child(model, name, layer)
        yield layers
    finally:
        for name, mod in originals.items():
            _set_child(model, name, mod)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def run_calls(model: nn.Module, calls: Sequence[tuple]) -> list[torch.Tensor]:
    return [model(*args).float() for args in calls]


def output_sqnr(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """SQNR (dB) of all outputs together."""
    return sqnr(torch.cat([r.flatten() for r in ref]), torch.cat([o.flatten() for o in out]))


# ---- amax and input capture ------------------------------------------------------------------------------
class ActivationStats:
    """Forward pre-hooks on every nn.Linear: running amax of inputs and a few input rows per call."""

    def __init__(self, model: nn.Module, capture_rows: int = 0, names: Sequence[str] | None = None):
        self.amax: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.capture_rows = capture_rows
        self._handles = []
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, FP8Linear)) and (names is None or name in names):
                self._handles.append(mod.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_m, args):
            x = args[0].detach()
            a = x.abs().amax().float()
            self.amax[name] = a if name not in self.amax else torch.maximum(self.amax[name], a)
            if self.capture_rows:
                flat = x.reshape(-1, x.shape[-1])  # [M, K]
                idx = torch.linspace(0, flat.shape[0] - 1, min(self.capture_rows, flat.shape[0]),
                                     device=flat.device).long()
                self.rows.setdefault(name, []).append(flat[idx].clone())
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def amax_floats(self) -> dict[str, float]:
        return {n: float(v) for n, v in self.amax.items()}


# ---- stages --------------------------------------------------------------------------------------------
@torch.no_grad()
def tune_weight_clip(model: nn.Module, rows: Mapping[str, list[torch.Tensor]], layers: Sequence[str],
                     grid: Sequence[float] = CLIP_GRID, granularity: str = "channel") -> dict[str, float]:
    """Per layer, the clipping ratio of the weight amax minimising ||X W^T - X Wq^T||^2 on captured X."""
    best: dict[str, float] = {}
    for name in layers:
        if name not in rows:
            continue
        lin = model.get_submodule(name)
        w = lin.weight.float()  # [N, K]
        x = torch.cat(rows[name]).float()  # [R, K]
        ref = x @ w.t()  # [R, N]
        errs = []
        for c in grid:
            q, s = quantize_weight(w, granularity, c)
            errs.append(float((ref - x @ dequantize(q, s).t()).pow(2).sum()))
        best[name] = float(grid[min(range(len(grid)), key=errs.__getitem__)])
    return best


@torch.no_grad()
def calibrate(model: nn.Module, calls: Sequence[tuple], policy: Policy | None = None,
              amax: Mapping[str, float] | None = None, margins: Sequence[float] = MARGIN_GRID,
              clip_grid: Sequence[float] = CLIP_GRID, tune: bool = True, budget_db: float | None = None,
              granularity: str = "channel", progress: bool = False) -> Recipe:
    """Calibrate a high-precision `model` on recorded forward calls (arg tuples) -> Recipe.

    `amax`: activation amax already collected over whole trajectories (e.g. by `record_trajectories`);
    merged with the amax seen on `calls`. `budget_db`: also measure per-layer sensitivity and keep
    the least robust layers until the predicted output SQNR reaches it. progress: a bar of the
    stages (each one pass over `calls`: reference, dynamic, one per margin, tuning, policy) on stderr.
    """
    if not calls:
        raise InputError("calibrate: no recorded model calls")
    policy = policy or default_policy()
    stages = 2 + len(margins) + (2 if tune else 0) + (2 if budget_db is not None else 0)
    with tqdm(total=stages, desc="calibration scoring", unit="stage", file=sys.stderr, disable=not progress) as bar:
        return _calibrate(model, calls, policy, amax, margins, clip_grid, tune, budget_db, granularity, bar)


def _calibrate(model: nn.Module, calls: Sequence[tuple], policy: Policy, amax: Mapping[str, float] | None,
               margins: Sequence[float], clip_grid: Sequence[float], tune: bool, budget_db: float | None,
               granularity: str, bar: tqdm) -> Recipe:
    bar.set_postfix_str("reference")
    stats = ActivationStats(model, capture_rows=CAPTURE_ROWS if tune else 0)
    try:
        ref = run_calls(model, calls)
    finally:
        stats.remove()
    bar.update()
    seen = stats.amax_floats()
    for name, a in (amax or {}).items():
        seen[name] = max(a, seen.get(name, 0.0))
    layers = [n for n, m in model.named_modules() if type(m) is nn.Linear and policy.decide(n) is None]
    missing = [n for n in layers if n not in seen]
    if missing:
        raise InputError(f"calibrate: {len(missing)} FP8 layers saw no input (e.g. {missing[:3]})")
    result: dict[str, float] = {}

    def score(stage: str, **kw) -> float:
        bar.set_postfix_str(stage)
        with fp8_swapped(model, policy=policy, granularity=granularity, **kw):
            db = output_sqnr(ref, run_calls(model, calls))
        bar.update()
        return db

    result["dynamic_db"] = score("dynamic", mode="dynamic")
    per_margin = {}
    for m in margins:
        scales = {n: float(amax_to_scale(torch.tensor(seen[n] * m))) for n in layers}
        per_margin[m] = (score(f"static, margin {m:g}", mode="static", input_scales=scales), scales)
    margin = max(per_margin, key=lambda m: per_margin[m][0])
    result["static_db"], scales = per_margin[margin]
    result["static_by_margin_db"] = {str(m): round(v[0], 3) for m, v in per_margin.items()}
    clip: dict[str, float] = {}
    if tune:
        bar.set_postfix_str("weight clipping search")
        clip = tune_weight_clip(model, stats.rows, layers, clip_grid, granularity)
        bar.update()
        result["tuned_db"] = score("tuned", mode="static", input_scales=scales, weight_clip=clip)
        if result["tuned_db"] < result["static_db"]:  # per-layer MSE optimum did not help the output
            log.info("weight clipping lowered output SQNR (%.2f < %.2f dB): not used", result["tuned_db"],
                     result["static_db"])
            clip = {}
    keep = list(policy.keep)
    if budget_db is not None:
        bar.set_postfix_str("per-layer sensitivity")
        sens = measure_sensitivity(model, calls, "static", layers=layers, granularity=granularity)
        bar.update()
        pol, info = policy_from_sensitivity(sens, budget_db, base_keep=policy.keep)
        keep = list(pol.keep)
        result["policy"] = info
        bar.set_postfix_str("policy")
        result["policy_db"] = _score_policy(model, ref, calls, pol, granularity, scales, clip)
        bar.update()
    result["gain_static_over_dynamic_db"] = result["static_db"] - result["dynamic_db"]
    if "tuned_db" in result:
        result["gain_tuned_over_static_db"] = result["tuned_db"] - result["static_db"]
    result["calls"] = len(calls)
    result["fp8_layers"] = len(layers)
    for k, v in result.items():
        if isinstance(v, float):
            result[k] = round(v, 3) if math.isfinite(v) else v
    log.info("calibration: dynamic %.2f dB, static %.2f dB (margin %g)%s", result["dynamic_db"],
             result["static_db"], margin, f", tuned {result['tuned_db']:.2f} dB" if "tuned_db" in result else "")
    return Recipe(input_scales=scales, input_amax={n: seen[n] for n in layers}, margin=margin,
                  weight_clip=clip, keep=keep, stats=result)


def _score_policy(model, ref, calls, policy, granularity, scales, clip) -> float:
    with fp8_swapped(model, "static", policy, granularity, scales, clip):
        return output_sqnr(ref, run_calls(model, calls))


# ---- trajectories --------------------------------------------------------------------------------------
class CallRecorder(nn.Module):
    """Wraps an MMDiT: forwards every call, keeps every `every`-th call's inputs (on `store`)."""

    def __init__(self, model: nn.Module, every: int = 1, limit: int = 64, store: str = "cpu"):
        super().__init__()
        self.model = model
        self.every, self.limit, self.store = every, limit, store
        self.calls: list[tuple] = []
        self.count = 0

    @property
    def config(self):
        return self.model.config

    def forward(self, x, sigma, context, pooled, skip_layers=()):
        if self.count % self.every == 0 and len(self.calls) < self.limit:
            self.calls.append(tuple(t.detach().to(self.store) for t in (x, sigma, context, pooled)))
        self.count += 1
        return self.model(x, sigma, context, pooled, skip_layers=skip_layers)


@torch.no_grad()
def record_trajectories(pipe, prompts: Sequence[str], steps: int | None = None, size: int | None = None,
                        seed: int = 0, keep_calls: int = 32) -> tuple[list[tuple], dict[str, float]]:
    """Sample each prompt with `pipe` (an SD35Pipeline with a high-precision MMDiT) while hooks record
    every Linear's input amax at every step -> (a spread of recorded calls, amax)."""
    steps = steps or pipe.defaults.steps
    size = size or pipe.defaults.width
    per_prompt = max(1, keep_calls // max(1, len(prompts)))
    engine = pipe.mmdit
    model = engine.model  # the plain module: its Linear hooks fire (the fused engine reads weights directly)
    stats = ActivationStats(model)
    calls: list[tuple] = []
    try:
        for i, prompt in enumerate(tqdm(prompts, desc="calibration trajectories", file=sys.stderr)):
            rec = CallRecorder(model, every=max(1, steps // per_prompt), limit=per_prompt)
            pipe.mmdit = rec
            try:
                pipe(prompt, num_inference_steps=steps, width=size, height=size, seed=seed + i, progress=False)
            finally:
                pipe.mmdit = engine
            calls.extend(rec.calls)
            log.info("calibration trajectory %d/%d: %s", i + 1, len(prompts), prompt[:60])
    finally:
        stats.remove()
    dev = next(model.parameters()).device
    return [tuple(t.to(dev) for t in c) for c in calls], stats.amax_floats()
