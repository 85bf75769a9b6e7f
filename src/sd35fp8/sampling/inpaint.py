"""Inpainting with a latent noise mask, as ComfyUI's SetLatentNoiseMask + KSampler compute it.

ComfyUI (comfy/samplers.py `KSamplerX0Inpaint`, `sampler_helpers.prepare_mask`): the mask
(1 = repaint, 0 = keep) is resized bilinearly to the latent, repeated over its channels and batch.
Before every model call the kept region of x is replaced by the init latent noised to the current
sigma (`noise_scaling(sigma, noise, latent)`), and the kept region of the model's clean-latent
prediction by the init latent itself, so the kept area ends as the init latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InputError
from .model_sampling import FlowMatching


def prepare_mask(mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """mask [B or 1, 1, H, W] (or [H, W], [B, H, W]) in [0, 1] -> [B, C, h, w] for a latent of `shape`
    (ComfyUI's prepare_mask: bilinear resize, repeat over channels and to the batch size)."""
    m = mask.float()
    m = m.reshape(-1, 1, m.shape[-2], m.shape[-1])  # [b, 1, H, W]
    B, C, h, w = shape
    m = F.interpolate(m, size=(h, w), mode="bilinear")  # [b, 1, h, w]
    m = m.expand(-1, C, -1, -1)
    if B % m.shape[0]:
        raise InputError(f"{m.shape[0]} masks for a batch of {B} latents: give one mask or one per latent")
    return m.repeat(B // m.shape[0], 1, 1, 1)  # [B, C, h, w]


class MaskedDenoiser:
    """A denoiser (x, sigma, **extra) -> clean-latent prediction that repaints only where mask is 1.

    mask [B, C, h, w] (prepare_mask), latent: the init latent in MODEL space [B, C, h, w], noise: the
    initial noise [B, C, h, w], all on x's device."""

    def __init__(self, inner, mask: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor,
                 model_sampling: FlowMatching):
        self.inner = inner
        self.mask = mask
        self.keep = 1.0 - mask
        self.latent = latent
        self.noise = noise
        self.ms = model_sampling

    def __getattr__(self, name: str):  # the inner denoiser's attributes (cfg, calls...) stay visible
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        if x.shape != self.mask.shape:  # a sampler that resizes the latent (lcm_upscale): ComfyUI fails here too
            raise InputError(f"the latent's noise mask is for a latent of {tuple(self.mask.shape)}, but the sampler "
                             f"resized the latent to {tuple(x.shape)}: inpainting needs a sampler that keeps its "
                             "size (SamplerLCMUpscale with scale_ratio 1 does)")
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # [B, 1, 1, 1]
        known = self.ms.noise_scaling(s, self.noise, self.latent)  # init latent at this sigma
        x = x * self.mask + known * self.keep
        out = self.inner(x, sigma, **extra)
        return out * self.mask + self.latent * self.keep
