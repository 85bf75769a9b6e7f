"""The engine calls behind the workflow nodes: load, encode, sample, decode, save.

Every function here is the body of one node (or a piece of it), written against the package
contracts (docs/ARCHITECTURE.md); the heavy modules are imported lazily so that validation and
object_info never import the models. Sampling and the VAE run through the generation core
(`sd35fp8.generation`), the same code as `SD35Pipeline` and `sd35fp8 generate`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sd35fp8.errors import InputError, OutputError

log = logging.getLogger(__name__)

SD3_LATENT_CHANNELS = 16
DEFAULT_SHIFT = 3.0  # ComfyUI's SD3 model config: ModelSamplingDiscreteFlow shift 3.0, multiplier 1000


def unsupported(message: str) -> InputError:
    return InputError(message)


# ---- values passed between nodes ------------------------------------------------------------
@dataclass(frozen=True)
class SD3Model:
    """MODEL: the MMDiT plus its sampling patches (ModelSamplingSD3 shift, skip-layer guidance)."""

    mmdit: Any
    shift: float = DEFAULT_SHIFT
    name: str = ""
    loras: tuple[tuple[str, float], ...] = ()  # LoraLoader: (file, strength), applied while sampling
    # sampling patches in the order the workflow applied them (sampling.guidance POST_CFG: skip-layer guidance,
    # CFGZeroStar, CFGNorm, RescaleCFG, SkipLayerGuidanceDiTSimple)
    post_cfg: tuple[tuple, ...] = ()
    step_cache: Any = None  # EasyCache / LazyCache (sampling.easycache.ComfyCache): the last one patched

    def with_shift(self, shift: float) -> SD3Model:
        return replace(self, shift=float(shift))


@dataclass(frozen=True)
class SD3Clip:
    """CLIP: the SD3 text encoders (clip_l, clip_g, t5xxl; t5 may be absent). With `offload` (an
    offload.ModelOffload, executor offload model/sequential) they visit the device only to encode."""

    encoder: Any
    name: str = ""
    loras: tuple[tuple[str, float], ...] = ()  # LoraLoader: (file, strength), applied while encoding
    offload: Any = None
    layer_idx: int | None = None  # CLIPSetLastLayer's stop_at_clip_layer (-1 .. -24); None: SD3's defaults

    def on_device(self):
        return self.offload.on_device(self.encoder) if self.offload is not None else nullcontext()

    def last_layer(self):
        """While encoding: the encoders' outputs taken at `layer_idx` (SD3TextEncoder.last_layer)."""
        return self.encoder.last_layer(self.layer_idx) if self.layer_idx is not None else nullcontext()


@dataclass(frozen=True)
class EngineOptions:
    """How loaders place and run models (PromptExecutor's compile/offload, sd35fp8.fast.build_engine)."""

    compile: bool = False
    offload: str = "none"
    offloader: Any = None  # offload.ModelOffload for text encoders and VAE when offload != "none"
    attention: str = "auto"  # fast.build_engine's attention: auto | fp8 | bf16
    cache_threshold: float = 0.0  # KSampler step caching (sd35fp8.step_cache; 0 = off)
    parallel: Any = None  # engine -> its ModelFn over several ranks (scale.gpus: --gpus-per-image); None: as built

    def side(self, device: Any) -> Any:
        """Where weights load: the device, or CPU memory when they are offloaded."""
        return device if self.offload == "none" else "cpu"

    def mmdit(self, mmdit: Any, device: Any) -> Any:
        from sd35fp8.fast import build_engine

        engine = build_engine(mmdit, device, compile=self.compile, offload=self.offload, attention=self.attention)
        return engine if self.parallel is None else self.parallel(engine)

    def text_encoders(self, models: Any, device: Any) -> Any:
        """Offload: T5's blocks stream next to the resident MMDiT (the rest moves in with the CLIPs)."""
        if self.offload != "none" and getattr(models, "t5xxl", None) is not None:
            from sd35fp8.offload import stream_t5_blocks

            stream_t5_blocks(models.t5xxl, device)
        return models

    def clip(self, encoder: Any, name: str) -> SD3Clip:
        if self.offloader is not None:
            self.offloader.register(encoder, name)
        return SD3Clip(encoder, name=name, offload=self.offloader)

    def vae(self, vae: Any) -> Any:
        if self.offloader is not None:
            self.offloader.register(vae, "vae")
        elif self.compile and self.offload == "none":  # resident on the compiled road: the decoder too
            vae.compile_decoder()
        return vae


def _vae_device(vae: Any, offload: Any):
    return offload.on_device(vae) if offload is not None and offload.manages(vae) else nullcontext(vae)


def sampler_names() -> list[str]:
    from sd35fp8.sampling.samplers import SAMPLERS

    return list(SAMPLERS)


def scheduler_names() -> list[str]:
    from sd35fp8.sampling.schedulers import SCHEDULERS

    return list(SCHEDULERS)


# ---- loaders --------------------------------------------------------------------------------
def load_checkpoint(path: Path, device: Any, dtype: Any, options: EngineOptions = EngineOptions(),
                    text_encoders: bool = True) -> tuple[SD3Model, SD3Clip | None, Any]:
    """CheckpointLoaderSimple: MMDiT (as its engine, sd35fp8.fast.build_engine) + VAE, and the text
    encoders when the file holds them. The file's precision decides the FP8 mode (an fp8 file runs
    FP8 matmuls where the device has them, fp8.device.choose_mode).

    A file without text encoders (the official sd3.5_large.safetensors) gives CLIP = None, as
    ComfyUI does; a node that then uses that CLIP fails with ComfyUI's message. text_encoders False: none loaded
    (DiffusersLoader's output_clip).
    """
    from sd35fp8.checkpoints.load import load_mmdit, load_text_encoders, load_vae
    from sd35fp8.checkpoints.sources import resolve

    comps = resolve(str(path))
    side = options.side(device)
    mmdit = options.mmdit(load_mmdit(comps, device=side, dtype=dtype), device)
    vae = options.vae(load_vae(comps, device=side, dtype=dtype))
    clip = None
    if text_encoders and (comps.clip_l is not None or comps.clip_g is not None):
        models = options.text_encoders(load_text_encoders(comps, device=side, dtype=dtype), device)
        clip = options.clip(_text_encoder(models, [path]), path.name)
    return SD3Model(mmdit, name=path.name), clip, vae


# ComfyUI UNETLoader weight_dtype -> the FP8 mode asked for (fp8.device.MODES; None: the file's precision).
# The device check (fp8.device.choose_mode) turns a matmul mode into weight_only, with a warning, where the
# GPU has no FP8 matmul. fp8_e5m2: E5M2 storage is not an inference format here; its weights are stored as
# E4M3 (more mantissa, same 8 bits), weight-only, as ComfyUI computes e5m2 weights in 16-bit.
UNET_WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": "weight_only", "fp8_e4m3fn_fast": "dynamic",
                      "fp8_e5m2": "weight_only"}


def load_diffusion_model(path: Path, device: Any, dtype: Any, weight_dtype: str,
                         options: EngineOptions = EngineOptions()) -> SD3Model:
    """UNETLoader: the MMDiT as its engine. 'default' keeps the file's precision (an fp8 file runs as
    FP8); the fp8 choices quantise the linear layers to E4M3 after loading (UNET_WEIGHT_DTYPES):
    fp8_e4m3fn = weight-only, fp8_e4m3fn_fast = FP8 matmuls where the device has them."""
    from sd35fp8.checkpoints.load import load_mmdit
    from sd35fp8.fp8.device import choose_mode

    if weight_dtype not in UNET_WEIGHT_DTYPES:
        raise unsupported(f"UNETLoader weight_dtype {weight_dtype!r} is not supported; use one of "
                          f"{', '.join(UNET_WEIGHT_DTYPES)}")
    mode = UNET_WEIGHT_DTYPES[weight_dtype]
    if mode is not None:
        mode, reason = choose_mode(mode, device)  # fp8_e4m3fn_fast without FP8 matmul: weight_only, warned
        log.info("UNETLoader %s: %s", weight_dtype, reason)
    mmdit = load_mmdit(str(path), device=options.side(device), dtype=dtype, fp8=mode)
    return SD3Model(options.mmdit(mmdit, device), name=path.name)


def load_vae_file(path: Path, device: Any, dtype: Any, options: EngineOptions = EngineOptions()) -> Any:
    from sd35fp8.checkpoints.load import load_vae

    return options.vae(load_vae(str(path), device=options.side(device), dtype=dtype))


def load_clip_files(paths: list[Path], device: Any, dtype: Any, options: EngineOptions | None = None) -> SD3Clip:
    """TripleCLIPLoader / CLIPLoader(sd3): each file is sorted into clip_l / clip_g / t5xxl by its
    weights (CLIP width 768 / 1280, or the narrower of two CLIPs is CLIP-L). Two CLIPs of the same
    non-standard width cannot be told apart by weights: they then follow the node's documented
    recipe order (sd3: clip-l, clip-g, t5), and the log says so."""
    from sd35fp8.checkpoints.load import load_text_encoders
    from sd35fp8.checkpoints.sources import Components, assign_clip_slots, clip_width, open_file

    slots: dict[str, Path] = {}
    clips: list[tuple[Path, Any]] = []
    for p in paths:
        found = open_file(Path(p))
        if not any(k in found for k in ("clip", "clip_l", "clip_g", "t5xxl")):
            raise InputError(f"text encoder file {p} holds no CLIP-L, CLIP-G or T5-XXL weights")
        for slot, src in found.items():
            if slot in ("clip", "clip_l", "clip_g"):
                clips.append((Path(p), src))
            elif slot == "t5xxl":
                if "t5xxl" in slots and slots["t5xxl"] != p:
                    raise InputError(f"two files give the t5xxl text encoder: {slots['t5xxl'].name} and {p.name}")
                slots["t5xxl"] = Path(p)
    if len(clips) == 2 and clip_width(clips[0][1]) == clip_width(clips[1][1]) and \
            {s.component for _, s in clips} == {"clip"}:
        log.info("CLIP files %s and %s have the same width %d: taken in recipe order as clip_l, clip_g",
                 clips[0][0].name, clips[1][0].name, clip_width(clips[0][1]))
        slots.update(clip_l=clips[0][0], clip_g=clips[1][0])
    else:
        by_source = {id(src): path for path, src in clips}
        for slot, src in assign_clip_slots([src for _, src in clips], ", ".join(p.name for p in paths)).items():
            slots[slot] = by_source[id(src)]
    names = ", ".join(p.name for p in paths)
    side = device if options is None else options.side(device)
    models = load_text_encoders(Components(root=names), device=side, dtype=dtype, clip_l=slots.get("clip_l"),
                                clip_g=slots.get("clip_g"), t5xxl=slots.get("t5xxl"))
    if options is None:
        return SD3Clip(_text_encoder(models, list(paths)), name=names)
    return options.clip(_text_encoder(options.text_encoders(models, device), list(paths)), names)


def _text_encoder(models: Any, near: list[Path]) -> Any:
    """SD3TextEncoder + SD3Tokenizer over loaded TextEncoderModels (T5 tokenizer found near the files)."""
    from sd35fp8.text.encoders import SD3TextEncoder
    from sd35fp8.text.t5_tokenizer import load_t5_tokenizer
    from sd35fp8.text.tokenizer import SD3Tokenizer

    t5_tok = None
    if models.t5xxl is not None:
        t5_tok = load_t5_tokenizer(models.tokenizers.get("t5xxl"), near=[str(p) for p in near])
    return SD3TextEncoder(models.clip_l, models.clip_g, models.t5xxl, tokenizer=SD3Tokenizer(t5=t5_tok))


# ---- conditioning ---------------------------------------------------------------------------
def _require_clip(clip: Any) -> SD3Clip:
    if clip is None:
        raise InputError(
            "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your checkpoint "
            "does not contain a valid clip or text encoder model.")
    return clip


def with_lora(model: SD3Model, clip: SD3Clip | None, path: Path, strength_model: float,
              strength_clip: float) -> tuple[SD3Model, SD3Clip | None]:
    """LoraLoader: the LoRA is checked against the models now and applied (unmerged, base weights
    untouched) only while this MODEL samples / this CLIP encodes (`lora_active`)."""
    from sd35fp8.lora import read_lora

    lora = read_lora(path)  # format errors surface at the node, not at sampling
    if strength_model != 0 and any(c == "mmdit" for c, _ in lora.terms):
        model = replace(model, loras=model.loras + ((str(path), float(strength_model)),))
    if clip is not None and strength_clip != 0 and any(c != "mmdit" for c, _ in lora.terms):
        clip = replace(clip, loras=clip.loras + ((str(path), float(strength_clip)),))
    return model, clip


def _components(obj: SD3Model | SD3Clip) -> dict[str, Any]:
    """The modules a MODEL / CLIP holds, by LoRA component name (a missing text encoder as None)."""
    if isinstance(obj, SD3Model):
        return {"mmdit": obj.mmdit}
    enc = obj.encoder
    return {"clip_l": enc.clip_l, "clip_g": enc.clip_g, "t5xxl": enc.t5}


def lora_active(obj: SD3Model | SD3Clip):
    """Context in which the MODEL's / CLIP's LoRAs are active on the shared modules (nothing else's)."""
    from sd35fp8.lora import shared_lora_set

    components = _components(obj)
    if not obj.loras:
        owner = next((m for m in components.values() if m is not None), None)
        if owner is None or getattr(owner, "sd35_lora_set", None) is None:
            return nullcontext()
    return shared_lora_set(components).using(obj.loras)


def encode_text(clip: Any, text: str) -> list:
    """CLIPTextEncode: the same text to clip_l, clip_g and t5xxl -> [[cond, {"pooled_output"}]]."""
    clip = _require_clip(clip)
    with clip.on_device(), lora_active(clip), clip.last_layer():
        context, pooled = clip.encoder.encode_prompts([text])  # [1, L, 4096], [1, 2048]
    return [[context, {"pooled_output": pooled}]]


def encode_text_sd3(clip: Any, clip_l: str, clip_g: str, t5xxl: str, empty_padding: str) -> list:
    """CLIPTextEncodeSD3 (ComfyUI nodes_sd3): separate texts; with empty_padding 'none' an empty
    text leaves its encoder out (zero pooled part / no T5 tokens); CLIP-L and CLIP-G chunk
    counts are evened out with empty-prompt chunks."""
    from sd35fp8.text.encoders import SD3TextEncoder

    clip = _require_clip(clip)
    enc = clip.encoder
    tok = enc.tokenizer
    no_padding = empty_padding == "none"
    tokens = dict(tok.tokenize(clip_g))
    use = {"l": enc.clip_l is not None, "g": enc.clip_g is not None, "t5": enc.t5 is not None}
    if len(clip_g) == 0 and no_padding:
        use["g"] = False
    if len(clip_l) == 0 and no_padding:
        use["l"] = False
    else:
        lt = tok.tokenize(clip_l)
        tokens["l"], tokens["l_weights"] = lt["l"], lt["l_weights"]
    if len(t5xxl) == 0 and no_padding:
        use["t5"] = False
    elif use["t5"]:
        tt = tok.tokenize(t5xxl)
        tokens["t5"], tokens["t5_weights"] = tt["t5"], tt["t5_weights"]
    if use["l"] and use["g"] and len(tokens["l"]) != len(tokens["g"]):
        empty = tok.tokenize("")
        for short, long_ in (("l", "g"), ("g", "l")):
            while len(tokens[short]) < len(tokens[long_]):
                tokens[short] = tokens[short] + empty[short]
                tokens[f"{short}_weights"] = tokens[f"{short}_weights"] + empty[f"{short}_weights"]
    if not all(use[k] == (m is not None) for k, m in (("l", enc.clip_l), ("g", enc.clip_g), ("t5", enc.t5))):
        # a view over the same modules without the left-out encoders
        enc = SD3TextEncoder(enc.clip_l if use["l"] else None, enc.clip_g if use["g"] else None,
                             enc.t5 if use["t5"] else None, context_dim=enc.context_dim, tokenizer=tok,
                             out_dtype=enc.out_dtype)
    with clip.on_device(), lora_active(clip), clip.last_layer():
        context, pooled = enc.encode(tokens)  # [1, L, 4096], [1, 2048]
    return [[context, {"pooled_output": pooled}]]


def zero_out(conditioning: list) -> list:
    """ConditioningZeroOut: zeros for the cond tensor and the pooled output."""
    out = []
    for cond, extra in conditioning:
        d = dict(extra)
        if d.get("pooled_output") is not None:
            d["pooled_output"] = torch.zeros_like(d["pooled_output"])
        out.append([torch.zeros_like(cond), d])
    return out


# bounds on what conditioning nodes can build (a chain of ConditioningConcat / Combine nodes doubles at each link)
MAX_CONDITIONING_ENTRIES = 64  # each active entry is one model call per step
MAX_CONTEXT_TOKENS = 16384  # SD3: 154 CLIP + the T5 tokens (--max-prompt-tokens bounds a prompt's)


def combine_conditioning(first: list, second: list) -> list:
    """ConditioningCombine: both lists' entries (at most MAX_CONDITIONING_ENTRIES)."""
    if len(first) + len(second) > MAX_CONDITIONING_ENTRIES:
        raise InputError(f"ConditioningCombine: {len(first) + len(second)} conditioning entries, more than the "
                         f"{MAX_CONDITIONING_ENTRIES} this server samples (each active entry is a model call a step)")
    return first + second


def set_timestep_range(conditioning: list, start: float, end: float) -> list:
    """ConditioningSetTimestepRange: every entry active from `start` to `end` of the schedule (fractions)."""
    return [[cond, {**extra, "start_percent": float(start), "end_percent": float(end)}] for cond, extra in conditioning]


def average_conditioning(to: list, from_: list, to_strength: float) -> list:
    """ConditioningAverage: each entry of `to` blended with the first of `from_` (its tokens cut or zero-padded
    to `to`'s length), context and pooled alike, w = to_strength."""
    if len(from_) > 1:
        log.warning("ConditioningAverage: conditioning_from has %d entries; only the first is used", len(from_))
    cond_from = from_[0][0]
    pooled_from = from_[0][1].get("pooled_output")
    out = []
    for t1, extra in to:
        t0 = cond_from[:, :t1.shape[1]]
        if t0.shape[1] < t1.shape[1]:
            t0 = torch.cat([t0, torch.zeros((1, t1.shape[1] - t0.shape[1], t1.shape[2]), dtype=t0.dtype)], dim=1)
        d = dict(extra)
        pooled_to = extra.get("pooled_output", pooled_from)
        if pooled_from is not None and pooled_to is not None:
            d["pooled_output"] = pooled_to * to_strength + pooled_from * (1.0 - to_strength)
        elif pooled_from is not None:
            d["pooled_output"] = pooled_from
        out.append([t1 * to_strength + t0 * (1.0 - to_strength), d])
    return out


def concat_conditioning(to: list, from_: list) -> list:
    """ConditioningConcat: the first entry of `from_`'s tokens appended to each entry of `to` (its pooled kept)."""
    if len(from_) > 1:
        log.warning("ConditioningConcat: conditioning_from has %d entries; only the first is used", len(from_))
    longest = max((t1.shape[1] for t1, _ in to), default=0) + from_[0][0].shape[1]
    if longest > MAX_CONTEXT_TOKENS:
        raise InputError(f"ConditioningConcat: a context of {longest} tokens, more than {MAX_CONTEXT_TOKENS}")
    return [[torch.cat((t1, from_[0][0]), 1), dict(extra)] for t1, extra in to]


def conditioning_of(conditioning: list, which: str, device: Any = None) -> Any:
    """A CONDITIONING list -> what the denoiser takes: a sampling.Conditioning for one entry without a timestep
    range, area or mask (the batched CFG road), else a sampling.CondSet (ConditioningCombine /
    ConditioningSetTimestepRange / ConditioningSetArea* / ConditioningSetMask: per step the active entries'
    predictions, each over its area, averaged by strength and mask, as ComfyUI). device None: the tensors stay
    where they are."""
    from sd35fp8.sampling import CondEntry, Conditioning, CondSet

    def placed(t: torch.Tensor) -> torch.Tensor:
        return t if device is None else t.to(device)

    if not conditioning:
        raise InputError(f"{which} conditioning is empty")
    entries = []
    for cond, extra in conditioning:
        pooled = extra.get("pooled_output")
        if pooled is None:
            raise InputError(f"{which} conditioning has no pooled_output (SD3 needs the CLIP pooled vector)")
        mask = extra.get("mask")
        entries.append(CondEntry(Conditioning(placed(cond), placed(pooled), control=extra.get("control")),
                                 start=float(extra.get("start_percent", 0.0)), end=float(extra.get("end_percent", 1.0)),
                                 strength=float(extra.get("strength", 1.0)), area=extra.get("area"),
                                 mask=None if mask is None else placed(mask),
                                 mask_strength=float(extra.get("mask_strength", 1.0)),
                                 set_area_to_bounds=bool(extra.get("set_area_to_bounds", False))))
    combined = CondSet(tuple(entries))
    return combined.simple or combined


# ---- latents and sampling -------------------------------------------------------------------
MAX_LATENT_IMAGE_PIXELS = 1 << 30  # batch x width x height an empty latent may stand for (1 GB of SD3 latent)


def empty_latent(width: int, height: int, batch_size: int, channels: int) -> dict[str, torch.Tensor]:
    """EmptyLatentImage (4 channels) / EmptySD3LatentImage (16): zeros [B, C, H/8, W/8]."""
    if batch_size * width * height > MAX_LATENT_IMAGE_PIXELS:
        raise InputError(f"an empty latent of {batch_size} x {width}x{height} px stands for more than "
                         f"{MAX_LATENT_IMAGE_PIXELS >> 20} Mpx; use a smaller batch or size")
    return {"samples": torch.zeros([batch_size, channels, height // 8, width // 8])}


def fix_empty_latent_channels(samples: torch.Tensor) -> torch.Tensor:
    """ComfyUI comfy.sample.fix_empty_latent_channels: an all-zero latent with the wrong channel
    count (EmptyLatentImage's 4) becomes zeros with the model's 16 channels."""
    if samples.shape[1] != SD3_LATENT_CHANNELS and torch.count_nonzero(samples) == 0:
        b, _, h, w = samples.shape
        return torch.zeros([b, SD3_LATENT_CHANNELS, h, w], dtype=samples.dtype, device=samples.device)
    if samples.shape[1] != SD3_LATENT_CHANNELS:
        raise InputError(f"latent has {samples.shape[1]} channels; SD3 latents have {SD3_LATENT_CHANNELS}")
    return samples


def layer_list(text: str) -> tuple[int, ...]:
    """ComfyUI's SLG layer strings: every run of digits is a layer (re.findall(r'\\d+'): "7, 8, 9", "7 8 9")."""
    return tuple(int(i) for i in re.findall(r"\d+", str(text)))


def with_skip_layer_guidance(model: SD3Model, layers: str, scale: float, start_percent: float, end_percent: float,
                             rescaling_scale: float = 0.0, single_layers: str = "",
                             uncond_only: bool = False) -> SD3Model:
    """SkipLayerGuidanceSD3 / SkipLayerGuidanceDiT (comfy_extras/nodes_slg.py): one more post-CFG function, after
    the MODEL's others (a second SLG node adds a second one, as ComfyUI chains them). `layers` are the joint blocks
    (the DiT node's double_layers); SD3 has no single blocks, so `single_layers` only keep the patch alive with no
    layer skipped, as in ComfyUI. The window is taken with the MODEL's shift now, as the node reads its
    model_sampling. uncond_only: SkipLayerGuidanceDiTSimple (the uncond pass skips the layers; no extra pass)."""
    from sd35fp8 import sampling

    double, single = layer_list(layers), layer_list(single_layers)
    if not double and not single:  # ComfyUI returns the MODEL unpatched
        return model
    slg = sampling.SLGConfig(scale=float(scale), start=float(start_percent), end=float(end_percent), layers=double,
                             window="sigma", rescale=float(rescaling_scale), shift=model.shift)
    if uncond_only:  # the last one set replaces an earlier one (set_model_sampler_calc_cond_batch_function)
        post = tuple(p for p in model.post_cfg if p[0] != "slg_uncond") + (("slg_uncond", slg),)
    else:
        post = model.post_cfg + (("slg", slg),)
    return replace(model, post_cfg=post)


def skip_layer_sets(model: SD3Model) -> list[tuple[int, ...]]:
    """The joint-block sets the MODEL's skip-layer guidance runs without (one CUDA graph each)."""
    return [p[1].layers for p in model.post_cfg if p[0] in ("slg", "slg_uncond") and len(p) > 1 and p[1].layers]


def sample_settings(model: SD3Model, steps: int, cfg: float, sampler_name: str, scheduler: str,
                    denoise: float = 1.0, start_step: int | None = None, last_step: int | None = None,
                    force_full_denoise: bool = False) -> Any:
    """KSampler / KSamplerAdvanced inputs + the MODEL's patches -> the generation core's SampleSettings."""
    from sd35fp8.generation import SampleSettings

    return SampleSettings(steps=steps, cfg=cfg, sampler=sampler_name, scheduler=scheduler, shift=model.shift,
                          denoise=denoise, start_step=start_step, last_step=last_step,
                          force_full_denoise=force_full_denoise, post_cfg=model.post_cfg,
                          comfy_cache=model.step_cache)


def sample(ctx: Any, model: SD3Model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
           positive: list, negative: list, latent: dict, denoise: float = 1.0, disable_noise: bool = False,
           start_step: int | None = None, last_step: int | None = None,
           force_full_denoise: bool = False) -> dict[str, torch.Tensor]:
    """KSampler / KSamplerAdvanced: the generation core's `sample` (ComfyUI's CONST flow sampling, float32)."""
    from sd35fp8 import generation
    from sd35fp8.sampling import get_sampler

    get_sampler(sampler_name)  # a KSampler name (a linked value skips validation), not a node's own (NODE_SAMPLERS)
    dev = torch.device(ctx.device)
    samples = fix_empty_latent_channels(latent["samples"]).to(dev, torch.float32)  # [B, 16, h, w] raw
    cond, ucond = conditioning_of(positive, "positive", dev), conditioning_of(negative, "negative", dev)
    settings = sample_settings(model, steps, cfg, sampler_name, scheduler, denoise, start_step, last_step,
                               force_full_denoise)
    if ctx.engine_options.cache_threshold > 0:  # the executor's --cache-threshold
        settings = replace(settings, cache_threshold=ctx.engine_options.cache_threshold)
    noise = None  # ComfyUI common_ksampler: the seed's draw picked by the LATENT's batch_index, when it has one
    if latent.get("batch_index") is not None and not disable_noise:
        from sd35fp8.sampling import prepare_noise

        noise = prepare_noise(seed, tuple(samples.shape), latent["batch_index"])
    with lora_active(model):  # (each entry keeps its ControlNetApply* chain: Conditioning.control)
        out = generation.sample(model.mmdit, cond, ucond, samples, settings, seed=seed, noise=noise,
                                add_noise=not disable_noise, dtype=ctx.dtype,
                                callback=lambda step, total, denoised: ctx.progress(step, total, denoised),
                                interrupt=ctx.check_interrupt, mask=noise_mask_of(latent, dev))
    if out is samples:
        return {**latent}
    return {**latent, "samples": out.float().cpu()}  # ComfyUI: the LATENT's other keys (noise_mask, ...) stay


def noise_mask_of(latent: dict, device: torch.device) -> torch.Tensor | None:
    """The LATENT's "noise_mask" (SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning):
    [B or 1, 1, H, W] in [0, 1], 1 = repaint; None without one."""
    mask = latent.get("noise_mask")
    return None if mask is None else mask.to(device, torch.float32)


# ---- VAE ------------------------------------------------------------------------------------
def _latent_tiles(vae: Any, tile_size: int, overlap: int) -> dict[str, int]:
    """VAEDecodeTiled / VAEEncodeTiled's pixel tile size and overlap (overlap cut to tile_size / 4, as ComfyUI)
    -> SD3VAE.decode_tiled / encode_tiled's arguments, in latents."""
    if tile_size < overlap * 4:
        overlap = tile_size // 4
    f = vae.config.downscale
    return {"tile_latent": max(1, tile_size // f), "overlap": overlap // f}


def vae_decode(vae: Any, latent: dict, offload: Any = None, tiles: tuple[int, int] | None = None) -> torch.Tensor:
    """VAEDecode: raw latents -> IMAGE [B, H, W, 3] in 0..1 (ComfyUI clamp((x + 1) / 2)).
    offload: the executor's ModelOffload (the VAE visits the device for the decode). tiles: VAEDecodeTiled's
    (tile_size, overlap) in pixels: feathered tiles, one tile's activations at a time (SD3VAE.decode_tiled)."""
    from sd35fp8 import generation

    z = latent["samples"]
    with _vae_device(vae, offload), torch.inference_mode():
        p = next(vae.parameters())
        z = z.to(p.device, p.dtype)
        img = (generation.decode(vae, z) if tiles is None  # [B, 3, H, W] in [-1, 1]
               else vae.decode_tiled(z, **_latent_tiles(vae, *tiles)))
    return torch.clamp((img.float() + 1.0) / 2.0, 0.0, 1.0).permute(0, 2, 3, 1).cpu()


def vae_encode(vae: Any, pixels: torch.Tensor, offload: Any = None,
               tiles: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """VAEEncode: IMAGE [B, H, W, C] 0..1 (cropped to multiples of 8) -> raw latents. tiles: VAEEncodeTiled's
    (tile_size, overlap) in pixels (SD3VAE.encode_tiled)."""
    from sd35fp8 import generation

    h, w = (pixels.shape[1] // 8) * 8, (pixels.shape[2] // 8) * 8
    x = pixels[:, :h, :w, :3].permute(0, 3, 1, 2)  # [B, 3, H, W]
    with _vae_device(vae, offload), torch.inference_mode():
        p = next(vae.parameters())
        x = x.to(p.device, p.dtype) * 2.0 - 1.0
        z = (generation.vae_encode(vae, x) if tiles is None  # [B, 16, H/8, W/8]
             else vae.encode_tiled(x, **_latent_tiles(vae, *tiles)).float())
    return {"samples": z.cpu()}


# ---- images ---------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_image(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """LoadImage: frames of one size -> IMAGE [B, H, W, 3] 0..1 and MASK [B, H, W] (1 - alpha)."""
    import numpy as np
    from PIL import Image, ImageOps, ImageSequence

    images, masks = [], []
    with Image.open(path) as img:
        size = None
        for frame in ImageSequence.Iterator(img):
            frame = ImageOps.exif_transpose(frame)
            if frame.mode == "I":
                frame = frame.point(lambda i: i * (1 / 255))
            rgb = frame.convert("RGB")
            if size is None:
                size = rgb.size
            if rgb.size != size:
                continue
            images.append(torch.from_numpy(np.array(rgb).astype(np.float32) / 255.0))
            if "A" in frame.getbands():
                alpha = np.array(frame.getchannel("A")).astype(np.float32) / 255.0
                masks.append(1.0 - torch.from_numpy(alpha))
            else:
                masks.append(torch.zeros((64, 64), dtype=torch.float32))
    return torch.stack(images), torch.stack(masks) if len({m.shape for m in masks}) == 1 else masks[0][None]


def random_suffix(n: int) -> str:
    return "_" + "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(n))


def save_image_path(prefix: str, output_dir: Path, width: int = 0, height: int = 0) -> tuple[Path, str, int, str]:
    """ComfyUI folder_paths.get_save_image_path: (folder, file base, next counter, subfolder).

    The counter is one more than the largest `<base>_<NNNNN>_` already in the folder.
    """
    if "%" in prefix:
        now = time.localtime()
        for key, val in (("%width%", width), ("%height%", height), ("%year%", now.tm_year),
                         ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"),
                         ("%hour%", f"{now.tm_hour:02}"), ("%minute%", f"{now.tm_min:02}"),
                         ("%second%", f"{now.tm_sec:02}")):
            prefix = prefix.replace(key, str(val))
    norm = os.path.normpath(prefix)
    subfolder, filename = os.path.dirname(norm), os.path.basename(norm)
    out_root = os.path.abspath(output_dir)
    folder = os.path.abspath(os.path.join(out_root, subfolder))
    if os.path.commonpath((out_root, folder)) != out_root:
        raise InputError(f"Saving image outside the output folder is not allowed: prefix {prefix!r} "
                         f"resolves to {folder}")
    os.makedirs(folder, exist_ok=True)
    plen = len(filename)
    counter = 0
    for name in os.listdir(folder):
        head = name[: plen + 1]
        if os.path.normcase(head[:-1]) != os.path.normcase(filename) or head[-1:] != "_":
            continue
        digits = re.match(r"\d+", name[plen + 1:].split("_")[0])  # 00001 of name_00001_.png and name_00001.txt
        counter = max(counter, int(digits.group()) if digits else 0)
    return Path(folder), filename, counter + 1, subfolder


def pixels_uint8(image: torch.Tensor) -> Any:
    """One IMAGE [H, W, C] in [0, 1] -> uint8 numpy [H, W, C], as ComfyUI's SaveImage (truncated, not rounded)."""
    import numpy as np

    return np.clip(255.0 * image.float().cpu().numpy(), 0, 255).astype(np.uint8)


def save_images(images: torch.Tensor, output_dir: Path, prefix: str, prompt: Any, extra_pnginfo: Any,
                folder_type: str, compress_level: int, ext: str = ".png", sep: str = "_",
                encode: Any = None) -> list[dict[str, str]]:
    """SaveImage: `{prefix}_{counter:05}_.png` with tEXt `prompt` and each extra_pnginfo key as JSON.

    SaveImageAdvanced names its files `{prefix}_{counter:05}{ext}` (sep "") and passes `encode(image, file,
    texts)`, which writes one image [H, W, C] with the metadata texts (key -> JSON string) into the open file."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    try:
        folder, base, counter, subfolder = save_image_path(prefix, output_dir, images.shape[2], images.shape[1])
    except OSError as e:
        raise OutputError(f"cannot use the {folder_type} folder {output_dir}: {e.strerror or e} "
                          f"(check that it is a writable folder)") from e
    results = []
    for batch_number, image in enumerate(images):  # [H, W, C]
        texts = {} if prompt is None else {"prompt": json.dumps(prompt)}
        texts.update({key: json.dumps(value) for key, value in (extra_pnginfo or {}).items()})
        name = base.replace("%batch_num%", str(batch_number))
        file = f"{name}_{counter:05}{sep}{ext}"
        # written whole under a name of its own, then linked to the first free counter: never a partial image in
        # the folder, and never another writer's image replaced (two workers or replicas saving at once)
        tmp = folder / f".{name}_{uuid.uuid4().hex}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                if encode is not None:
                    encode(image, f, texts)
                else:
                    meta = PngInfo()
                    for key, text in texts.items():
                        meta.add_text(key, text)
                    Image.fromarray(pixels_uint8(image)).save(f, format="PNG", pnginfo=meta,
                                                              compress_level=compress_level)
            counter, file = _claim_name(tmp, folder, name, counter, ext, sep)
        except OSError as e:
            raise OutputError(f"cannot write {file} into the {folder_type} folder {folder}: {e.strerror or e} "
                              f"(free disk space or make the folder writable)") from e
        finally:
            tmp.unlink(missing_ok=True)
        results.append({"filename": file, "subfolder": subfolder, "type": folder_type})
        counter += 1
    return results


def _save_one(output_dir: Path, prefix: str, ext: str, what: str, write: Any, sep: str = "_") -> dict:
    """One file `{prefix}_{counter:05}_{ext}` in the output folder: `write(tmp, base, counter)` writes it whole under a
    temporary name, then it takes the first free counter, as save_images names its images."""
    try:
        folder, base, counter, subfolder = save_image_path(prefix, output_dir)
    except OSError as e:
        raise OutputError(f"cannot use the output folder {output_dir}: {e.strerror or e}") from e
    tmp = folder / f".{base}_{uuid.uuid4().hex}.partial"
    try:
        write(tmp, base, counter)
        counter, file = _claim_name(tmp, folder, base, counter, ext, sep)
    except OSError as e:
        raise OutputError(f"cannot write {what} into the output folder {folder}: {e.strerror or e} (free disk "
                          "space or make the folder writable)") from e
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s", folder / file)
    return {"filename": file, "subfolder": subfolder, "type": "output"}


def save_latent(samples: torch.Tensor, output_dir: Path, prefix: str, prompt: Any, extra_pnginfo: Any) -> dict:
    """SaveLatent: `{prefix}_{counter:05}_.latent` (safetensors: latent_tensor, latent_format_version_0; metadata
    prompt and each extra_pnginfo key as JSON), written whole, then named as save_images does."""
    from safetensors.torch import save_file

    meta = {} if prompt is None else {"prompt": json.dumps(prompt)}
    meta.update({k: json.dumps(v) for k, v in (extra_pnginfo or {}).items()})
    tensors = {"latent_tensor": samples.contiguous().cpu(), "latent_format_version_0": torch.tensor([])}
    return _save_one(output_dir, prefix, ".latent", "a latent",
                     lambda tmp, base, counter: save_file(tensors, str(tmp), metadata=meta))


def load_latent(path: Path) -> dict[str, torch.Tensor]:
    """LoadLatent: a .latent file's tensor, times 1 / 0.18215 for files older than latent_format_version_0."""
    from sd35fp8.checkpoints.safetensors_file import SafetensorsFile

    f = SafetensorsFile(path)  # validated header: a clear error for truncated or foreign files
    if "latent_tensor" not in f.keys():
        raise InputError(f"{path.name}: not a latent file (no latent_tensor)")
    multiplier = 1.0 if "latent_format_version_0" in f.keys() else 1.0 / 0.18215
    return {"samples": f.get("latent_tensor").float() * multiplier}


def _claim_name(tmp: Path, folder: Path, name: str, counter: int, ext: str = ".png",
                sep: str = "_") -> tuple[int, str]:
    """Give the finished file `tmp` the name {name}_{counter:05}{sep}{ext}, counting up past names another writer
    took meanwhile (os.link fails on an existing name); a filesystem without hard links gets os.replace."""
    while True:
        file = f"{name}_{counter:05}{sep}{ext}"
        try:
            os.link(tmp, folder / file)
            return counter, file
        except FileExistsError:
            counter += 1
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            os.replace(tmp, folder / file)
            return counter, file



# ---- model merging and saving -------------------------------------------------------------------------------
def lora_layers(obj: SD3Model | SD3Clip) -> dict[str, dict[str, list]]:
    """component -> layer name -> the (term, strength) pairs of the MODEL's / CLIP's LoRAs on it ({} without)."""
    from sd35fp8.lora import shared_lora_set

    if not obj.loras:
        return {}
    out: dict[str, dict[str, list]] = {}
    for (comp, mod), terms in shared_lora_set(_components(obj)).layer_terms(obj.loras).items():
        out.setdefault(comp, {})[mod] = terms
    return out


def merge_models(model1: SD3Model, model2: SD3Model, strengths: Any, what: str, device: Any, dtype: Any,
                 options: EngineOptions = EngineOptions()) -> SD3Model:
    """The model merge nodes (checkpoints/merge.py): model1's sampling patches (shift, guidance) kept, its MMDiT
    rebuilt from the merged weights in model1's FP8 mode and run by a new engine, as its loader would. Each side's
    LoRAs are baked into its weights first (ComfyUI applies a MODEL's patches in order: its LoRAs, then the
    merge). A merge that changes no weight (every key's strengths (0, 1): ratio 1.0) gives model1 itself."""
    from sd35fp8.checkpoints.load import load_mmdit
    from sd35fp8.checkpoints.merge import base_mmdit, merged_source
    from sd35fp8.fast.engine import fp8_mode_of

    source = merged_source(model1.mmdit, model2.mmdit, strengths, model1.name or "model1", model2.name or "model2",
                           lora_layers(model1).get("mmdit"), lora_layers(model2).get("mmdit"))
    if all(strengths(k) == (0.0, 1.0) for k in source.merged):
        return model1
    mode = fp8_mode_of(base_mmdit(model1.mmdit))
    if mode == "static":  # model1's calibrated input scales do not describe the merged model's activations
        mode = "dynamic"
    log.info("%s: %d weights merged, %d of another shape kept from model1; FP8 mode %s", what, len(source.merged),
             len(source.mismatched), mode or "none (16-bit)")
    mmdit = load_mmdit(source, device=options.side(device), dtype=dtype, fp8=mode)
    return replace(model1, mmdit=options.mmdit(mmdit, device), name=f"{model1.name}+{model2.name}", loras=())


CLIP_MERGE_SKIPPED = (".position_ids", ".logit_scale")  # ComfyUI's CLIP merge nodes leave these alone


def merge_clips(clip1: SD3Clip, clip2: SD3Clip, strengths: Any, what: str) -> SD3Clip:
    """CLIPMergeSimple / Add / Subtract (comfy_extras/nodes_model_merging.py): a copy of clip1's text encoders with
    each weight merged as the model merge nodes merge (checkpoints/merge.py; position ids and logit scales kept),
    each side's LoRAs baked in first; FP8 layers (an FP8 T5) quantised again. An encoder only clip1 has stays as
    it is. A merge that changes no weight gives clip1 itself."""
    import copy

    from sd35fp8.checkpoints.merge import MergedSource, ModuleSource, assign
    from sd35fp8.lora.apply import remove_slot

    clip1, clip2 = _require_clip(clip1), _require_clip(clip2)

    def kept(key: str) -> tuple[float, float]:
        return (0.0, 1.0) if key.endswith(CLIP_MERGE_SKIPPED) else strengths(key)

    layers1, layers2 = lora_layers(clip1), lora_layers(clip2)
    others = _components(clip2)
    sources = {}
    for comp, module in _components(clip1).items():
        if module is None:
            continue
        base = ModuleSource(module, clip1.name or "clip1", comp, lora=layers1.get(comp))
        other = others.get(comp)
        other_src = ModuleSource(other, clip2.name or "clip2", comp, lora=layers2.get(comp)) if other is not None \
            else ModuleSource(torch.nn.Module(), "none", comp)
        sources[comp] = MergedSource(base, other_src, kept, f"{comp} merge")
    changed = {comp: [k for k in src.merged if kept(k) != (0.0, 1.0)] + src.base.baked()
               for comp, src in sources.items()}
    if not any(changed.values()):
        return clip1
    encoder = copy.deepcopy(clip1.encoder)  # a whole new copy: clip1 stays usable as it was
    copies = _components(SD3Clip(encoder))
    for root in (m for m in copies.values() if m is not None):
        if hasattr(root, "sd35_lora_set"):
            delattr(root, "sd35_lora_set")  # the copy starts with no LoRA state
        for module in root.modules():
            remove_slot(module)
    for comp, keys in changed.items():
        for key in dict.fromkeys(keys):
            assign(copies[comp], key, sources[comp].get(key))
    log.info("%s: %s", what, ", ".join(f"{c} {len(k)} weights" for c, k in changed.items()))
    return replace(clip1, encoder=encoder, name=f"{clip1.name}+{clip2.name}", loras=())


SD3_MODELSPEC = {"modelspec.architecture": "stable-diffusion-v3-medium",  # what ComfyUI writes for every SD3
                 "modelspec.sai_model_spec": "1.0.0", "modelspec.implementation": "sgm"}


def _write_parts(parts: list[tuple[str, Any]], output_dir: Path, prefix: str, meta: dict[str, str],
                 what: str) -> dict:
    """parts: (key prefix, checkpoints.merge.ModuleSource) -> one safetensors file `{prefix}_{counter:05}_` in
    the output folder, streamed tensor by tensor (_save_one). With modelspec metadata, its title is ComfyUI's
    "<file base> <counter>"."""
    from sd35fp8.checkpoints.export import Entry, write_safetensors

    produce: dict[str, tuple[Any, str]] = {}
    entries = []
    for key_prefix, source in parts:
        for k in source.keys():
            produce[key_prefix + k] = (source, k)
            entries.append(Entry(key_prefix + k, source.stored_dtype(k), source.shape(k)))

    def tensor(key: str) -> torch.Tensor:
        source, k = produce[key]
        return source.get(k).to(source.stored_dtype(k))

    def write(tmp: Path, base: str, counter: int) -> None:
        titled = {**meta, "modelspec.title": f"{base} {counter}"} if "modelspec.architecture" in meta else meta
        write_safetensors(tmp, entries, tensor, titled)

    return _save_one(output_dir, prefix, ".safetensors", what, write)


def _save_meta(prompt: Any, extra_pnginfo: Any, modelspec: bool) -> dict[str, str]:
    meta = dict(SD3_MODELSPEC) if modelspec else {}
    meta["prompt"] = "" if prompt is None else json.dumps(prompt)
    meta.update({k: json.dumps(v) for k, v in (extra_pnginfo or {}).items()})
    return meta


def _model_parts(model: SD3Model) -> list[tuple[str, Any]]:
    from sd35fp8.checkpoints.merge import ModuleSource, base_mmdit

    return [("model.diffusion_model.", ModuleSource(base_mmdit(model.mmdit), model.name or "model",
                                                    lora=lora_layers(model).get("mmdit")))]


def _clip_parts(clip: SD3Clip, inner: str) -> list[tuple[str, str, Any]]:
    """(component, key prefix, source) of each text encoder the CLIP holds; inner: "transformer." in a
    checkpoint (ComfyUI's text_encoders.<name>.transformer.*), "" in CLIPSave's own files."""
    from sd35fp8.checkpoints.merge import ModuleSource

    layers = lora_layers(clip)
    return [(comp, f"text_encoders.{comp}.{inner}" if inner else "",
             ModuleSource(module, clip.name or "clip", comp, lora=layers.get(comp)))
            for comp, module in _components(clip).items() if module is not None]


def save_model(model: SD3Model, output_dir: Path, prefix: str, prompt: Any, extra_pnginfo: Any) -> dict:
    """ModelSave (comfy_extras/nodes_model_merging.py): the MMDiT as `{prefix}_{counter:05}_.safetensors`, ComfyUI's
    keys (`model.diffusion_model.` + the original SD3 names) and metadata (modelspec, the prompt, each extra_pnginfo
    key as JSON). The MODEL's LoRAs are baked in, as ComfyUI patches them before saving; FP8 layers are written
    in bfloat16, which every SD3 loader reads (`sd35fp8 quantize` makes the file FP8 again)."""
    return _write_parts(_model_parts(model), output_dir, prefix, _save_meta(prompt, extra_pnginfo, True), "ModelSave")


def save_checkpoint(model: SD3Model, clip: Any, vae: Any, output_dir: Path, prefix: str, prompt: Any,
                    extra_pnginfo: Any) -> dict:
    """CheckpointSave: an all-in-one file in ComfyUI's layout: the MMDiT (as ModelSave), the VAE under
    `first_stage_model.`, each text encoder under `text_encoders.<clip_l|clip_g|t5xxl>.transformer.`, LoRAs baked."""
    from sd35fp8.checkpoints.merge import ModuleSource

    clip = _require_clip(clip)
    parts = _model_parts(model) + [("first_stage_model.", ModuleSource(vae, "vae", "vae"))]
    parts += [(p, s) for _, p, s in _clip_parts(clip, "transformer.")]
    return _write_parts(parts, output_dir, prefix, _save_meta(prompt, extra_pnginfo, True), "CheckpointSave")


def save_clip(clip: Any, output_dir: Path, prefix: str, prompt: Any, extra_pnginfo: Any) -> list[dict]:
    """CLIPSave: one file per text encoder, `{prefix}_{clip_l|clip_g|t5xxl}_{counter:05}_.safetensors`, with the
    encoder's own keys (ComfyUI strips the component and `transformer.` prefixes) and metadata format "pt"."""
    meta = {"format": "pt", **_save_meta(prompt, extra_pnginfo, False)}
    return [_write_parts([(p, s)], output_dir, f"{prefix}_{comp}", meta, "CLIPSave")
            for comp, p, s in _clip_parts(_require_clip(clip), "")]


def save_vae(vae: Any, output_dir: Path, prefix: str, prompt: Any, extra_pnginfo: Any) -> dict:
    """VAESave: the VAE's LDM keys, as ComfyUI's vae.get_sd()."""
    from sd35fp8.checkpoints.merge import ModuleSource

    return _write_parts([("", ModuleSource(vae, "vae", "vae"))], output_dir, prefix,
                        _save_meta(prompt, extra_pnginfo, False), "VAESave")
