"""Random numbers exactly as ComfyUI draws them, always on the CPU.

- Initial noise (comfy/sample.py prepare_noise): seed a CPU generator, one randn for the whole
  batch. The same seed gives the same image on every device.
- Per-step noise of ancestral samplers (k_diffusion default_noise_sampler, ComfyUI 02159d81):
  a generator seeded with `seed + 1` when x lives on the CPU. ComfyUI on CUDA seeds a CUDA
  generator with `seed` instead; we always draw on the CPU with `seed + 1` and move the result
  to x's device, so our results equal ComfyUI-on-CPU on any device, not ComfyUI-on-CUDA.
- torch.randn_like in a sampler (SamplerLCMUpscale's sample_lcm_upscale) draws from ComfyUI's global
  generator, which prepare_noise seeded and advanced: `global_generator` is a private generator in that state
  (ComfyUI-on-CPU's numbers; ComfyUI on CUDA draws from the CUDA generator, seeded with `seed` alone).
- SDE samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde): torchsde Brownian tree on the CPU,
  seeded by `seed` (ComfyUI BrownianTreeNoiseSampler with cpu=True).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import warnings

import numpy as np
import torch

from ..errors import InputError
from .model_sampling import flow_noise_scaling

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def prepare_noise(
    seed: int,
    shape: Sequence[int],
    batch_index: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial noise [B, C, H, W] on the CPU, equal to ComfyUI's prepare_noise.

    Uses a private generator: same numbers as torch.manual_seed(seed); torch.randn(shape)
    without touching the global RNG. With `batch_index` (ComfyUI's latent "batch_index"),
    noise is drawn one sample at a time up to max(index) and picked by index.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return _initial_draw(generator, shape, batch_index, dtype)


def _initial_draw(generator: torch.Generator, shape: Sequence[int], batch_index: Sequence[int] | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """prepare_noise's draw from `generator` (seeded): the whole batch at once, or one sample at a time up to
    max(batch_index) and picked by index."""
    shape = tuple(int(s) for s in shape)
    if batch_index is None:
        return torch.randn(shape, dtype=dtype, generator=generator, device="cpu")
    if len(batch_index) != shape[0]:
        raise InputError(f"batch_index has {len(batch_index)} entries for a batch of {shape[0]}")
    unique, inverse = np.unique(np.asarray(batch_index), return_inverse=True)
    kept = []
    for i in range(int(unique[-1]) + 1):
        one = torch.randn((1,) + shape[1:], dtype=dtype, generator=generator, device="cpu")  # [1, C, H, W]
        if i in unique:
            kept.append(one)
    return torch.cat([kept[int(j)] for j in inverse.reshape(-1)], dim=0)


def global_generator(seed: int, shape: Sequence[int] | None = None,
                     batch_index: Sequence[int] | None = None) -> torch.Generator:
    """A private CPU generator in the state ComfyUI's global one is in when its sampler starts: prepare_noise seeds
    the global generator (torch.manual_seed(seed)) and draws the initial noise of `shape` from it (with
    `batch_index` as it does); shape None: no draw (DisableNoise's zeros, which leave it unseeded in ComfyUI).
    For the samplers that call torch.randn_like (SamplerLCMUpscale's sample_lcm_upscale): their noise on ComfyUI's
    CPU. On CUDA ComfyUI draws it from the CUDA generator, which torch.manual_seed seeds too; not reproduced here
    (see the module doc)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    if shape is not None:
        _initial_draw(generator, shape, batch_index, torch.float32)
    return generator


def noise_scaling(sigma, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Flow-matching start point: sigma*noise + (1-sigma)*latent (ComfyUI CONST)."""
    return flow_noise_scaling(sigma, noise, latent)


def default_noise_sampler(x: torch.Tensor, seed: int | None = None) -> NoiseSampler:
    """Fresh N(0,1) like x for each call, from a CPU generator seeded with seed+1 (see module doc).

    seed None draws from the global CPU generator, as ComfyUI does.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed((int(seed) + 1) % 2**64)  # 2**64-1 wraps to 0

    def sample(sigma, sigma_next) -> torch.Tensor:
        noise = torch.randn(x.shape, dtype=x.dtype, generator=generator, device="cpu")
        return noise.to(x.device)

    return sample


class BrownianTreeNoiseSampler:
    """Brownian-tree noise (torchsde) on the CPU: noise(s, t) = W(t) - W(s) / sqrt(|t - s|).

    Same construction as ComfyUI's BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed,
    cpu=True); a list of seeds gives one tree per batch item.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed: int | Sequence[int] | None = None):
        try:
            import torchsde
        except ImportError as e:
            raise InputError(
                "the SDE samplers (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde) need the torchsde package "
                "(pip install torchsde)"
            ) from e
        t0 = torch.as_tensor(sigma_min).detach().cpu()
        t1 = torch.as_tensor(sigma_max).detach().cpu()
        t0, t1, self.sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        w0 = torch.zeros_like(x).detach().cpu()  # [B, C, H, W]
        self.batched = False
        if seed is None:
            seeds: tuple[int, ...] = (int(torch.randint(0, 2**63 - 1, ()).item()),)
        elif isinstance(seed, (tuple, list)):
            if len(seed) != x.shape[0]:
                raise InputError(f"{len(seed)} seeds given for a batch of {x.shape[0]}")
            self.batched = True
            seeds = tuple(int(s) for s in seed)
            w0 = w0[0]
        else:
            seeds = (int(seed),)
        self.trees = tuple(torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        device, dtype = t0.device, t0.dtype
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        lo, hi = lo.detach().cpu().float(), hi.detach().cpu().float()
        with warnings.catch_warnings():
            # float32 interval ends fall a hair outside the tree's stored ends; harmless (ComfyUI too)
            warnings.filterwarnings("ignore", message="Should have t[ab]", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]).to(device=device, dtype=dtype)
        w = w * (self.sign * sign)
        w = w if self.batched else w[0]
        return w / (t1 - t0).abs().sqrt()
