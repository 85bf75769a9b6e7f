"""Step caching (TeaCache style): skip whole MMDiT evaluations whose input barely changed.

    model = StepCache(mmdit, threshold=0.25, sigmas=sigmas)   # a ModelFn, as the sampler calls it
    v = model(x, sigma, context, pooled, skip_layers=(), control=None)
    model.stats -> {"calls": 28, "full": 14, "skipped": 14}

At every call the cache computes the *timestep-modulated input of the first joint block*
(x stream: modulate(LayerNorm(patch_embed(x) + pos), shift_0, scale_0), shift/scale from block 0's
adaLN of c = t_embed(sigma) + y_embed(pooled)), a few small ops against a full step. Its relative
L1 change since the previous call, mean|m - m_prev| / mean|m_prev|, is summed over the calls since
the last full evaluation (TeaCache's accumulated distance, without its model-specific polynomial
rescaling). While that sum stays below `threshold` the MMDiT is not run and the previous full
velocity is returned (the velocity of a flow model moves slowly along the path); once it reaches
the threshold the MMDiT runs, the velocity is stored and the sum restarts at 0.

Never skipped: the first evaluation (sigma at the schedule's top, nothing to reuse) and the last
(sigma at the smallest non-zero sigma of the schedule), each (shape, skip_layers, conditioning)
stream's first call, and calls whose conditioning tensors differ from the stored ones. CFG batching
(cond + uncond in one batch) is one call, so both halves skip together; skip-layer guidance's extra
pass is its own stream. LoRA changes the weights, not the call: composable. ControlNet residuals
are computed by the denoiser before the call and ignored on a skipped step (the reused velocity
already holds the last full step's control).

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

REUSE_CHOICES = ("velocity", "x0")
# What a skipped call returns: the last full velocity ("x0": the velocity that keeps the last full call's
# x0 prediction at the current x). Measured on the shipped model (8 items, euler / euler_ancestral, 20
# and 28 steps): the same PSNR within 0.7 dB; a first-order extrapolation in sigma from the last two
# full calls (TaylorSeer-like) was 2-3 dB worse at the same skip rate except at 1.67x with euler.
REUSE = "velocity"
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


class _Stream:
    """One call pattern's state: last modulated input, accumulated distance, last full velocity."""

    __slots__ = ("indicator", "distance", "velocity", "x0", "context", "pooled")

    def __init__(self):
        self.indicator: torch.Tensor | None = None
        self.distance = 0.0
        self.velocity: torch.Tensor | None = None
        self.x0: torch.Tensor | None = None  # [B, 16, h, w] float32: x - sigma * v of the last full call
        self.context: torch.Tensor | None = None
        self.pooled: torch.Tensor | None = None


class StepCache:
    """A ModelFn around `model` that skips evaluations (module docstring). sigmas: the run's schedule
    (1-D, the last one usually 0), used to never skip the first and the last evaluation."""

    def __init__(self, model: Any, threshold: float, sigmas: torch.Tensor | Sequence[float], reuse: str = REUSE):
        threshold = float(threshold)
        if not threshold >= 0.0 or threshold != threshold:
            raise InputError(f"cache threshold must be a number >= 0, got {threshold!r}")
        if reuse not in REUSE_CHOICES:
            raise InputError(f"step cache: reuse must be 'x0' or 'velocity', got {reuse!r}")
        self.reuse = reuse
        self.inner = model  # what runs a full evaluation (engine or MMDiT)
        self.model = _mmdit_of(model)  # the MMDiT (ControlNet's base_mmdit reads `.model`)
        self.threshold = threshold
        s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        if s.numel() < 2:
            raise InputError(f"step cache: need a schedule of at least 2 sigmas, got {s.numel()}")
        nonzero = s[s > 0]
        self._first = float(s.max())
        self._last = float(nonzero.min()) if nonzero.numel() else 0.0
        self.streams: dict[tuple, _Stream] = {}
        self.stats = {"calls": 0, "full": 0, "skipped": 0}

    @property
    def config(self):
        return self.inner.config

    def _pinned(self, sigma: float) -> bool:
        """First or last evaluation of the schedule: always computed."""
        tol = 1e-6 * max(1.0, abs(self._first))
        return sigma >= self._first - tol or sigma <= self._last + tol

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 skip_layers: Sequence[int] = (), **extra) -> torch.Tensor:
        self.stats["calls"] += 1
        key = (tuple(x.shape), tuple(context.shape), tuple(sorted(int(i) for i in skip_layers)), "control" in extra)
        st = self.streams.setdefault(key, _Stream())
        m = first_block_input(self.model, x, sigma, pooled)  # [B, hp*wp, C]
        s = float(sigma.reshape(-1)[0])
        same_cond = (st.context is not None and torch.equal(st.context, context) and torch.equal(st.pooled, pooled))
        if st.indicator is not None:
            st.distance += relative_l1(m, st.indicator)
        st.indicator = m
        if (st.velocity is not None and same_cond and not self._pinned(s) and st.distance < self.threshold):
            self.stats["skipped"] += 1
            if self.reuse == "velocity":
                return st.velocity
            sig = sigma.reshape(-1, 1, 1, 1).float()  # [B, 1, 1, 1]
            return ((x.float() - st.x0) / sig).to(st.velocity.dtype)  # the velocity that keeps x0
        v = self.inner(x, sigma, context, pooled, skip_layers=skip_layers, **extra)
        st.velocity, st.distance, st.context, st.pooled = v.clone(), 0.0, context, pooled  # graphs reuse buffers
        st.x0 = x.float() - sigma.reshape(-1, 1, 1, 1).float() * v.float()  # flow: x = (1-s) x0 + s n
        self.stats["full"] += 1
        return v

    def describe(self) -> str:
        c = self.stats
        return f"step cache (threshold {self.threshold:g}): {c['full']} of {c['calls']} evaluations computed"


def check_threshold(value: float) -> float:
    """A cache threshold from a CLI / API / workflow value: a number >= 0 (0 = off)."""
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise InputError(f"cache threshold must be a number >= 0, got {value!r}") from e
    if not v >= 0.0 or v == float("inf"):
        raise InputError(f"cache threshold must be a finite number >= 0, got {value!r}")
    return v
