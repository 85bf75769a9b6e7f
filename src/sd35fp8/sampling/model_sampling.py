"""Flow-matching model sampling (ComfyUI's ModelSamplingDiscreteFlow + CONST), as used by SD3.5.

sigma(t) = shift*t / (1 + (shift-1)*t), t = timestep / multiplier, model timestep = sigma*multiplier.
The 1000-entry sigma table is built with exactly ComfyUI's float32 expression so that every
scheduler that indexes it (simple, ddim_uniform, beta) gives bit-identical sigmas.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError


def time_snr_shift(shift: float, t):
    """ComfyUI's time_snr_shift: works on python floats and tensors (keeps the tensor dtype)."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def _reshape_sigma(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    # a single sigma broadcasts as a scalar; a batch of sigmas as [B, 1, 1, 1]
    if sigma.nelement() == 1:
        return sigma.view(())
    return sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


def flow_noise_scaling(sigma, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """x = sigma*noise + (1-sigma)*latent (ComfyUI CONST.noise_scaling)."""
    sigma = _reshape_sigma(torch.as_tensor(sigma, device=noise.device), noise.ndim)
    return sigma * noise + (1.0 - sigma) * latent


class FlowMatching:
    """Discrete flow sampling with ComfyUI's CONST prediction (denoised = x - sigma*v)."""

    def __init__(self, shift: float = 3.0, multiplier: float = 1000, timesteps: int = 1000):
        if not (shift > 0 and math.isfinite(shift)):
            raise InputError(f"shift must be a positive number, got {shift!r}")
        self.shift = float(shift)
        self.multiplier = multiplier
        self.timesteps = int(timesteps)
        # same expression as ComfyUI's set_parameters (int arange / int -> float32)
        t = (torch.arange(1, self.timesteps + 1, 1) / self.timesteps) * multiplier  # [T]
        self.sigmas = self.sigma(t)  # [T] float32, increasing

    def __repr__(self) -> str:
        return f"FlowMatching(shift={self.shift}, multiplier={self.multiplier}, timesteps={self.timesteps})"

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma * self.multiplier

    def sigma(self, timestep):
        return time_snr_shift(self.shift, timestep / self.multiplier)

    def percent_to_sigma(self, percent: float) -> float:
        """0.0 -> start of sampling (sigma 1), 1.0 -> end (sigma 0)."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(time_snr_shift(self.shift, 1.0 - percent))

    # --- CONST prediction -------------------------------------------------------------
    def calculate_input(self, sigma, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_denoised(self, sigma: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x0 = x - sigma*v."""
        sigma = _reshape_sigma(torch.as_tensor(sigma, device=v.device), v.ndim)
        return x - v * sigma

    def noise_scaling(self, sigma, noise: torch.Tensor, latent: torch.Tensor, max_denoise: bool = False) -> torch.Tensor:
        """Start point of sampling: sigma*noise + (1-sigma)*latent (max_denoise has no effect for flow)."""
        return flow_noise_scaling(sigma, noise, latent)

    def inverse_noise_scaling(self, sigma, latent: torch.Tensor) -> torch.Tensor:
        """latent / (1 - sigma); the identity for the usual final sigma 0."""
        sigma = _reshape_sigma(torch.as_tensor(sigma, device=latent.device), latent.ndim)
        return latent / (1.0 - sigma)

    # --- half log-SNR used by the SDE samplers (ComfyUI sigma_to_half_log_snr for CONST) ---
    @staticmethod
    def half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
        """lambda = log((1 - sigma) / sigma)."""
        return sigma.logit().neg()

    @staticmethod
    def sigma_from_half_log_snr(lam: torch.Tensor) -> torch.Tensor:
        return lam.neg().sigmoid()

    def offset_first_sigma(self, sigmas: torch.Tensor, percent_offset: float = 1e-4) -> torch.Tensor:
        """sigma 1 has infinite log-SNR: replace it by percent_to_sigma(1e-4) (ComfyUI)."""
        if len(sigmas) <= 1 or sigmas[0] < 1:
            return sigmas
        sigmas = sigmas.clone()
        sigmas[0] = self.percent_to_sigma(percent_offset)
        return sigmas
