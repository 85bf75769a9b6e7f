"""Step caching: skip whole MMDiT evaluations the sampler can do without, and predict their velocity.

    model = StepCache(mmdit, threshold=0.2, sigmas=sigmas)   # a ModelFn, as the sampler calls it
    v = model(x, sigma, context, pooled, skip_layers=(), control=None)
    model.stats -> {"calls": 20, "full": 11, "skipped": 9}

What a skipped call returns (`reuse`, default "linear"): the velocity extrapolated linearly in sigma
from the last two full evaluations, v1 + (s - s1) (v1 - v0) / (s1 - s0) (first-order TaylorSeer /
FORA-style forecast; with only one full evaluation so far: v1). "velocity" returns the last full
velocity as it is (TeaCache's reuse), "x0" the velocity that keeps the last full call's x0
prediction, "x0_linear" the velocity that gives the x0 prediction extrapolated linearly in sigma
from the last two full calls (measured with euler_ancestral, 256 items, CPU, threshold 1.0: the same
PSNR as "linear", 23.4 / 27.3 dB at 20 / 28 steps against 23.6 / 27.6; not the default).
Along the shipped model's uncached euler trajectory (16 items) the linear forecast of the next velocity
is 2.5-4x closer (relative L1) than the last velocity in the middle and end of the schedule; in the
first ~30% of it both are 8-20% off.

When to skip (`rule`, default "error"): the cache estimates the error of the forecast it would return.
At every full evaluation it compares the forecast from the two full evaluations before with the
velocity just computed, e = mean|v_pred - v| / mean|v|, and keeps kappa = e / |(s - s1)(s - s0)| (a
linear forecast's error grows with the product of its distances to its two points). The k-th call
skipped in a row at sigma s adds k * kappa * |(s - s1)(s - s0)| * dt(s) / mean dt to an accumulated
estimate (dt(s): the schedule step the sampler takes from s, so a skip costs in proportion to how far
the sampler moves on the forecast; k: an error made early in a run of skips is carried by every later
step of the run. Without k the shipped model's 28-step runs took more skips in a row than their
fidelity bore: 2.33x at 29.7 dB at threshold 0.2, 96 items); the call is skipped while
the sum stays below `threshold`, which restarts at 0 on every full evaluation. Until kappa exists
(fewer than three full calls) the estimate is the change the forecast adds, mean|v1 - v0| / mean|v1|
* |s - s1| / |s1 - s0|, and at most one call is skipped; nothing is skipped before there are two full
evaluations to extrapolate from. The estimate needs no calibration per model (TeaCache fits a
polynomial per model; this measures its own forecast, as EasyCache measures its transformation rate).

rule "input" is the earlier TeaCache-style rule: the relative L1 change mean|m - m_prev| / mean|m_prev|
of the *timestep-modulated input of the first joint block* (x stream: modulate(LayerNorm(
patch_embed(x) + pos), shift_0, scale_0) from block 0's adaLN of c = t_embed(sigma) + y_embed(pooled))
summed since the last full evaluation, without TeaCache's model-specific polynomial rescaling; below
`threshold` the call is skipped. `StepCache(..., rule="input", reuse="velocity")` is the cache as it
was before (its thresholds are on that other scale: 0.10 was its default); the module constants RULE
and REUSE are the defaults every caller (generation.sample) gets, read when a cache is built.

Never skipped: the first evaluation (sigma at the schedule's top, nothing to reuse), the first
`warmup` fraction of the schedule's evaluations (those at sigmas above sigmas[round(warmup * steps)]:
there the velocity turns fastest and a forecast is 8-20% off), the last (sigma at the smallest
non-zero sigma of the schedule), each (shape, skip_layers, conditioning)
stream's first call, and calls whose conditioning tensors differ from the stored ones. `runs`
((progress, n), ...; default ((0.4, 1), (0.85, 2), (1.0, 1))) caps the calls skipped in a row before each
fraction of the schedule: one at a time until 40%, two until 85%, one to the end. Measured on the
shipped model (euler, 256 items, CPU, placements forced, 11 of 20 / 15 of 28 calls full): this
placement kept the most (20 steps: 33.9 dB, score +1.2 points; 28: 41.0 dB, -2.0) against every other
call from the third (33.0 dB, -3.1 at 20), two in a row from 30% (30.1 dB, -12.1) or two in a row just
before the last call (10 of 20 full: 28.6 dB, -15.2): the first and last fifth of the schedule carry
the most. CFG batching (cond + uncond in one batch) is one call, so both halves skip together;
skip-layer guidance's extra pass is its own stream. LoRA changes the weights, not the call:
composable. ControlNet residuals are computed by the denoiser before the call and ignored on a skipped
step (the forecast velocity comes from full steps that had the control).

threshold 0 disables the cache (sample() then calls the model directly). The default threshold
(`DEFAULT_CACHE_THRESHOLD`) comes from the shipped tiny model's measurements (README, docs/
ARCHITECTURE.md, benchmarks/faster.py's tiny table).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .defaults import DEFAULT_CACHE_THRESHOLD as _DEFAULT
from .errors import InputError

logger = logging.getLogger(__name__)

REUSE_CHOICES = ("linear", "velocity", "x0", "x0_linear")
RULE_CHOICES = ("error", "input")
# Defaults (module docstring). Measured on the shipped model, euler, same seeds, CPU, 20 / 28 steps:
# rule "error" + "linear" with WARMUP / RUNS at 1.0 (256 items): 1.82x / 1.87x fewer full steps at 33.8 / 41.0
# dB mean PSNR (without them, at 0.2: 1.82x / 2.02x at 33.0 / 38.3 dB);
# rule "input" + "velocity" (the earlier cache, 96 items) at 0.10: 1.43x / 1.65x at 33.5 / 34.2 dB, at
# 0.15: 1.67x / 2.33x at 29.9 / 28.9 dB (README, benchmarks/results/faster_tiny_euler_cpu*.json).
REUSE = "linear"
RULE = "error"
WARMUP = 0.2  # fraction of the schedule's first evaluations always computed (module docstring)
# ((progress, n), ...): before that fraction of the schedule at most n calls are skipped in a row; None: no limit
RUNS: tuple[tuple[float, int], ...] | None = ((0.4, 1), (0.85, 2), (1.0, 1))
_MODULE_RUNS = object()  # StepCache(runs=...) not given: the module's RUNS as it is when the cache is built
DEFAULT_CACHE_THRESHOLD = _DEFAULT  # measured: defaults.py
NORM_EPS = 1e-6  # models/mmdit.py layer_norm


def _mmdit_of(model: Any) -> Any:
    """The MMDiT module behind a ModelFn: an engine's `.model`, or the MMDiT itself."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "joint_blocks") or not hasattr(inner, "x_embedder"):
        raise InputError(f"step cache: {type(model).__name__} is not an MMDiT or an MMDiT engine "
                         "(no joint_blocks / x_embedder); run with cache threshold 0")
    return inner


@torch.no_grad()
def first_block_input(model: Any, x: torch.Tensor, sigma: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The x stream's modulated input of joint block 0 -> [B, hp*wp, C] float32.

    x [B, 16, h, w], sigma [B] (or a scalar), pooled [B, P]; same ops as MMDiT.forward up to the
    first block's qkv linear input."""
    m = _mmdit_of(model)
    dt = m.x_embedder.proj.weight.dtype
    if dt not in (torch.float32, torch.float16, torch.bfloat16):  # an fp8 conv weight: compute in bf16
        dt = torch.bfloat16
    B, _, h, w = x.shape
    p = m.config.patch_size
    t = (sigma.reshape(-1).float() * 1000).expand(B)
    tokens = m.x_embedder(x.to(dt)) + m.cropped_pos_embed(h // p, w // p).to(dt)  # [B, hp*wp, C]
    c = m.t_embedder(t, dt) + m.y_embedder(pooled.to(dt))  # [B, C]
    C = tokens.shape[-1]
    mods = m.joint_blocks[0].x_block.adaLN_modulation(c)  # [B, n*C]
    shift, scale = mods[:, :C].float(), mods[:, C:2 * C].float()  # [B, C]
    normed = F.layer_norm(tokens.float(), (C,), eps=NORM_EPS)
    return normed * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # [B, hp*wp, C]


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean|a - b| / mean|b| (0 when both are 0)."""
    den = float(b.abs().mean())
    num = float((a - b).abs().mean())
    return 0.0 if num == 0.0 else num / max(den, 1e-12)


def extrapolate(s: float, s1: float, v1: torch.Tensor, s0: float, v0: torch.Tensor) -> torch.Tensor:
    """The line through (s0, v0) and (s1, v1) at s (float32 tensors); v1 when s0 == s1."""
    if s1 == s0:
        return v1
    return v1 + ((s - s1) / (s1 - s0)) * (v1 - v0)


class _Stream:
    """One call pattern's state: the last two full evaluations, the skip rule's accumulator."""

    __slots__ = ("indicator", "distance", "velocity", "sigma", "prev", "kappa", "change", "skips", "x0", "x0_prev",
                 "context", "pooled")

    def __init__(self):
        self.indicator: torch.Tensor | None = None  # rule "input": last modulated input
        self.distance = 0.0  # accumulated indicator change ("input") or forecast error estimate ("error")
        self.velocity: torch.Tensor | None = None  # last full velocity (the model's dtype)
        self.sigma = 0.0  # sigma of the last full call
        self.prev: tuple[float, torch.Tensor] | None = None  # (sigma, velocity float32) of the full call before
        self.kappa: float | None = None  # rule "error": forecast error / |(s - s1)(s - s0)| at the last full call
        self.skips = 0  # calls skipped since the last full one
        self.change = 0.0  # mean|v - v_prev| / mean|v_prev| between the last two full calls
        self.x0: torch.Tensor | None = None  # [B, 16, h, w] float32: x - sigma * v of the last full call
        self.x0_prev: torch.Tensor | None = None  # the same of the full call before (at prev's sigma)
        self.context: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None


class StepCache:
    """A ModelFn around `model` that skips evaluations (module docstring). sigmas: the run's schedule
    (1-D, the last one usually 0): the first and the last evaluation are never skipped, and its steps
    weigh the "error" rule's estimate. reuse / rule / warmup: None = the module's REUSE / RULE / WARMUP;
    runs: the module's RUNS unless given (None: no cap on skips in a row)."""

    def __init__(self, model: Any, threshold: float, sigmas: torch.Tensor | Sequence[float],
                 reuse: str | None = None, rule: str | None = None, warmup: float | None = None,
                 runs: Sequence[tuple[float, int]] | None | object = _MODULE_RUNS):
        threshold = float(threshold)
        if not threshold >= 0.0 or threshold != threshold:
            raise InputError(f"cache threshold must be a number >= 0, got {threshold!r}")
        reuse = REUSE if reuse is None else reuse
        rule = RULE if rule is None else rule
        if reuse not in REUSE_CHOICES:
            raise InputError(f"step cache: reuse must be one of {REUSE_CHOICES}, got {reuse!r}")
        if rule not in RULE_CHOICES:
            raise InputError(f"step cache: rule must be one of {RULE_CHOICES}, got {rule!r}")
        self.reuse, self.rule = reuse, rule
        self.inner = model  # what runs a full evaluation (engine or MMDiT)
        self.model = _mmdit_of(model)  # the MMDiT (ControlNet's base_mmdit reads `.model`)
        self.threshold = threshold
        s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        if s.numel() < 2:
            raise InputError(f"step cache: need a schedule of at least 2 sigmas, got {s.numel()}")
        nonzero = s[s > 0]
        self._first = float(s.max())
        self._last = float(nonzero.min()) if nonzero.numel() else 0.0
        self._sched = sorted((float(v) for v in s), reverse=True)
        self.warmup = WARMUP if warmup is None else float(warmup)
        if not 0.0 <= self.warmup <= 1.0:
            raise InputError(f"step cache: warmup must be a fraction in [0, 1], got {warmup!r}")
        self.runs = RUNS if runs is _MODULE_RUNS else runs
        if self.runs is not None:
            self.runs = tuple((float(p), int(n)) for p, n in self.runs)
            if any(n < 0 or not 0.0 <= p <= 1.0 for p, n in self.runs):
                raise InputError(f"step cache: runs must be (progress in [0, 1], skips >= 0) pairs, got {runs!r}")
        # evaluations at sigmas above this one are computed (warmup: the first round(warmup * steps) calls)
        self._warm_sigma = self._sched[min(round(self.warmup * (len(self._sched) - 1)), len(self._sched) - 1)]
        self._mean_dt = max((self._sched[0] - self._sched[-1]) / (len(self._sched) - 1), 1e-12)
        self.streams: dict[tuple, _Stream] = {}
        self.stats = {"calls": 0, "full": 0, "skipped": 0}

    @property
    def config(self):
        return self.inner.config

    def _pinned(self, sigma: float) -> bool:
        """First or last evaluation of the schedule: always computed."""
        tol = 1e-6 * max(1.0, abs(self._first))
        return sigma >= self._first - tol or sigma <= self._last + tol or sigma > self._warm_sigma + tol

    def _index(self, sigma: float) -> int:
        """The schedule interval holding `sigma`: the sampler's call index (0 = the first call)."""
        sc = self._sched
        for k in range(len(sc) - 1):
            if sigma >= sc[k + 1] - 1e-9 * max(1.0, sc[0]) and sc[k] > sc[k + 1]:
                return k
        return -1  # below the schedule's last interval (or a flat schedule)

    def _max_run(self, sigma: float) -> int | None:
        """Most calls skipped in a row at this point of the schedule (None: no limit)."""
        if self.runs is None:
            return None
        k = self._index(sigma)
        progress = (k if k >= 0 else len(self._sched) - 2) / max(len(self._sched) - 1, 1)
        for until, n in self.runs:
            if progress < until:
                return n
        return self.runs[-1][1] if self.runs else None

    def _step_weight(self, sigma: float) -> float:
        """The schedule step the sampler takes from `sigma` (the interval holding it) over the mean step."""
        k = self._index(sigma)
        return (self._sched[k] - self._sched[k + 1]) / self._mean_dt if k >= 0 else 1.0

    def _skip(self, st: _Stream, x: torch.Tensor, sigma: torch.Tensor, s: float, pooled: torch.Tensor) -> bool:
        """Update the stream's accumulator for this call; True: the call may be skipped (rule only)."""
        if self.rule == "input":
            m = first_block_input(self.model, x, sigma, pooled)  # [B, hp*wp, C]
            if st.indicator is not None:
                st.distance += relative_l1(m, st.indicator)
            st.indicator = m
            return st.distance < self.threshold
        if st.prev is None:  # one full evaluation: nothing to extrapolate from
            return False
        s1, s0 = st.sigma, st.prev[0]
        if st.kappa is None:  # no forecast error measured yet: the change the forecast adds to v1, one skip
            if st.skips:
                return False
            est = st.change * abs(s - s1) / max(abs(s1 - s0), 1e-12)
        else:
            est = st.kappa * abs((s - s1) * (s - s0))
        st.distance += est * self._step_weight(s) * (st.skips + 1)
        return st.distance < self.threshold

    def _forecast(self, st: _Stream, x: torch.Tensor, sigma: torch.Tensor, s: float) -> torch.Tensor:
        if self.reuse == "velocity" or (self.reuse == "linear" and st.prev is None):
            return st.velocity
        if self.reuse == "linear":
            s0, v0 = st.prev
            return extrapolate(s, st.sigma, st.velocity.float(), s0, v0).to(st.velocity.dtype)
        sig = sigma.reshape(-1, 1, 1, 1).float()  # [B, 1, 1, 1]
        x0 = st.x0
        if self.reuse == "x0_linear" and st.prev is not None and st.x0_prev is not None:
            x0 = extrapolate(s, st.sigma, st.x0, st.prev[0], st.x0_prev)  # the x0 prediction's line in sigma
        return ((x.float() - x0) / sig).to(st.velocity.dtype)  # the velocity that gives that x0 from x

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 skip_layers: Sequence[int] = (), **extra) -> torch.Tensor:
        self.stats["calls"] += 1
        key = (tuple(x.shape), tuple(context.shape), tuple(sorted(int(i) for i in skip_layers)), "control" in extra)
        st = self.streams.setdefault(key, _Stream())
        s = float(sigma.reshape(-1)[0])
        same_cond = (st.context is not None and torch.equal(st.context, context) and torch.equal(st.pooled, pooled))
        skip = self._skip(st, x, sigma, s, pooled)
        limit = self._max_run(s)
        capped = limit is not None and st.skips >= limit
        if st.velocity is not None and same_cond and not self._pinned(s) and skip and not capped:
            self.stats["skipped"] += 1
            st.skips += 1
            return self._forecast(st, x, sigma, s)
        v = self.inner(x, sigma, context, pooled, skip_layers=skip_layers, **extra)
        vf = v.float()
        if not same_cond or st.velocity is None:
            st.prev, st.kappa = None, None
        else:
            if st.prev is not None and self.rule == "error":  # how far off the forecast for this call was
                s0, v0 = st.prev
                err = relative_l1(extrapolate(s, st.sigma, st.velocity.float(), s0, v0), vf)
                st.kappa = err / max(abs((s - st.sigma) * (s - s0)), 1e-12)
            st.prev = (st.sigma, st.velocity.float())
            st.change = relative_l1(vf, st.prev[1])
        st.x0_prev = st.x0 if st.prev is not None else None  # x0 at st.prev's sigma
        st.sigma, st.distance, st.skips = s, 0.0, 0
        st.velocity, st.context, st.pooled = v.clone(), context, pooled  # graphs reuse buffers
        st.x0 = x.float() - sigma.reshape(-1, 1, 1, 1).float() * vf  # flow: x = (1-s) x0 + s n
        self.stats["full"] += 1
        return v

    def describe(self) -> str:
        c = self.stats
        return (f"step cache (threshold {self.threshold:g}, rule {self.rule}, reuse {self.reuse}): "
                f"{c['full']} of {c['calls']} evaluations computed")


def check_threshold(value: float) -> float:
    """A cache threshold from a CLI / API / workflow value: a number >= 0 (0 = off)."""
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"cache threshold must be a number >= 0, got {value!r}") from e
    if not v >= 0.0 or v == float("inf"):
        raise InputError(f"cache threshold must be a finite number >= 0, got {value!r}")
    return v
