"""ComfyUI's own step caches, EasyCache and LazyCache (comfy_extras/nodes_easycache.py), as its nodes run them.

Both skip model evaluations inside a window of the schedule (start_percent .. end_percent, taken to sigmas with the
MODEL's shift: start_t = percent_to_sigma(start), end_t = percent_to_sigma(end); a call at sigma s is a candidate
when end_t < s <= start_t). A skipped evaluation returns its input plus the residual (output - input) of the last
computed one. The rule, per call: the input's change since the last computed call, input_change =
mean|sub(x) - sub(x_prev)| (sub: every 8th row and column of the latent), times the relative transformation rate
measured at the last computed call (output_change / input_change), over mean|output_prev|, is added to a running
sum; while the sum stays under reuse_threshold the call is skipped, else computed and the sum restarts at 0.

- LazyCache wraps the whole guided prediction (ComfyUI's PREDICT_NOISE wrapper): x the sampler's latent, output
  the CFG'd x0 prediction (`LazyCacheDenoiser`, around CFGDenoiser, inside the inpainting mask).
- EasyCache wraps the diffusion model's call (ComfyUI's DIFFUSION_MODEL wrapper): x the model's input, output its
  velocity, with a residual per call of the step (`EasyCacheModel`, as `denoiser.model`; ComfyUI keys them by the
  conditionings' uuids). The step's first call decides: when it is skipped every later call of the step reuses
  its own residual (ComfyUI's skip_current_step). One difference: ComfyUI measures the first conditioning's rows of
  a batched call; the cond + uncond rows of a CFG batch share x, and here the output's change is measured over the
  whole first call.

State lives for one sampling run (ComfyUI's OUTER_SAMPLE wrapper clones the holder and resets it at the end);
a change of the latent's shape, dtype or device resets it. `ComfyCache.wrap` builds the wrappers for
generation.sample; `stats` are the run's counts ({"calls", "full", "skipped"}).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .model_sampling import FlowMatching

log = logging.getLogger(__name__)

CACHE_KINDS = ("EasyCache", "LazyCache")
SUBSAMPLE = 8  # ComfyUI's subsample_factor


@dataclass(frozen=True)
class ComfyCache:
    """The EasyCache / LazyCache node's settings, carried on the MODEL (workflow engine.SD3Model.step_cache)."""

    kind: str  # "EasyCache" | "LazyCache"
    reuse_threshold: float = 0.2
    start_percent: float = 0.15
    end_percent: float = 0.95
    verbose: bool = False

    def wrap(self, denoiser: Any, model_sampling: FlowMatching, stats: dict) -> Callable:
        """The denoiser to sample with (its `.model` replaced for EasyCache); stats collects the counts."""
        state = _CacheState(self, model_sampling, stats)
        log.info("%s enabled - threshold: %s, start_percent: %s, end_percent: %s", self.kind, self.reuse_threshold,
                 self.start_percent, self.end_percent)
        if self.kind == "LazyCache":
            return LazyCacheDenoiser(denoiser, state)
        denoiser.model = EasyCacheModel(denoiser.model, state)
        return _StepStart(denoiser, state)


class _CacheState:
    """ComfyUI's EasyCacheHolder / LazyCacheHolder: the window in sigmas and what the last computed call left."""

    def __init__(self, settings: ComfyCache, model_sampling: FlowMatching, stats: dict):
        self.s = settings
        self.start_t = model_sampling.percent_to_sigma(settings.start_percent)
        self.end_t = model_sampling.percent_to_sigma(settings.end_percent)
        self.stats = stats
        self.reset()
        self.rate: torch.Tensor | float | None = None  # a fresh holder: no rate yet (reset() sets 0.0, as ComfyUI)

    def reset(self) -> None:
        self.rate = 0.0
        self.cumulative: torch.Tensor | float = 0.0
        self.initial_step = True
        self.skip_current_step = False
        self.first_key: int | None = None
        self.x_prev: torch.Tensor | None = None  # subsampled
        self.out_prev: torch.Tensor | None = None  # subsampled
        self.out_prev_norm: torch.Tensor | None = None
        self.diffs: dict[int, torch.Tensor] = {}
        self.metadata: tuple | None = None

    def past_end(self, sigma: torch.Tensor) -> bool:
        return not bool(sigma.reshape(-1)[0] > self.end_t)

    def in_window(self, sigma: torch.Tensor) -> bool:
        return bool(sigma.reshape(-1)[0] <= self.start_t)

    def check_metadata(self, x: torch.Tensor, whole_shape: bool) -> None:
        meta = (x.device, x.dtype, tuple(x.shape) if whole_shape else tuple(x.shape[1:]))
        if self.metadata is None:
            self.metadata = meta
        elif meta != self.metadata:
            log.warning("%s - Tensor shape, dtype or device changed, resetting state", self.s.kind)
            self.reset()

    @staticmethod
    def sub(t: torch.Tensor) -> torch.Tensor:
        return t[..., ::SUBSAMPLE, ::SUBSAMPLE]

    def decide(self, x: torch.Tensor, can_apply: bool) -> tuple[bool, torch.Tensor | None]:
        """(skip this call, input_change) at a candidate call of the deciding stream."""
        input_change = None
        if self.x_prev is not None:
            input_change = (self.sub(x) - self.x_prev).flatten().abs().mean()
        if self.out_prev_norm is not None and self.rate is not None:
            self.cumulative = self.cumulative + self.rate * input_change / self.out_prev_norm
            if bool(self.cumulative < self.s.reuse_threshold) and can_apply:
                if self.s.verbose:
                    log.info("%s [verbose] - skipping step; cumulative_change_rate: %s, reuse_threshold: %s",
                             self.s.kind, float(self.cumulative), self.s.reuse_threshold)
                return True, input_change
            self.cumulative = 0.0
        return False, input_change

    def computed(self, x: torch.Tensor, out: torch.Tensor, input_change: torch.Tensor | None) -> None:
        """After a computed call of the deciding stream: the rate, and what the next call compares with."""
        if self.out_prev_norm is not None and input_change is not None:
            self.rate = (self.sub(out) - self.out_prev).flatten().abs().mean() / input_change
        self.x_prev = self.sub(x).clone()
        self.out_prev = self.sub(out).clone()
        self.out_prev_norm = out.flatten().abs().mean()

    def count(self, skipped: bool) -> None:
        self.stats["calls"] = self.stats.get("calls", 0) + 1
        key = "skipped" if skipped else "full"
        self.stats[key] = self.stats.get(key, 0) + 1


class LazyCacheDenoiser:
    """LazyCache around the guided denoiser: denoiser(x [B, C, h, w], sigma [B], **extra) -> x0."""

    def __init__(self, inner: Any, state: _CacheState):
        self.inner, self.state = inner, state

    def __getattr__(self, name: str) -> Any:  # regional, capture_uncond ... of the wrapped denoiser
        if name in ("inner", "state"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        st = self.state
        if st.past_end(sigma):
            st.count(False)
            return self.inner(x, sigma, **extra)
        input_change = None
        if st.in_window(sigma):
            st.check_metadata(x, whole_shape=True)
            if st.x_prev is not None:
                skip, input_change = st.decide(x, can_apply=0 in st.diffs)
                if skip:
                    st.count(True)
                    return x + st.diffs[0].to(x.device)
        out = self.inner(x, sigma, **extra)
        st.computed(x, out, input_change)
        st.diffs[0] = out - x
        st.count(False)
        return out


class _StepStart:
    """EasyCache's per-step reset (ComfyUI's CALC_COND_BATCH wrapper) around the denoiser: each sampler evaluation
    starts a step whose model calls are numbered from 0."""

    def __init__(self, inner: Any, state: _CacheState):
        self.inner, self.state = inner, state

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "state"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        self.state.skip_current_step = False
        self.inner.model.call = 0
        out = self.inner(x, sigma, **extra)
        self.state.count(self.state.skip_current_step)
        return out


class EasyCacheModel:
    """EasyCache around the model call: model(x, sigma, context, pooled, **kw) -> velocity; a residual per call
    of the step (key = its number in the step)."""

    def __init__(self, model: Any, state: _CacheState):
        self.model, self.state, self.call = model, state, 0

    def __getattr__(self, name: str) -> Any:  # the engine's attributes (config, ...)
        if name in ("model", "state"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        key, self.call = self.call, self.call + 1
        if st.past_end(sigma):
            return self.model(x, sigma, *args, **kwargs)
        first = st.first_key == key
        input_change = None
        if st.in_window(sigma):
            st.check_metadata(x, whole_shape=False)
            can_apply = key in st.diffs
            if st.skip_current_step and can_apply:
                return x + st.diffs[key].to(x.device)
            if st.initial_step:
                st.first_key, first, st.initial_step = key, True, False
            if first:
                skip, input_change = st.decide(x, can_apply)
                if skip:
                    st.skip_current_step = True
                    return x + st.diffs[key].to(x.device)
        out = self.model(x, sigma, *args, **kwargs)
        if first:
            st.computed(x, out, input_change)
        st.diffs[key] = out - x
        return out
