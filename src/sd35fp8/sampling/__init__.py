"""Flow-matching sampling for SD3.5 with ComfyUI's schedules, samplers and noise."""

from __future__ import annotations

from .guidance import CFGDenoiser, CondEntry, CondSet, Conditioning, DualCFGDenoiser, ModelFn, SLGConfig
from .model_sampling import FlowMatching, time_snr_shift
from .noise import BrownianTreeNoiseSampler, default_noise_sampler, noise_scaling, prepare_noise
from .samplers import SAMPLERS, get_sampler, sample
from .schedulers import SCHEDULERS, calculate_sigmas, check_scheduler, get_sigmas

__all__ = [
    "CFGDenoiser",
    "DualCFGDenoiser",
    "CondEntry",
    "CondSet",
    "Conditioning",
    "ModelFn",
    "SLGConfig",
    "FlowMatching",
    "time_snr_shift",
    "BrownianTreeNoiseSampler",
    "default_noise_sampler",
    "noise_scaling",
    "prepare_noise",
    "SAMPLERS",
    "get_sampler",
    "sample",
    "SCHEDULERS",
    "calculate_sigmas",
    "check_scheduler",
    "get_sigmas",
]
