"""Sigma schedules with ComfyUI's names and values (comfy/samplers.py, comfy/k_diffusion/sampling.py).

Every function returns a float32 tensor [steps+1] that ends in 0 (linear_quadratic and
kl_optimal too). The float32 arithmetic follows ComfyUI's expressions one by one so the
values agree to the last bit or within 1e-6. `get_sigmas` adds KSampler's handling of
`denoise` (< 1: build int(steps/denoise) steps, keep the last steps+1) and of the samplers
whose penultimate sigma ComfyUI discards (dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import InputError
from .model_sampling import FlowMatching

SCHEDULERS: tuple[str, ...] = (
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
)

# ComfyUI KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS: one more step, then drop sigmas[-2]
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def simple(ms: FlowMatching, steps: int) -> torch.Tensor:
    stride = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def ddim_uniform(ms: FlowMatching, steps: int) -> torch.Tensor:
    i = 1
    if math.isclose(float(ms.sigmas[i]), 0, abs_tol=0.00001):
        steps += 1
        sigs: list[float] = []
    else:
        sigs = [0.0]
    stride = max(len(ms.sigmas) // steps, 1)
    while i < len(ms.sigmas):
        sigs.append(float(ms.sigmas[i]))
        i += stride
    return torch.tensor(sigs[::-1], dtype=torch.float32)


def normal(ms: FlowMatching, steps: int, sgm: bool = False) -> torch.Tensor:
    start = ms.timestep(ms.sigma_max)  # 0-dim float32
    end = ms.timestep(ms.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(ms.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigs = [float(ms.sigma(t)) for t in timesteps]
    if append_zero:
        sigs.append(0.0)
    return torch.tensor(sigs, dtype=torch.float32)


def sgm_uniform(ms: FlowMatching, steps: int) -> torch.Tensor:
    return normal(ms, steps, sgm=True)


# ---- k-diffusion's schedules over explicit bounds (comfy/k_diffusion/sampling.py get_sigmas_*): the
# KarrasScheduler / ExponentialScheduler / ... nodes call these with their own sigma_min / sigma_max
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    ramp = torch.linspace(1, 0, n) ** rho
    return _append_zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def vp_sigmas(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> torch.Tensor:
    t = torch.linspace(1, eps_s, n)
    return _append_zero(torch.sqrt(torch.special.expm1(beta_d * t ** 2 / 2 + beta_min * t)))


def laplace_sigmas(n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta_: float = 0.5) -> torch.Tensor:
    """Tiankai et al. 2024. n sigmas, no final 0 (as ComfyUI's: sampling then stops at sigma_min)."""
    x = torch.linspace(0, 1, n)
    lmb = mu - beta_ * torch.sign(0.5 - x) * torch.log(1 - 2 * torch.abs(0.5 - x) + 1e-5)
    return torch.clamp(torch.exp(lmb), min=sigma_min, max=sigma_max)


def karras(ms: FlowMatching, steps: int, rho: float = 7.0) -> torch.Tensor:
    return karras_sigmas(steps, float(ms.sigma_min), float(ms.sigma_max), rho)


def exponential(ms: FlowMatching, steps: int) -> torch.Tensor:
    return exponential_sigmas(steps, float(ms.sigma_min), float(ms.sigma_max))


def beta(ms: FlowMatching, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Beta-distributed timesteps (arXiv 2407.12173); needs scipy for the beta quantile."""
    try:
        import scipy.stats
    except ImportError as e:  # scipy is optional: only this scheduler needs it
        raise InputError("scheduler 'beta' needs the scipy package (pip install scipy)") from e
    total = len(ms.sigmas) - 1
    ts = 1 - np.linspace(0, 1, steps, endpoint=False)
    ts = np.rint(scipy.stats.beta.ppf(ts, alpha, beta_) * total)
    sigs: list[float] = []
    last_t = -1
    for t in ts:
        if t != last_t:  # repeated timesteps collapse, as in ComfyUI
            sigs.append(float(ms.sigmas[int(t)]))
        last_t = t
    return torch.tensor(sigs + [0.0], dtype=torch.float32)


def linear_quadratic(ms: FlowMatching, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None) -> torch.Tensor:
    """Mochi's schedule: linear for the first half, quadratic after (python doubles, as ComfyUI)."""
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        if linear_steps is None:
            linear_steps = steps // 2
        lin = [i * threshold_noise / linear_steps for i in range(linear_steps)]
        step_diff = linear_steps - threshold_noise * steps
        quad_steps = steps - linear_steps
        quad_coef = step_diff / (linear_steps * quad_steps**2)
        lin_coef = threshold_noise / linear_steps - 2 * step_diff / (quad_steps**2)
        const = quad_coef * (linear_steps**2)
        quad = [quad_coef * (i**2) + lin_coef * i + const for i in range(linear_steps, steps)]
        schedule = [1.0 - s for s in lin + quad + [1.0]]
    return torch.tensor(schedule, dtype=torch.float32) * ms.sigma_max


def kl_optimal(ms: FlowMatching, steps: int) -> torch.Tensor:
    if steps < 2:  # ComfyUI divides by steps-1 and returns NaN here
        raise InputError("scheduler 'kl_optimal' needs at least 2 steps (ComfyUI returns NaN sigmas for 1)")
    sigma_min, sigma_max = float(ms.sigma_min), float(ms.sigma_max)
    adj = torch.arange(steps, dtype=torch.float).div_(steps - 1)
    sigmas = adj.new_zeros(steps + 1)
    sigmas[:-1] = (adj * math.atan(sigma_min) + (1 - adj) * math.atan(sigma_max)).tan_()
    return sigmas


_HANDLERS = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": karras,
    "exponential": exponential,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}
assert tuple(_HANDLERS) == SCHEDULERS


def check_scheduler(name: str) -> None:
    if name not in _HANDLERS:
        raise InputError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULERS)}")


def calculate_sigmas(ms: FlowMatching, scheduler: str, steps: int) -> torch.Tensor:
    """ComfyUI calculate_sigmas: the plain schedule of `steps` steps."""
    check_scheduler(scheduler)
    return _HANDLERS[scheduler](ms, steps)


def get_sigmas(
    scheduler: str,
    steps: int,
    shift: float = 3.0,
    denoise: float = 1.0,
    sampler: str | None = None,
    model_sampling: FlowMatching | None = None,
) -> torch.Tensor:
    """Sigmas of ComfyUI's KSampler for (scheduler, steps, denoise[, sampler]) -> float32 [steps+1].

    `sampler` only matters for dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2 (ComfyUI computes one
    step more and drops the penultimate sigma). `model_sampling` overrides `shift` when given.
    """
    check_scheduler(scheduler)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    if not (0.0 < denoise <= 1.0):
        raise InputError(f"denoise must be in (0, 1], got {denoise!r}")
    ms = model_sampling if model_sampling is not None else FlowMatching(shift=shift)

    def schedule(n: int) -> torch.Tensor:
        discard = sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        sigmas = calculate_sigmas(ms, scheduler, n + 1 if discard else n)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    if denoise > 0.9999:
        return schedule(steps)
    return schedule(int(steps / denoise))[-(steps + 1):]
