"""One sampling run exactly as ComfyUI's KSampler / KSamplerAdvanced does it for a flow model.

Shared by the pipeline (`SD35Pipeline.__call__`) and the workflow nodes (KSampler), so
`sd35fp8 generate` and a ComfyUI workflow with the same parameters give the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InputError
from .guidance import CFGDenoiser, Conditioning, ModelFn, SLGConfig
from .inpaint import MaskedDenoiser, prepare_mask
from .model_sampling import FlowMatching
from .noise import prepare_noise
from .samplers import sample
from .schedulers import get_sigmas


def ksample(model: ModelFn, cond: Conditioning, uncond: Conditioning | None, latent: torch.Tensor, *,
            seed: int, steps: int, cfg: float, sampler: str, scheduler: str, shift: float = 3.0,
            denoise: float = 1.0, slg: SLGConfig | None = None, dtype: torch.dtype | None = None,
            callback: Callable[[int, int, torch.Tensor], None] | None = None, disable: bool = True,
            start_step: int | None = None, last_step: int | None = None, force_full_denoise: bool = False,
            add_noise: bool = True, noise: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """latent [B, 16, h, w] raw (VAE space) on the device -> sampled latent, raw, float32.

    As ComfyUI: noise is one CPU draw for the whole batch from `seed`; an all-zero latent is not
    shifted into model space (comfy CFGGuider), others are; x = sigma0*noise + (1-sigma0)*latent;
    the result goes back through inverse_noise_scaling and out of model space.
    `callback(step, total, denoised)` after every step. Returns `latent` unchanged when nothing
    is left to sample (denoise 0, start_step past the end), as ComfyUI does.
    `noise` (CPU or device, shaped like `latent`) replaces the draw from `seed` (and add_noise):
    cross-prompt batching concatenates each prompt's own prepare_noise(seed_i) draw.
    `mask` [1 or B, 1, H, W] in [0, 1] (1 = repaint): inpainting as SetLatentNoiseMask (sampling/inpaint.py).
    """
    from ..models.vae import to_model_space, to_vae_space

    if denoise <= 0.0:
        return latent
    ms = FlowMatching(shift)
    sigmas = get_sigmas(scheduler, steps, shift=shift, denoise=denoise, sampler=sampler, model_sampling=ms)
    if last_step is not None and last_step < len(sigmas) - 1:
        sigmas = sigmas[: last_step + 1].clone()
        if force_full_denoise:
            sigmas[-1] = 0
    if start_step is not None:
        if start_step >= len(sigmas) - 1:
            return latent
        sigmas = sigmas[start_step:]
    device = latent.device
    sigmas = sigmas.to(device)
    if noise is None:
        noise = prepare_noise(seed, tuple(latent.shape)) if add_noise else torch.zeros(latent.shape)
    elif tuple(noise.shape) != tuple(latent.shape):
        raise InputError(f"ksample: noise shape {tuple(noise.shape)} does not match latent {tuple(latent.shape)}")
    x0 = latent.float()
    if torch.count_nonzero(x0) > 0:  # ComfyUI: "Don't shift the empty latent image"
        x0 = to_model_space(x0)
    x = ms.noise_scaling(sigmas[0], noise.to(device), x0)
    denoiser = CFGDenoiser(model, cond, uncond, cfg=cfg, slg=slg, steps=len(sigmas) - 1, model_sampling=ms,
                           dtype=dtype)
    if mask is not None:
        denoiser = MaskedDenoiser(denoiser, prepare_mask(mask, tuple(x.shape)).to(device), x0, noise.to(device), ms)
    total = len(sigmas) - 1

    def on_step(info: dict) -> None:
        if callback is not None:
            callback(int(info["i"]) + 1, total, info["denoised"])

    out = sample(sampler, denoiser, x, sigmas, extra_args={"seed": seed}, callback=on_step, disable=disable)
    out = ms.inverse_noise_scaling(sigmas[-1], out)  # identity when the last sigma is 0
    return to_vae_space(out)
