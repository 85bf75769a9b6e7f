"""The one generation core: encode -> noise -> sample -> decode, as ComfyUI computes it.

Every road to an image goes through here: `SD35Pipeline.__call__` (the Python API and
`sd35fp8 generate`) calls `generate`; the workflow's KSampler / KSamplerAdvanced nodes
(`sd35fp8 run`, the server) call `sample`; the server's cross-prompt batching calls
`sample_rows`; the tiny-model tools call the pipeline or `generate`. So a change to the sequence
lands on every road at once, and the same parameters and seed give the same pixels on each.

    encode(encoder, prompts, negatives, ...) -> [CondGroup]   prompts -> (cond, uncond) per pass
    sample(model, cond, uncond, latent, settings, seed=...)   one KSampler run (latent raw in/out)
    sample_rows(model, [Rows], settings, ...)                 several prompts' rows in one batch,
                                                              each with the noise it draws alone
    decode(vae, z, tiled)                                     raw latent -> image in [-1, 1]
    generate(components, request) -> Generated                the four chained (the pipeline's door)

Numerics (ComfyUI's KSampler for a flow model): initial noise is one CPU draw from the seed
(`sampling.prepare_noise`), so a seed gives the same image on every device; an all-zero latent is
not shifted into model space, others are; x = sigma0*noise + (1-sigma0)*latent; CFG runs cond and
uncond as one MMDiT batch (cfg 1 skips the uncond pass); skip-layer guidance as configured by
`SLGConfig`; the result goes back through inverse_noise_scaling and out of model space.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ContextManager

import logging

import torch

from .errors import InputError
from .models.vae import to_model_space, to_vae_space
from .sampling import CFGDenoiser, Conditioning, DualCFGDenoiser, FlowMatching, SLGConfig, ModelFn, get_sigmas, prepare_noise
from .sampling import sample as run_sampler
from .sampling.inpaint import MaskedDenoiser, prepare_mask
from .step_cache import StepCache
from .text.encoders import ContextBatchError
from .work_budget import charge_sampling

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, int, torch.Tensor], None]  # (step, total, denoised x0 [B, 16, h, w])
Interrupt = Callable[[], None]  # checked before sampling and at every step; raises to stop


@dataclass(frozen=True)
class SampleSettings:
    """What one sampling run needs besides the model, conditioning, latent and seed
    (ComfyUI's KSampler / KSamplerAdvanced inputs)."""

    steps: int
    cfg: float
    sampler: str
    scheduler: str
    shift: float = 3.0
    denoise: float = 1.0
    slg: SLGConfig | None = None
    start_step: int | None = None  # KSamplerAdvanced
    last_step: int | None = None
    force_full_denoise: bool = False
    cache_threshold: float = 0.0  # step caching (step_cache.py): 0 = every step runs the MMDiT
    # a schedule given whole (steps + 1 sigmas, the last one 0) instead of `scheduler`'s (diffusers' sigmas=)
    sigmas: tuple[float, ...] | None = None
    # the sampler's own arguments, as ComfyUI's SamplerEulerAncestral / SamplerDPMPP_2M_SDE / ... nodes set
    # them (eta, s_noise, solver_type, r, order): (name, value) pairs
    sampler_options: tuple[tuple[str, Any], ...] = ()
    # the MODEL's post-CFG functions in patch order: ("slg",), ("cfg_zero_star",), ("cfg_norm", strength)
    # (sampling.guidance CFGDenoiser._finish); empty: skip-layer guidance alone, when `slg` is set
    post_cfg: tuple[tuple, ...] = ()
    # DualCFGGuider: (cfg_cond2_negative, nested) with `cfg` as its cfg_conds; sample() then takes `middle`
    dual_cfg: tuple[float, bool] | None = None
    # the MODEL's EasyCache / LazyCache node (sampling.easycache.ComfyCache); it replaces cache_threshold's cache
    comfy_cache: Any = None

    @property
    def use_cfg(self) -> bool:
        """False for cfg 1: the uncond pass is skipped (ComfyUI's cfg1 optimisation)."""
        return abs(self.cfg - 1.0) > 1e-9


# ---------------------------------------------------------------- encode
@dataclass(frozen=True)
class CondGroup:
    """Prompts [start, end) of a request, encoded in one batch: cond [end-start or 1, ...], uncond
    (None when cfg is 1)."""

    start: int
    end: int
    cond: Conditioning
    uncond: Conditioning | None


def _resident(module: torch.nn.Module) -> ContextManager:
    return nullcontext(module)


def encode_groups(encoder, groups: Sequence[Sequence[str]], device: torch.device, dtype: torch.dtype,
                  on_device: Callable[[torch.nn.Module], ContextManager] = _resident) -> list[Conditioning]:
    """Several prompt lists encoded in ONE batch through each text encoder
    (SD3TextEncoder.encode_prompt_groups) -> one Conditioning per list, on `device` in `dtype`."""
    with on_device(encoder) as enc:
        pairs = enc.encode_prompt_groups(*(list(g) for g in groups))
    return [Conditioning(c.to(device, dtype), p.to(device, dtype)) for c, p in pairs]


def encode(encoder, prompts: Sequence[str], negatives: Sequence[str] | str, *, use_cfg: bool,
           device: torch.device, dtype: torch.dtype, batched: bool = False,
           on_device: Callable[[torch.nn.Module], ContextManager] = _resident) -> list[CondGroup]:
    """prompts and their negatives -> the passes to sample them in.

    negatives: one per prompt, or one string shared by every prompt (encoded once, batch 1).
    One group for the whole request, as ComfyUI batches conds whose contexts it can concatenate;
    prompts whose contexts cannot be batched (a long prompt among short ones: ContextBatchError)
    give one group per prompt. batched: prompts and negatives share one encoder batch (faster; the
    batch size changes the encoders' rounding, so it is off where pixels must equal a workflow's).
    """
    def one(ps: Sequence[str], ns: Sequence[str] | None) -> tuple[Conditioning, Conditioning | None]:
        if ns is None:
            return encode_groups(encoder, [ps], device, dtype, on_device)[0], None
        if batched:
            cond, uncond = encode_groups(encoder, [ps, ns], device, dtype, on_device)
            return cond, uncond
        return (encode_groups(encoder, [ps], device, dtype, on_device)[0],
                encode_groups(encoder, [ns], device, dtype, on_device)[0])

    shared = isinstance(negatives, str)
    if not shared and len(negatives) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    shared_uncond = one([negatives], None)[0] if shared and use_cfg else None

    def negs(i: int, j: int) -> Sequence[str] | None:
        return None if shared or not use_cfg else negatives[i:j]

    def group(i: int, j: int) -> CondGroup:
        cond, uncond = one(prompts[i:j], negs(i, j))
        return CondGroup(i, j, cond, shared_uncond if shared else uncond)

    try:
        return [group(0, len(prompts))]
    except ContextBatchError:  # a pass per prompt, as ComfyUI
        return [group(i, i + 1) for i in range(len(prompts))]


# ---------------------------------------------------------------- noise and sampling
def row_noise(seeds: Sequence[int], latents: Sequence[torch.Tensor],
              add_noise: Sequence[bool] | None = None) -> torch.Tensor:
    """Initial noise for a cross-prompt batch: each prompt's rows get `prepare_noise(seed_i, shape_i)`,
    the draw it makes alone (zeros where add_noise is False) -> [sum b_i, C, h, w] on the CPU."""
    add_noise = [True] * len(seeds) if add_noise is None else add_noise
    return torch.cat([prepare_noise(s, tuple(z.shape)) if add else torch.zeros(z.shape)
                      for s, z, add in zip(seeds, latents, add_noise)])


def sample(model: ModelFn, cond: Conditioning, uncond: Conditioning | None, latent: torch.Tensor,
           settings: SampleSettings, *, seed: int, noise: torch.Tensor | None = None, add_noise: bool = True,
           dtype: torch.dtype | None = None, callback: StepCallback | None = None,
           interrupt: Interrupt | None = None, progress: bool = False,
           mask: torch.Tensor | None = None, cache_stats: dict | None = None,
           middle: Conditioning | None = None) -> torch.Tensor:
    """One KSampler run: latent [B, 16, h, w] raw (VAE space) on the device -> sampled latent, raw, float32.

    `noise` (CPU or device, shaped like `latent`) replaces the draw from `seed` (and add_noise):
    cross-prompt batching concatenates each prompt's own draw (`row_noise`). The per-step noise of
    ancestral/SDE samplers is drawn from `seed`. Returns `latent` itself when nothing is left to
    sample (denoise 0, start_step past the end), as ComfyUI does. `interrupt()` runs before
    sampling and before every step's `callback(step, total, denoised)`; progress: a tqdm bar.
    mask [1 or B, 1, H, W] in [0, 1] (1 = repaint): inpainting as ComfyUI's SetLatentNoiseMask
    (`sampling.inpaint.MaskedDenoiser`: the kept area follows the init latent at every sigma).
    settings.cache_threshold > 0: the model runs behind a `step_cache.StepCache` (skips evaluations
    whose first-block input barely moved); its counts are added to `cache_stats` ("calls", "full",
    "skipped") when given.
    """
    if interrupt is not None:
        interrupt()
    s = settings
    if s.denoise <= 0.0:
        return latent
    ms = FlowMatching(s.shift)
    if s.sigmas is not None:
        sigmas = torch.tensor(s.sigmas, dtype=torch.float32)
    else:
        sigmas = get_sigmas(s.scheduler, s.steps, shift=s.shift, denoise=s.denoise, sampler=s.sampler,
                            model_sampling=ms)
    if s.last_step is not None and s.last_step < len(sigmas) - 1:
        sigmas = sigmas[: s.last_step + 1].clone()
        if s.force_full_denoise:
            sigmas[-1] = 0
    if s.start_step is not None:
        if s.start_step >= len(sigmas) - 1:
            return latent
        sigmas = sigmas[s.start_step:]
    device = latent.device
    sigmas = sigmas.to(device)
    if noise is None:
        noise = prepare_noise(seed, tuple(latent.shape)) if add_noise else torch.zeros(latent.shape)
    elif tuple(noise.shape) != tuple(latent.shape):
        raise InputError(f"sample: noise shape {tuple(noise.shape)} does not match latent {tuple(latent.shape)}")
    growth = dict(s.sampler_options).get("total_upscale", 1.0) if s.sampler == "lcm_upscale" else 1.0
    charge_sampling(tuple(latent.shape), len(sigmas) - 1, growth, f"sampler {s.sampler}")  # the server's budget
    x0 = latent.float()
    if torch.count_nonzero(x0) > 0:  # ComfyUI: "Don't shift the empty latent image"
        x0 = to_model_space(x0)
    x = ms.noise_scaling(sigmas[0], noise.to(device), x0)  # [B, 16, h, w]
    total = len(sigmas) - 1
    if s.dual_cfg is not None:  # DualCFGGuider: positive, middle, negative
        if middle is None or uncond is None:
            raise InputError("dual CFG needs the middle (cond2) and negative conditionings")
        denoiser = DualCFGDenoiser(model, cond, middle, uncond, s.cfg, s.dual_cfg[0], s.dual_cfg[1], slg=s.slg,
                                   steps=total, model_sampling=ms, dtype=dtype, post_cfg=s.post_cfg)
    else:
        denoiser = CFGDenoiser(model, cond, uncond, cfg=s.cfg, slg=s.slg, steps=total, post_cfg=s.post_cfg,
                               model_sampling=ms, dtype=dtype)
    cache = None
    comfy_stats: dict[str, int] = {}
    if s.comfy_cache is not None:  # the MODEL's EasyCache / LazyCache node (sampling/easycache.py)
        if s.cache_threshold > 0:
            logger.info("%s on the MODEL: the server's step cache is off for this run", s.comfy_cache.kind)
        denoiser = s.comfy_cache.wrap(denoiser, ms, comfy_stats)
    elif s.cache_threshold > 0 and denoiser.regional:  # calls on crops and sides of equal shapes would share one
        logger.info("step cache off for this run: area / mask conditioning or dual CFG")  # stream: no skipping
    elif s.cache_threshold > 0:
        cache = denoiser.model = StepCache(model, s.cache_threshold, sigmas)
    if mask is not None:
        denoiser = MaskedDenoiser(denoiser, prepare_mask(mask, tuple(x.shape)).to(device), x0, noise.to(device), ms)

    def on_step(info: dict) -> None:
        if interrupt is not None:
            interrupt()
        if callback is not None:
            # dpm_adaptive reports each attempted step: its count may pass the schedule's, never the progress
            callback(min(int(info["i"]) + 1, total), total, info["denoised"])

    out = run_sampler(s.sampler, denoiser, x, sigmas, extra_args={"seed": seed}, callback=on_step,
                      disable=not progress, **dict(s.sampler_options))
    if comfy_stats:  # ComfyUI's closing line
        skipped = comfy_stats.get("skipped", 0)
        logger.info("%s - skipped %d/%d steps (%.2fx speedup).", s.comfy_cache.kind, skipped, total,
                    total / (total - skipped) if total > skipped else 1.0)
    stats = cache.stats if cache is not None else comfy_stats
    if cache is not None:
        logger.info("%s", cache.describe())
    if cache_stats is not None:
        for k, n in stats.items():
            cache_stats[k] = cache_stats.get(k, 0) + n
    out = ms.inverse_noise_scaling(sigmas[-1], out)  # identity when the last sigma is 0
    return to_vae_space(out)


@dataclass(frozen=True)
class Rows:
    """One prompt's part of a cross-prompt batch: its latent rows [b, 16, h, w] (raw), its seed and
    conditioning (batch 1 or b; every Rows of a batch has contexts of one shape)."""

    latent: torch.Tensor
    seed: int
    cond: Conditioning
    uncond: Conditioning | None
    add_noise: bool = True


def sample_rows(model: ModelFn, rows: Sequence[Rows], settings: SampleSettings, *, device: torch.device,
                dtype: torch.dtype | None = None, callback: StepCallback | None = None,
                interrupt: Interrupt | None = None, progress: bool = False,
                cache_stats: dict | None = None) -> list[torch.Tensor]:
    """Several prompts in ONE sampling call -> each prompt's sampled latent (float32, on the CPU).

    Every row gets the initial noise its prompt draws alone (`row_noise`), so with a deterministic
    sampler a row's result is its lone result up to the batch size's effect on kernel rounding.
    Ancestral/SDE samplers draw their per-step noise from rows[0].seed for the whole batch: they
    cannot reproduce several seeds at once (the server never batches them). When nothing is left to
    sample each prompt gets its latent back unchanged.
    """
    latents = [r.latent.to(torch.float32) for r in rows]  # [b_i, 16, h, w]
    sizes = [int(z.shape[0]) for z in latents]
    noise = row_noise([r.seed for r in rows], latents, [r.add_noise for r in rows])  # [B, 16, h, w] CPU

    def cat(get: Callable[[Rows], torch.Tensor]) -> torch.Tensor:
        return torch.cat([get(r).expand(b, *get(r).shape[1:]) for r, b in zip(rows, sizes)]).to(device)  # [B, ...]

    cond = Conditioning(cat(lambda r: r.cond.context), cat(lambda r: r.cond.pooled))
    uncond = None
    if settings.use_cfg:
        if any(r.uncond is None for r in rows):
            raise InputError(f"cfg {settings.cfg} needs a negative conditioning for every prompt of the batch")
        uncond = Conditioning(cat(lambda r: r.uncond.context), cat(lambda r: r.uncond.pooled))
    samples = torch.cat(latents).to(device)  # [B, 16, h, w] raw
    out = sample(model, cond, uncond, samples, settings, seed=rows[0].seed, noise=noise, dtype=dtype,
                 callback=callback, interrupt=interrupt, progress=progress, cache_stats=cache_stats)
    if out is samples:
        return [r.latent for r in rows]
    return list(out.float().cpu().split(sizes))


# ---------------------------------------------------------------- decode
def decode(vae, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Raw latent [B, 16, h, w] -> image [B, 3, 8h, 8w] in [-1, 1] (not clamped), in the VAE's dtype.

    tiled: `SD3VAE.decode_tiled` (bounded memory; close to, not equal to, the full decode)."""
    return vae.decode_tiled(z) if tiled else vae.decode(z)


def vae_encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Image [B, 3, H, W] in [-1, 1] -> raw latent [B, 16, H/8, W/8], float32, on the VAE's device."""
    p = next(vae.parameters())
    return vae.encode(pixels.to(p.device, p.dtype)).float()


# ---------------------------------------------------------------- the whole sequence
def _no_stage(name: str) -> ContextManager:
    return nullcontext()


@dataclass
class Components:
    """What `generate` runs on. The hooks let a caller keep models off the device between stages
    (offload), time each stage, and decide when the VAE decode goes tiled."""

    mmdit: Any  # velocity model with MMDiT's forward contract (ModelFn), `.config.in_channels`
    vae: Any  # SD3VAE: encode / decode / decode_tiled
    text_encoder: Any  # SD3TextEncoder with a tokenizer
    device: torch.device
    dtype: torch.dtype
    on_device: Callable[[torch.nn.Module], ContextManager] = _resident  # yields the module on the device
    stage: Callable[[str], ContextManager] = _no_stage  # "encode", "vae_encode", "sampling", "vae_decode"
    tiled_decode: Callable[[int, int, int], bool] = lambda width, height, batch: False
    batch_encode: bool = False  # prompts and negatives in one encoder batch (see `encode`)
    decode_slices: bool = False  # the VAE decodes one image at a time (diffusers' enable_vae_slicing)


@dataclass(frozen=True)
class GenerationRequest:
    """One call's prompts and parameters, already checked (the pipeline fills in the model's defaults).

    init_pixels: img2img source [1 or P, 3, H, W] in [-1, 1] (one image for every prompt, or one per
    prompt) with settings.denoise < 1; it must be width x height. conditioning: (cond [P, L, C], uncond
    [P or 1, L', C] or None) given instead of encoding the texts (diffusers' prompt_embeds; `prompts` then
    only count and label the rows). noise: the batch's initial noise [P x images_per_prompt, C, h, w] (model
    space, diffusers' latents) instead of the draw from `seed`."""

    prompts: Sequence[str]
    negatives: Sequence[str] | str
    settings: SampleSettings
    width: int
    height: int
    seed: int = 0
    images_per_prompt: int = 1
    init_pixels: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # inpainting: [1 or B, 1, H, W] in [0, 1], 1 = repaint (needs init_pixels)
    callback: StepCallback | None = None
    interrupt: Interrupt | None = None
    progress: bool = False
    conditioning: tuple[Conditioning, Conditioning | None] | None = None
    noise: torch.Tensor | None = None


@dataclass
class Generated:
    latents: torch.Tensor  # [B, 16, h, w] raw, float32, on the device; B = prompts x images_per_prompt
    pixels: torch.Tensor  # [B, 3, H, W] in [-1, 1] (unclamped) from the VAE
    cache_stats: dict = field(default_factory=dict)  # step cache counts (empty: cache off)


@contextmanager
def _stage(c: Components, name: str) -> Iterator[None]:
    with c.stage(name):
        yield


@torch.inference_mode()
def generate(c: Components, r: GenerationRequest) -> Generated:
    """prompts -> images: encode, the batch's initial latent (zeros or the init image's), sample, decode.

    Seeds: the initial noise of the whole batch is one CPU draw from `r.seed`, as ComfyUI does.
    Groups that cannot share a batch (see `encode`) run one pass each on their rows of that draw;
    the per-step noise of ancestral/SDE samplers is then drawn per pass.
    """
    s, n, p = r.settings, r.images_per_prompt, len(r.prompts)
    if r.conditioning is not None:  # given embeddings: one group, as the texts' encoding would give
        def placed(e: Conditioning | None) -> Conditioning | None:
            return None if e is None else Conditioning(e.context.to(c.device, c.dtype), e.pooled.to(c.device, c.dtype))

        cond, uncond = (placed(e) for e in r.conditioning)
        groups = [CondGroup(0, p, cond, uncond if s.use_cfg else None)]
    else:
        with _stage(c, "encode"):
            groups = encode(c.text_encoder, r.prompts, r.negatives, use_cfg=s.use_cfg, device=c.device,
                            dtype=c.dtype, batched=c.batch_encode, on_device=c.on_device)

    def repeat(cond: Conditioning | None, prompts: int) -> Conditioning | None:
        """A group's conditioning, one row per prompt -> one row per image (a shared batch-1 negative
        of a group of several prompts broadcasts in the denoiser instead)."""
        if cond is None or cond.context.shape[0] != prompts:
            return cond
        return Conditioning(cond.context.repeat_interleave(n, 0), cond.pooled.repeat_interleave(n, 0))

    batch = p * n
    shape = (batch, c.mmdit.config.in_channels, r.height // 8, r.width // 8)
    latent = torch.zeros(shape, dtype=torch.float32, device=c.device)  # raw VAE space, as ComfyUI
    if r.init_pixels is not None:
        with _stage(c, "vae_encode"), c.on_device(c.vae) as vae:
            encoded = vae_encode(vae, r.init_pixels)  # [1 or P, C, h, w]
            latent = (encoded.repeat(batch, 1, 1, 1) if encoded.shape[0] == 1
                      else encoded.repeat_interleave(n, 0))  # image i goes with prompt i's images
    if r.noise is not None and tuple(r.noise.shape) != shape:
        raise InputError(f"initial noise (latents) is {list(r.noise.shape)}, the batch's latent is {list(shape)}")
    noise = r.noise if r.noise is not None else (
        None if len(groups) == 1 else prepare_noise(r.seed, shape))  # separate passes take their rows
    parts = []
    cache_stats: dict = {}
    with _stage(c, "sampling"), c.on_device(c.mmdit) as mmdit:
        for g in groups:
            rows = slice(g.start * n, g.end * n)
            k = g.end - g.start
            parts.append(sample(mmdit, repeat(g.cond, k), repeat(g.uncond, k), latent[rows], s, seed=r.seed,
                                noise=None if noise is None else noise[rows], dtype=c.dtype, callback=r.callback,
                                mask=None if r.mask is None else r.mask if r.mask.shape[0] == 1 else r.mask[rows],
                                interrupt=r.interrupt, progress=r.progress, cache_stats=cache_stats))
    z = torch.cat(parts) if len(parts) > 1 else parts[0]
    with _stage(c, "vae_decode"), c.on_device(c.vae) as vae:
        tiled = c.tiled_decode(r.width, r.height, 1 if c.decode_slices else batch)
        pixels = torch.cat([decode(vae, one, tiled) for one in z.split(1)]) if c.decode_slices and len(z) > 1 \
            else decode(vae, z, tiled)
    return Generated(latents=z, pixels=pixels, cache_stats=cache_stats)
