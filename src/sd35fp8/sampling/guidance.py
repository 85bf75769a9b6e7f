"""Classifier-free guidance and skip-layer guidance: velocity model -> k-diffusion denoiser.

The velocity model (our MMDiT, FP8 or not) follows `ModelFn`. `CFGDenoiser` turns it into
`denoiser(x, sigma [B], seed=None) -> x0` for the samplers:
- denoised = x - sigma*v (ComfyUI CONST), computed in float32 from the model's output;
- cfg != 1: cond and uncond run as ONE batch [cond ; uncond] (2B), combined on x0 as
  uncond + cfg*(cond - uncond) (ComfyUI cfg_function, sd3.5 CFGDenoiser);
- cfg == 1: only the cond pass runs (ComfyUI's cfg1 optimisation);
- skip-layer guidance (SD3.5 Medium): inside its window an extra cond pass with
  `skip_layers` adds slg_scale*(cond - cond_skip) to the result;
- the MODEL's patches (`post_cfg`): pre-CFG functions on [cond, uncond] (APG, LatentApplyOperationCFG), then the
  CFG combination (or RescaleCFG's), then post-CFG functions (SLG, CFGZeroStar, CFGNorm, Mahiro), as ComfyUI's
  sampling_function / cfg_function order them.

SLG window. The sd3.5 reference (sd3_impls.SkipLayerCFGDenoiser) counts denoiser calls and
applies SLG when start*steps < call < end*steps (window="steps", needs `steps`). ComfyUI's
SkipLayerGuidanceSD3 applies it when percent_to_sigma(end) <= sigma <= percent_to_sigma(start)
(window="sigma"). Defaults: the reference's sd3.5_medium config, kept in sd35fp8.defaults
(scale 2.5, window 0.01-0.20, layers 7, 8, 9).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..defaults import SLG_END, SLG_LAYERS, SLG_SCALE, SLG_START
from ..errors import InputError
from . import regions
from .model_sampling import FlowMatching


class ModelFn(Protocol):
    """Velocity model contract (models/mmdit.py MMDiT.forward)."""

    def __call__(
        self,
        x: torch.Tensor,  # [B, 16, h, w]
        sigma: torch.Tensor,  # [B] in [0, 1]
        context: torch.Tensor,  # [B, L, 4096]
        pooled: torch.Tensor,  # [B, 2048]
        skip_layers: Sequence[int] = (),
    ) -> torch.Tensor: ...  # v, shaped like x


@dataclass(frozen=True)
class Conditioning:
    """Encoded prompt: context [1 or B, L, C], pooled [1 or B, P]; optional ControlNet(s).

    `control` (sd35fp8.control.ControlApply, opaque here) is called as
    control(x, sigma, context, pooled, model, model_sampling) -> residuals per joint block | None
    on this conditioning's rows; the model then gets them as `control=` (MMDiT.forward).
    """

    context: torch.Tensor
    pooled: torch.Tensor
    control: Any = None


@dataclass(frozen=True)
class CondEntry:
    """One entry of a combined conditioning (ComfyUI's CONDITIONING list): active while start_percent <= the
    schedule's progress <= end_percent (ConditioningSetTimestepRange), weighted by `strength` where entries
    overlap."""

    cond: Conditioning
    start: float = 0.0
    end: float = 1.0
    strength: float = 1.0
    # ConditioningSetArea / SetAreaPercentage: (h, w, y, x) in latent pixels or ("percentage", h, w, y, x);
    # ConditioningSetMask: mask [b, H, W] (any size; resized to the latent), its strength, "mask bounds"
    area: tuple | None = None
    mask: torch.Tensor | None = field(default=None, compare=False)
    mask_strength: float = 1.0
    set_area_to_bounds: bool = False

    @property
    def regional(self) -> bool:
        """Acts on part of the image (an area or a mask): its own model call on that part (sampling/regions.py)."""
        return self.area is not None or self.mask is not None


@dataclass(frozen=True)
class CondSet:
    """A combined conditioning (ConditioningCombine): at each step the denoised predictions of its active
    entries are averaged, weighted by strength (ComfyUI samplers.calc_cond_batch); none active gives zeros."""

    entries: tuple[CondEntry, ...]

    @property
    def simple(self) -> Conditioning | None:
        """The one always-active entry's conditioning when that is all there is (the fast road), else None."""
        if len(self.entries) != 1:
            return None
        e = self.entries[0]  # (a strength other than 1 matters once the other side's areas pair with it)
        return e.cond if e.start <= 0.0 and e.end >= 1.0 and not e.regional and e.strength == 1.0 else None


@dataclass(frozen=True)
class SLGConfig:
    scale: float = SLG_SCALE
    start: float = SLG_START
    end: float = SLG_END
    layers: tuple[int, ...] = SLG_LAYERS
    window: str = "steps"  # "steps" (sd3.5 reference) | "sigma" (ComfyUI SkipLayerGuidanceSD3)
    # SkipLayerGuidanceDiT's rescaling_scale: the guided result's std pulled toward the cond prediction's
    rescale: float = 0.0
    # the MODEL's shift when the node patched it (ComfyUI reads its model_sampling then: a ModelSamplingSD3 applied
    # after the SLG node does not move its window); None: the sampler's
    shift: float | None = None

    def __post_init__(self):
        if self.window not in ("steps", "sigma"):
            raise InputError(f"SLGConfig.window must be 'steps' or 'sigma', got {self.window!r}")
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0):
            raise InputError(f"SLG start/end are fractions of the schedule in [0, 1], got {self.start}, {self.end}")
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def describe(self) -> str:
        return f"SLG scale {self.scale} layers {list(self.layers)} window {self.start}-{self.end} ({self.window})"


# The MODEL's sampling patches, as the denoiser takes them (SampleSettings.post_cfg), in the order they were applied:
#   ("slg",) / ("slg", SLGConfig)   skip-layer guidance (the denoiser's `slg` / its own settings), post-CFG
#   ("cfg_zero_star",), ("cfg_norm", strength)                                                     post-CFG
#   ("rescale_cfg", multiplier)     RescaleCFG: replaces the CFG combination itself (ComfyUI's sampler_cfg_function:
#                                   the last one set wins; it runs before every post-CFG function)
#   ("slg_uncond", SLGConfig)       SkipLayerGuidanceDiTSimple: inside its window the uncond pass runs without the
#                                   layers, as its own batch (ComfyUI's sampler_calc_cond_batch_function: last wins)
#   ("mahiro",)                     Mahiro, post-CFG
#   ("pre_cfg", PreCFG)             a sampler_pre_cfg_function (APG, LatentApplyOperationCFG): each runs, in patch
#                                   order, on [cond, uncond] before the CFG combination
POST_CFG = ("slg", "cfg_zero_star", "cfg_norm", "rescale_cfg", "slg_uncond", "mahiro", "pre_cfg")
CFG_FUNCTIONS = ("rescale_cfg", "slg_uncond")  # not post-CFG functions: the last of each kind applies


def rescale_cfg(x: torch.Tensor, sigma: torch.Tensor, cond_x0: torch.Tensor, uncond_x0: torch.Tensor, cfg: float,
                multiplier: float) -> torch.Tensor:
    """ComfyUI's RescaleCFG (comfy_extras/nodes_model_advanced.py) as its sampler_cfg_function computes it for any
    model: the predictions taken to v-prediction form at sigma (cond = x - cond_x0 as ComfyUI hands it), the CFG
    result's std per image rescaled to the cond prediction's, blended by `multiplier`, and back to x0."""
    s = sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1))  # [B, 1, 1, 1]
    xs = x / (s * s + 1.0)
    cond = (xs - (x - (x - cond_x0))) * (s ** 2 + 1.0) ** 0.5 / s
    uncond = (xs - (x - (x - uncond_x0))) * (s ** 2 + 1.0) ** 0.5 / s
    x_cfg = uncond + cfg * (cond - uncond)
    ro_pos = torch.std(cond, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_final = multiplier * (x_cfg * (ro_pos / ro_cfg)) + (1.0 - multiplier) * x_cfg
    return x - (x - (xs - x_final * s / (s * s + 1.0) ** 0.5))


def mahiro(denoised: torch.Tensor, cond_x0: torch.Tensor, uncond_x0: torch.Tensor, cfg: float) -> torch.Tensor:
    """ComfyUI's Mahiro post-CFG function (comfy_extras/nodes_mahiro.py): the guided result blended with the
    cond prediction's naive leap (cond * cfg), weighted by the cosine similarity (over channels, averaged over
    the whole batch and every position) of the signed square roots of the uncond leap and of the mean of leap and
    result. All [B, C, h, w] x0 predictions."""
    leap = cond_x0 * cfg
    u_leap = uncond_x0 * cfg
    merge = (leap + denoised) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    sim = F.cosine_similarity(normu, normm).mean()  # one number for the whole batch, as ComfyUI's
    simsc = 2 * (sim + 1)
    return (simsc * denoised + (4 - simsc) * leap) / 4


class PreCFG(Protocol):
    """A sampler_pre_cfg_function's settings, as a MODEL patch carries them ("pre_cfg", settings).

    start() gives the function one sampling run calls (ComfyUI's args dict: "conds_out" [cond_x0, uncond_x0],
    "cond_scale", "sigma" [B], "timestep", "input" x) -> the new conds_out list. A function with state across
    steps keeps it where ComfyUI's closure keeps it: APG's running average lives in the APG object, one per node
    execution (the patched MODEL), and so passes from one sampling run to the next as ComfyUI's does."""

    def start(self) -> Callable[[dict], list[torch.Tensor]]: ...


def _project(v0: torch.Tensor, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """APG's projection of v0 on v1 per image: (parallel, orthogonal) parts, [B, C, h, w] each."""
    v1 = F.normalize(v1, dim=[-1, -2, -3])
    parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    return parallel, v0 - parallel


@dataclass(eq=False)
class APG:
    """Adaptive Projected Guidance (comfy_extras/nodes_apg.py), a pre-CFG function on the x0 predictions.

    guidance = cond - uncond; with momentum != 0 a running average (momentum * avg + guidance) replaces it; with
    norm_threshold > 0 its norm per image is capped there; its part parallel to cond is scaled by eta. The cond
    becomes uncond + guidance' + (cond - uncond) / cfg, so CFG gives cond + cfg * guidance'.

    The running average and the previous call's sigma are this object's, as they are the closure's of one
    APG.execute in ComfyUI: every sampling run of the patched MODEL (and of MODELs patched further from it) shares
    them, and the average restarts only when sigma rises above the previous call's. So a second KSamplerAdvanced
    that continues a first one's schedule (a lower sigma) carries its running average on, while a new run from the
    top of a schedule starts afresh."""

    eta: float = 1.0
    norm_threshold: float = 5.0
    momentum: float = 0.0
    running_avg: torch.Tensor | None = field(default=None, init=False, repr=False)
    prev_sigma: float | None = field(default=None, init=False, repr=False)

    def start(self) -> Callable[[dict], list[torch.Tensor]]:
        return self

    def __call__(self, args: dict) -> list[torch.Tensor]:
        conds_out = args["conds_out"]
        if len(conds_out) == 1:
            return conds_out
        cond, uncond = conds_out[0], conds_out[1]  # [B, C, h, w] x0 predictions
        sigma = float(args["sigma"].reshape(-1)[0])
        cond_scale = args["cond_scale"]
        if cond_scale == 0:
            raise InputError("APG divides the guidance by cfg: cfg 0 would make every prediction NaN (as it does in "
                             "ComfyUI); use a cfg other than 0")
        if self.prev_sigma is not None and sigma > self.prev_sigma:
            self.running_avg = None
        self.prev_sigma = sigma
        guidance = cond - uncond
        if self.momentum != 0:
            self.running_avg = guidance if self.running_avg is None else self.momentum * self.running_avg + guidance
            guidance = self.running_avg
        if self.norm_threshold > 0:
            norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)  # [B, 1, 1, 1]
            guidance = guidance * torch.minimum(torch.ones_like(norm), self.norm_threshold / norm)
        parallel, orthogonal = _project(guidance, cond)
        modified = orthogonal + self.eta * parallel
        return [(uncond + modified) + (cond - uncond) / cond_scale, uncond, *conds_out[2:]]


@dataclass(frozen=True)
class LatentOperationCFG:
    """LatentApplyOperationCFG's pre-CFG function (comfy_extras/nodes_latent.py): a LATENT_OPERATION on the
    guidance, cond = operation(latent=cond - uncond) + uncond (operation(latent=cond) with a lone prediction),
    at the sigmas sigma_end <= sigma <= sigma_start only (the node's start_percent / end_percent taken to sigmas
    with the MODEL's shift when it patched it; the defaults 1 and 0 cover every sigma)."""

    operation: Callable[..., torch.Tensor]
    sigma_start: float = 1.0
    sigma_end: float = 0.0

    def start(self) -> Callable[[dict], list[torch.Tensor]]:
        return self

    def __call__(self, args: dict) -> list[torch.Tensor]:
        conds_out = list(args["conds_out"])
        sigma = float(args["sigma"].reshape(-1)[0])  # ComfyUI: args["sigma"][0].item()
        if sigma > self.sigma_start or sigma < self.sigma_end:
            return conds_out
        if len(conds_out) == 2:
            conds_out[0] = self.operation(latent=(conds_out[0] - conds_out[1])) + conds_out[1]
        else:
            conds_out[0] = self.operation(latent=conds_out[0])
        return conds_out


def optimized_scale(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s s* per batch row: <positive, negative> / ||negative||^2 (+1e-8) -> [B, 1, 1, 1]."""
    p, n = positive.reshape(positive.shape[0], -1), negative.reshape(negative.shape[0], -1)
    st = (p * n).sum(dim=1, keepdim=True) / ((n ** 2).sum(dim=1, keepdim=True) + 1e-8)
    return st.reshape([positive.shape[0]] + [1] * (positive.ndim - 1))


PATCH = 2  # the MMDiT's patch size: SD3's latents are cut in 2 x 2 patches


def _entries(c: Conditioning | CondSet) -> list[CondEntry]:
    return list(c.entries) if isinstance(c, CondSet) else [CondEntry(c)]


def _batch(t: torch.Tensor, b: int, what: str) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise InputError(f"{what} has batch {t.shape[0]}, expected 1 or {b}")


def _match_lengths(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Repeat contexts of different lengths to their lcm (ComfyUI CONDCrossAttn.concat).

    Repeating every key/value token the same number of times leaves attention unchanged.
    None when ComfyUI would not batch them (lcm more than 4x the shorter one).
    """
    la, lb = a.shape[1], b.shape[1]
    if la == lb:
        return a, b
    lcm = math.lcm(la, lb)
    if lcm // min(la, lb) > 4:
        return None
    return a.repeat(1, lcm // la, 1), b.repeat(1, lcm // lb, 1)


def _shared_control(parts: Sequence[tuple[Any, slice]], n: int) -> Any:
    """The control of `parts` when one call over all n rows can replace theirs (see control_residuals)."""
    if len(parts) < 2 or parts[0][0] is None or not getattr(parts[0][0], "batches_rows", False):
        return None
    size = n // len(parts)
    if size * len(parts) != n:
        return None
    for k, (control, rows) in enumerate(parts):
        if control is not parts[0][0] or rows.indices(n) != (k * size, (k + 1) * size, 1):
            return None
    return parts[0][0]


def control_residuals(parts: Sequence[tuple[Any, slice]], x: torch.Tensor, sigma: torch.Tensor,
                      context: torch.Tensor, pooled: torch.Tensor, model: Any,
                      model_sampling: FlowMatching) -> list[torch.Tensor | None] | None:
    """Each (control, rows) covers some rows of one model call (batched CFG: cond rows, uncond rows);
    its residuals are computed on those rows and scattered into zeros for the whole batch. One control
    shared by every part (equal, contiguous parts covering the batch; a control that `batches_rows`)
    runs once over all rows with `chunks` = the number of parts: each row's result as if run alone
    (the ControlNet is batch-invariant, models.mmdit.per_row), one ControlNet pass instead of two."""
    shared = _shared_control(parts, x.shape[0])
    if shared is not None:
        return shared(x, sigma, context, pooled, model, model_sampling, chunks=len(parts))
    out: list[torch.Tensor | None] | None = None
    for control, rows in parts:
        if control is None:
            continue
        res = control(x[rows], sigma[rows], context[rows], pooled[rows], model, model_sampling)
        if res is None:
            continue
        if out is None:
            out = [None] * len(res)
        for j, r in enumerate(res):
            if r is not None:
                if out[j] is None:
                    out[j] = r.new_zeros((x.shape[0], *r.shape[1:]))  # [n, tokens, C]
                out[j][rows] += r
    return out


class CFGDenoiser:
    """k-diffusion denoiser over a velocity model with CFG and optional SLG."""

    def __init__(
        self,
        model: ModelFn,
        cond: Conditioning | CondSet,
        uncond: Conditioning | CondSet | None = None,
        cfg: float = 1.0,
        slg: SLGConfig | None = None,
        steps: int | None = None,
        model_sampling: FlowMatching | None = None,
        dtype: torch.dtype | None = None,
        post_cfg: Sequence[tuple] = (),
    ):
        if not math.isfinite(cfg):
            raise InputError(f"cfg must be a finite number, got {cfg!r}")
        self.model = model
        # a combined conditioning (CondSet) with one always-active entry is just that entry
        self.cond = cond.simple or cond if isinstance(cond, CondSet) else cond
        self.uncond = uncond.simple or uncond if isinstance(uncond, CondSet) else uncond
        self.cfg = float(cfg)
        self.use_uncond = not math.isclose(self.cfg, 1.0)
        if self.use_uncond and uncond is None:
            raise InputError(f"cfg {cfg} needs a negative conditioning (uncond)")
        self.slg = slg if slg is not None and slg.scale > 0 and slg.layers else None
        if self.slg is not None and self.slg.window == "steps" and steps is None:
            raise InputError("SLG with window='steps' (sd3.5 reference) needs the number of steps")
        self.model_sampling = model_sampling if model_sampling is not None else FlowMatching(3.0)
        self.steps = steps
        self.dtype = dtype  # compute dtype of the model (None: use the model's own)
        self.calls = 0  # denoiser calls so far (the reference's SLG step counter)
        # post-CFG functions in order: ("slg",), ("cfg_zero_star",), ("cfg_norm", strength); SLG goes first
        # unless the list places it (ComfyUI applies the MODEL's patches in the order they were set)
        post = tuple(tuple(p) for p in post_cfg)
        bad = [p for p in post if p[0] not in POST_CFG]
        if bad:
            raise InputError(f"unknown post-CFG function(s) {bad}; known: {', '.join(POST_CFG)}")
        self._cfg_fn = {p[0]: p for p in post if p[0] in CFG_FUNCTIONS}  # the last of each kind
        # pre-CFG functions in patch order, each started for this run (APG's state is the patch's own, across runs)
        bad = [p for p in post if p[0] == "pre_cfg" and (len(p) != 2 or not callable(getattr(p[1], "start", None)))]
        if bad:
            raise InputError(f"a pre-CFG patch is ('pre_cfg', settings with start()), got {bad}")
        self._pre_cfg = [p[1].start() for p in post if p[0] == "pre_cfg"]
        post = tuple(p for p in post if p[0] not in CFG_FUNCTIONS and p[0] != "pre_cfg")
        self.post_cfg = post if any(p[0] == "slg" for p in post) else (("slg",), *post)
        # every SLG's settings and sigma window [lo, hi] (ComfyUI: percent_to_sigma(end) <= sigma <= ..(start))
        self._slg_windows: dict[int, tuple[float, float]] = {}
        for cfg_ in [self.slg] + [p[1] for p in post if p[0] == "slg" and len(p) > 1] + \
                [p[1] for p in self._cfg_fn.values() if p[0] == "slg_uncond"]:
            if cfg_ is not None and cfg_.window == "sigma":
                ms = self.model_sampling if cfg_.shift is None else FlowMatching(cfg_.shift)
                self._slg_windows[id(cfg_)] = (ms.percent_to_sigma(cfg_.end), ms.percent_to_sigma(cfg_.start))
        # each CondSet entry's sigma window [lo, hi], float32 as ComfyUI compares the step's sigma tensor
        self._windows = {id(e): self._window(e)
                         for c in (self.cond, self.uncond) if isinstance(c, CondSet) for e in c.entries}
        self.regional = any(e.regional for c in (self.cond, self.uncond) if isinstance(c, CondSet) for e in c.entries)
        self._regions: dict[tuple[int, int], tuple[list[CondEntry], list[CondEntry]]] = {}
        self._uncond_sink: list | None = None  # capture_uncond's holder (the CFG++ samplers)

    def capture_uncond(self) -> list:
        """For the CFG++ samplers (ComfyUI's *_cfg_pp: a post-CFG function that keeps args["uncond_denoised"], set
        with disable_cfg1_optimization): from now on the uncond pass runs at cfg 1 too, and each call leaves its
        uncond prediction (zeros without a negative) in the returned one-item list."""
        self._uncond_sink = [None]
        if self.uncond is not None:
            self.use_uncond = True
        return self._uncond_sink

    def _window(self, e: CondEntry) -> tuple[float, float]:
        """The entry's sigma window [lo, hi], float32 as ComfyUI compares the step's sigma tensor."""
        return (torch.tensor(self.model_sampling.percent_to_sigma(e.end)).float().item(),
                torch.tensor(self.model_sampling.percent_to_sigma(e.start)).float().item())

    def _velocity(self, x: torch.Tensor, sigma: torch.Tensor, context, pooled, skip_layers=(),
                  controls: Sequence[tuple[Any, slice]] = ()) -> torch.Tensor:
        dtype = self.dtype if self.dtype is not None else x.dtype
        x, sigma, context, pooled = x.to(dtype), sigma.float(), context.to(dtype), pooled.to(dtype)
        h, w = x.shape[-2:]
        pad_h, pad_w = h % PATCH, w % PATCH  # an area's crop of odd size: padded around, as ComfyUI's MMDiT does
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
        extra = {}
        if any(c is not None for c, _ in controls):
            control = control_residuals(controls, x, sigma, context, pooled, self.model, self.model_sampling)
            if control is not None:
                extra["control"] = control
        v = self.model(x, sigma, context, pooled, skip_layers=skip_layers, **extra)
        return v[..., :h, :w].float()

    def _denoise(self, x, sigma, context, pooled, skip_layers=(), controls=()) -> torch.Tensor:
        v = self._velocity(x, sigma, context, pooled, skip_layers, controls)  # [n, C, H, W] float32
        return self.model_sampling.calculate_denoised(sigma, v, x.float())

    def _slg_active(self, sigma: torch.Tensor, slg: SLGConfig | None = None) -> bool:
        slg = self.slg if slg is None else slg
        if slg is None:
            return False
        if slg.window == "steps":
            return slg.start * self.steps < self.calls < slg.end * self.steps
        lo, hi = self._slg_windows[id(slg)]
        return lo <= float(sigma[0]) <= hi

    def _uncond_skip(self, sigma: torch.Tensor) -> tuple[int, ...] | None:
        """SkipLayerGuidanceDiTSimple: the layers the uncond pass skips at this sigma (None: a normal pass)."""
        entry = self._cfg_fn.get("slg_uncond")
        if entry is None or not self.use_uncond or not self._slg_active(sigma, entry[1]):
            return None
        return entry[1].layers

    def _active(self, c: Conditioning | CondSet | None, sigma: torch.Tensor) -> list[CondEntry] | Conditioning | None:
        """A plain conditioning as it is; a CondSet's entries active at this sigma (ComfyUI get_area_and_mult:
        lo <= sigma <= hi)."""
        if not isinstance(c, CondSet):
            return c
        s = float(sigma.reshape(-1)[0].float())
        return [e for e in c.entries if self._windows[id(e)][0] <= s <= self._windows[id(e)][1]]

    def _combined(self, entries: list[CondEntry], x, sigma, skip_layers=()) -> torch.Tensor:
        """The strength-weighted average of the entries' denoised predictions (zeros when none is active)."""
        B = x.shape[0]
        total, weight = torch.zeros_like(x, dtype=torch.float32), 0.0
        for e in entries:
            ctx, pool = _batch(e.cond.context, B, "conditioning context"), _batch(e.cond.pooled, B, "pooled")
            total = total + self._denoise(x, sigma, ctx, pool, skip_layers,
                                          controls=[(e.cond.control, slice(0, B))]) * e.strength
            weight += e.strength
        return total / weight if weight else total

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        if self.regional:
            return self._call_regional(x, sigma)
        cond, uncond = self._active(self.cond, sigma), self._active(self.uncond if self.use_uncond else None, sigma)
        one = [c[0].cond if isinstance(c, list) and len(c) == 1 else c for c in (cond, uncond)]
        if not all(isinstance(c, (Conditioning, type(None))) for c in one):  # several (or no) active entries
            return self._call_combined(x, sigma, cond, uncond)
        return self._call_plain(x, sigma, one[0], one[1])

    def _call_combined(self, x, sigma, cond, uncond) -> torch.Tensor:
        """A step where a combined conditioning has several or no active entries: each entry its own pass."""
        def as_entries(c):
            return c if isinstance(c, list) else [CondEntry(c)]

        cond_x0 = self._combined(as_entries(cond), x, sigma)
        uncond_x0 = self._combined(as_entries(uncond), x, sigma, self._uncond_skip(sigma) or ()) \
            if self.use_uncond else None
        cond_x0, uncond_x0 = self._pre(x, sigma, cond_x0, uncond_x0)
        return self._finish(x, sigma, cond_x0, uncond_x0, lambda layers: self._combined(as_entries(cond), x, sigma, layers))

    def _sides(self) -> tuple[Conditioning | CondSet | None, ...]:
        """The conditionings whose predictions a step combines (DualCFGDenoiser adds the middle one)."""
        return self.cond, self.uncond

    def _region_entries(self, x: torch.Tensor) -> tuple[list[CondEntry], ...]:
        """Every side's entries resolved for x's latent size and paired by area (sampling/regions.py), once a size;
        an absent side (no uncond) has none."""
        dims = tuple(x.shape[-2:])
        if dims not in self._regions:
            sides = [[] if c is None else [regions.resolve(e, dims, x.device) for e in _entries(c)]
                     for c in self._sides()]
            regions.pair(sides)
            for e in (e for side in sides for e in side):
                self._windows.setdefault(id(e), self._window(e))
            self._regions[dims] = tuple(sides)
        return self._regions[dims]

    def _accumulated(self, entries: list[CondEntry], x, sigma, skip_layers=()) -> torch.Tensor:
        """ComfyUI calc_cond_batch for one side: each entry's prediction over its area, weighted by its mult, summed
        and divided by the summed mults (+1e-37)."""
        s = float(sigma.reshape(-1)[0].float())
        B = x.shape[0]
        out = torch.zeros_like(x, dtype=torch.float32)
        count = torch.ones_like(x, dtype=torch.float32) * 1e-37
        for e in entries:
            lo, hi = self._windows[id(e)]
            if not lo <= s <= hi:
                continue
            crop, (h, w, y, x0), mult = regions.crop_and_mult(e, x)
            ctx, pool = _batch(e.cond.context, B, "conditioning context"), _batch(e.cond.pooled, B, "pooled")
            pred = self._denoise(crop, sigma, ctx, pool, skip_layers, controls=[(e.cond.control, slice(0, B))])
            out[:, :, y:y + h, x0:x0 + w] += pred * mult
            count[:, :, y:y + h, x0:x0 + w] += mult
        return out / count

    def _call_regional(self, x, sigma) -> torch.Tensor:
        """A step with area or mask conditioning: every entry its own call on its part of x."""
        conds, unconds = self._region_entries(x)
        cond_x0 = self._accumulated(conds, x, sigma)
        uncond_x0 = self._accumulated(unconds, x, sigma, self._uncond_skip(sigma) or ()) if self.use_uncond else None
        cond_x0, uncond_x0 = self._pre(x, sigma, cond_x0, uncond_x0)
        return self._finish(x, sigma, cond_x0, uncond_x0, lambda layers: self._accumulated(conds, x, sigma, layers))

    def _call_plain(self, x, sigma, cond: Conditioning, uncond: Conditioning | None) -> torch.Tensor:
        B = x.shape[0]  # x: [B, C, H, W], sigma: [B]
        c_ctx, c_pool = _batch(cond.context, B, "cond context"), _batch(cond.pooled, B, "cond pooled")
        rows = slice(0, B)
        c_ctl = [(cond.control, rows)]
        uncond_x0 = None
        if not self.use_uncond:
            cond_x0 = self._denoise(x, sigma, c_ctx, c_pool, controls=c_ctl)
        else:
            u_ctx, u_pool = _batch(uncond.context, B, "uncond context"), _batch(uncond.pooled, B, "uncond pooled")
            matched = _match_lengths(c_ctx, u_ctx)
            uncond_skip = self._uncond_skip(sigma)
            if uncond_skip is not None:  # SkipLayerGuidanceDiTSimple: cond, then uncond without the layers
                cond_x0 = self._denoise(x, sigma, c_ctx, c_pool, controls=c_ctl)
                uncond_x0 = self._denoise(x, sigma, u_ctx, u_pool, skip_layers=uncond_skip,
                                          controls=[(uncond.control, rows)])
            elif matched is not None:
                ctx = torch.cat(matched)  # [2B, L, C]
                both = self._denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), ctx, torch.cat([c_pool, u_pool]),
                                     controls=[(cond.control, rows), (uncond.control, slice(B, 2 * B))])
                cond_x0, uncond_x0 = both.chunk(2)
            else:  # ComfyUI runs them as separate batches too
                cond_x0 = self._denoise(x, sigma, c_ctx, c_pool, controls=c_ctl)
                uncond_x0 = self._denoise(x, sigma, u_ctx, u_pool, controls=[(uncond.control, rows)])
        cond_x0, uncond_x0 = self._pre(x, sigma, cond_x0, uncond_x0)
        return self._finish(x, sigma, cond_x0, uncond_x0,
                            lambda layers: self._denoise(x, sigma, c_ctx, c_pool, skip_layers=layers, controls=c_ctl))

    def _pre(self, x, sigma, cond_x0: torch.Tensor, uncond_x0: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ComfyUI's sampling_function: the MODEL's pre-CFG functions, in patch order, on [cond, uncond] x0
        predictions [B, C, h, w] (zeros for an uncond pass that did not run, as calc_cond_batch leaves it)."""
        if not self._pre_cfg:
            return cond_x0, uncond_x0
        out = [cond_x0, torch.zeros_like(cond_x0) if uncond_x0 is None else uncond_x0]
        for fn in self._pre_cfg:
            out = fn({"conds_out": out, "cond_scale": self.cfg, "sigma": sigma, "timestep": sigma, "input": x})
        return out[0], out[1]

    def _finish(self, x, sigma, cond_x0: torch.Tensor, uncond_x0: torch.Tensor | None, skip_x0,
                cfg: float | None = None) -> torch.Tensor:
        """ComfyUI's cfg_function: uncond + (cond - uncond) * cfg (cond alone when the uncond pass is skipped),
        then the MODEL's post-CFG functions in the order they were patched in (sampler_post_cfg_function):
        skip-layer guidance (skip_x0() runs the cond pass without the layers), CFGZeroStar, CFGNorm, Mahiro. Without
        an uncond pass ComfyUI hands them zeros as the uncond prediction. cond_x0 / uncond_x0 are the predictions
        after the pre-CFG functions (_pre), as ComfyUI hands them on."""
        cfg = self.cfg if cfg is None else cfg
        rescale = self._cfg_fn.get("rescale_cfg")
        if rescale is not None:
            out = rescale_cfg(x, sigma, cond_x0, torch.zeros_like(cond_x0) if uncond_x0 is None else uncond_x0, cfg,
                              rescale[1])
        else:
            out = cond_x0 if uncond_x0 is None else uncond_x0 + (cond_x0 - uncond_x0) * cfg
        for entry in self.post_cfg:
            if entry[0] == "slg":
                slg = entry[1] if len(entry) > 1 else self.slg
                if slg is not None and slg.scale > 0 and self._slg_active(sigma, slg):
                    # no layers (SkipLayerGuidanceDiT's single_layers alone: SD3 has no single blocks): the pass
                    # without them is the cond pass itself
                    skipped = skip_x0(slg.layers) if slg.layers else cond_x0
                    out = out + (cond_x0 - skipped) * slg.scale
                    if slg.rescale != 0:  # the whole batch's std, as ComfyUI's node
                        factor = cond_x0.std() / out.std()
                        out = out * (slg.rescale * factor + (1 - slg.rescale))
                continue
            uncond = torch.zeros_like(cond_x0) if uncond_x0 is None else uncond_x0
            if entry[0] == "cfg_zero_star":  # CFG-Zero*: the uncond prediction rescaled by its projection
                alpha = optimized_scale(x - cond_x0, x - uncond)
                out = out + uncond * (alpha - 1.0) + cfg * uncond * (1.0 - alpha)
            elif entry[0] == "cfg_norm":  # the result's channel norm capped at the cond prediction's, times strength
                scale = (cond_x0.norm(dim=1, keepdim=True) / (out.norm(dim=1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
                out = out * scale * entry[1]
            elif entry[0] == "mahiro":
                out = mahiro(out, cond_x0, uncond, cfg)
        if self._uncond_sink is not None:  # after the MODEL's post-CFG functions, as ComfyUI appends its hook
            self._uncond_sink[0] = torch.zeros_like(cond_x0) if uncond_x0 is None else uncond_x0
        self.calls += 1
        return out


class DualCFGDenoiser(CFGDenoiser):
    """ComfyUI's DualCFGGuider (comfy_extras/nodes_custom_sampler.py Guider_DualCFG): positive, middle and negative
    predictions (each side through the regional road: areas and masks paired across all three, as ComfyUI pairs
    every cond type), combined

        regular  cfg_function(middle, negative, cfg2) + (positive - middle) * cfg1
                 (cfg2 = 1: no negative pass, zeros; cfg1 = 1 as well: no middle pass either)
        nested   negative + cfg2 * (cfg_function(positive, middle, cfg1) - negative)

    cfg_function runs the MODEL's post-CFG functions (skip-layer guidance on that call's cond side); its pre-CFG
    functions (APG, LatentApplyOperationCFG) do not run: Guider_DualCFG calls cfg_function without them."""

    def __init__(self, model: ModelFn, cond: Conditioning | CondSet, middle: Conditioning | CondSet,
                 uncond: Conditioning | CondSet, cfg_conds: float, cfg_cond2_negative: float, nested: bool = False,
                 **kw):
        for name, v in (("cfg_conds", cfg_conds), ("cfg_cond2_negative", cfg_cond2_negative)):
            if not math.isfinite(v):
                raise InputError(f"{name} must be a finite number, got {v!r}")
        super().__init__(model, cond, uncond, cfg=cfg_cond2_negative, **kw)
        self.middle = middle
        self.cfg1, self.cfg2, self.nested = float(cfg_conds), float(cfg_cond2_negative), bool(nested)
        self.regional = True  # every side through _accumulated: three entry lists

    def _sides(self) -> tuple[Conditioning | CondSet | None, ...]:
        return self.cond, self.middle, self.uncond

    def _call_regional(self, x, sigma) -> torch.Tensor:
        pos, mid, neg = self._region_entries(x)
        if self.nested:
            pos_p, mid_p, neg_p = (self._accumulated(side, x, sigma) for side in (pos, mid, neg))
            text = self._finish(x, sigma, pos_p, mid_p, lambda layers: self._accumulated(pos, x, sigma, layers),
                                cfg=self.cfg1)
            return neg_p + self.cfg2 * (text - neg_p)
        skip_neg = math.isclose(self.cfg2, 1.0)
        skip_mid = skip_neg and math.isclose(self.cfg1, 1.0)
        zeros = torch.zeros_like(x, dtype=torch.float32)
        neg_p = zeros if skip_neg else self._accumulated(neg, x, sigma)
        mid_p = zeros if skip_mid else self._accumulated(mid, x, sigma)
        pos_p = self._accumulated(pos, x, sigma)
        # no middle pass: ComfyUI's post-CFG functions get no middle conditioning either (their passes give 0)
        skip_mid_x0 = lambda layers: zeros if skip_mid else self._accumulated(mid, x, sigma, layers)  # noqa: E731
        out = self._finish(x, sigma, mid_p, neg_p, skip_mid_x0, cfg=self.cfg2)
        return out + (pos_p - mid_p) * self.cfg1

