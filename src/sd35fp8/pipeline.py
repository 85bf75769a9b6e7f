"""SD35Pipeline: owns the loaded models and turns prompts into images, the way diffusers users
call it and the way ComfyUI's KSampler computes it.

Flow of one call: arguments checked and completed from the model's defaults -> the generation
core (`sd35fp8.generation.generate`: SD3TextEncoder -> CPU noise from the seed -> sampler over
CFGDenoiser(MMDiT) on the σ schedule -> VAE decode) -> PIL images. The pipeline knows neither
file formats nor model internals.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .defaults import GenerationDefaults, defaults_for
from .errors import InputError
from .devices import default_device, resolve_device  # noqa: F401  (re-exported: callers import them from here)
from .diffusers_compat import DiffusersSurface, load_kwargs
from .fast import OFFLOAD_MODES, build_engine, default_compile
from .fp8.device import MODES
from .generation import Components, GenerationRequest, SampleSettings, StepCallback, encode_groups, generate
from .models.mmdit import MMDiT
from .lora.pipeline import LoraPipelineMixin
from .output import GenerationOutput
from .sampling import Conditioning, SLGConfig
from .step_cache import check_threshold

log = logging.getLogger(__name__)

FP8_CHOICES = (None, "none", *MODES)  # None: the file's precision; "none": --dtype
TILED_DECODE_PIXELS = 1536 * 1536  # decode larger images in tiles (bounded memory)


def dtype_from_name(name: str | None) -> torch.dtype | None:
    table = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in table:
        raise InputError(f"unknown dtype {name!r}; choose bf16, fp16 or fp32")
    return table[name]


def shipped_model_path() -> Path:
    """The small SD3.5-layout model that ships inside the package (the default model)."""
    from .tiny import SHIPPED_CHECKPOINT

    return SHIPPED_CHECKPOINT


@dataclass
class StageStats:
    """Wall time and peak GPU memory of each stage of the last call (for benchmarks and logs)."""

    seconds: dict[str, float] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)  # step cache: calls, full, skipped (empty: off)


class SD35Pipeline(LoraPipelineMixin, DiffusersSurface):
    """`pipe(...)` takes diffusers' names and ours (diffusers_compat.py translates them); `pipe.generate(...)`
    is the native call. LoRA: load_lora_weights, set_adapters, fuse_lora... (lora/pipeline.py)."""

    def __init__(self, mmdit, vae, text_encoder, defaults: GenerationDefaults, device: torch.device,
                 dtype: torch.dtype, offload: str = "none", description: dict | None = None):
        if offload not in OFFLOAD_MODES:
            raise InputError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
        self.device = torch.device(device)
        self.offload = offload
        self.mmdit = mmdit  # an MMDiT becomes its engine (the `mmdit` setter)
        self.vae = vae
        self.text_encoder = text_encoder
        self.defaults = defaults
        self.device = torch.device(device)
        self.dtype = dtype
        self.offload = offload
        self.description = dict(description or {})
        self.stats = StageStats()
        # prompts and negatives through the text encoders in one batch: faster, but batch size changes
        # the encoders' rounding, so a generation would no longer equal the ComfyUI workflow (which
        # encodes each CLIPTextEncode node alone). On only for the compiled path (from_pretrained(
        # compile=True)), whose numerics differ from the workflow's anyway.
        self.batch_encode = False
        self._offloader = None
        if offload != "none":  # text encoders and VAE visit the device; the MMDiT engine places itself
            from .offload import ModelOffload

            self._offloader = ModelOffload(self.device)
            self._offloader.register(text_encoder, "text_encoder")
            self._offloader.register(vae, "vae")

    @property
    def mmdit(self):
        """The MMDiT's engine (fast.MMDiTEngine: .model, .config, .fp8_mode, .describe())."""
        return self._mmdit

    @mmdit.setter
    def mmdit(self, model) -> None:
        """Assigning an MMDiT module builds its engine for this pipeline's device and offload (the weights
        move there); an engine, or another model with MMDiT's forward contract (a calibration recorder,
        fast.PlainForward), is used as it is."""
        if isinstance(model, MMDiT):
            model = build_engine(model, self.device, compile=False, offload=self.offload,
                                 attention=getattr(self, "attention", "auto"))
        self._mmdit = model

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, *, clip_l: str | Path | None = None,
                        clip_g: str | Path | None = None, t5xxl: str | Path | None = None,
                        t5_tokenizer: str | Path | None = None, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, fp8: str | None = None,
                        offload: str = "none", t5_min_length: int = 77, compile: bool | None = None,
                        attention: str = "auto", torch_dtype: torch.dtype | None = None, **diffusers_kwargs) -> SD35Pipeline:
        """Load everything a generation needs.

        model: checkpoint file, diffusers folder or cached Hugging Face repo id (offline);
        None = the shipped small model. fp8: None keeps the file's precision (an fp8 file runs as
        FP8), "none" forces --dtype, "weight_only" | "dynamic" | "static" quantise the MMDiT.
        offload: "none" keeps every model on the device; "model" (a 12 GB card) keeps the MMDiT
        resident and the text encoders and VAE in pinned CPU memory, each moved to the device only
        while it runs (T5's blocks streamed one by one); "sequential" (an 8 GB card) also streams the
        MMDiT's joint blocks with prefetch into the fused step.
        The MMDiT always runs through `sd35fp8.fast.build_engine` (fused step; CUDA graphs per image
        shape on CUDA unless sequential). compile: also torch.compile the per-block step and, with offload
        "none", the VAE decoder (None: the device's default, fast.default_compile: off for the Python API
        and `generate`). The first
        image of each size then compiles (tens of seconds; cached on disk in ~/.cache/sd35fp8/inductor);
        `warmup` does it up front. attention: "auto" | "fp8" | "bf16" (fast.build_engine: FP8 flash
        attention where the FP8 matmul modes run on sm_89+, "fp8" forces it, its torch emulation on CPU).
        torch_dtype (diffusers' name for dtype) and diffusers' file flags: diffusers_compat.load_kwargs.
        """
        dtype = load_kwargs(dtype, torch_dtype, diffusers_kwargs)
        load_args = dict(model=model, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl, t5_tokenizer=t5_tokenizer,
                         device=device, dtype=dtype, fp8=fp8, offload=offload, t5_min_length=t5_min_length,
                         compile=compile, attention=attention)  # kept for .to() / enable_*_offload (a reload)
        from .checkpoints.load import load_mmdit, load_text_encoders, load_vae
        from .checkpoints.sources import resolve
        from .text import CLIPBPE, SD3TextEncoder, SD3Tokenizer, load_t5_tokenizer

        if fp8 not in FP8_CHOICES:
            raise InputError(f"unknown fp8 mode {fp8!r}; choose none, weight_only, dynamic or static")
        if offload not in OFFLOAD_MODES:
            raise InputError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
        device = resolve_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = shipped_model_path() if model is None else model
        comps = resolve(model, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl)
        side = device if offload == "none" else torch.device("cpu")  # offload: load into CPU memory
        if offload != "none" and fp8 not in (None, "none"):
            from .fp8.device import choose_mode

            fp8, _ = choose_mode(fp8, device)  # decided for the GPU it will run on, not the CPU it loads on
        mmdit = load_mmdit(comps, device=side, dtype=dtype, **({"fp8": fp8} if fp8 is not None else {}))
        vae = load_vae(comps, device=side, dtype=dtype)
        texts = load_text_encoders(comps, device=side, dtype=dtype)
        if device.type == "cuda":  # token tables in CPU memory: 0.43 GiB less on the GPU for SD3.5
            from .offload import keep_token_embeddings_on_cpu

            for tower in (texts.clip_l, texts.clip_g, texts.t5xxl):
                if tower is not None:
                    keep_token_embeddings_on_cpu(tower)
        if compile is None:
            compile = default_compile(device, offload)
        mmdit = build_engine(mmdit, device, compile=compile, offload=offload, attention=attention)
        if compile and offload == "none":  # the compiled road compiles the (resident) VAE decoder too
            vae.compile_decoder()
        if offload != "none" and texts.t5xxl is not None:  # T5 block by block next to the resident MMDiT
            from .offload import stream_t5_blocks

            stream_t5_blocks(texts.t5xxl, device)
        t5_tok = None
        if texts.t5xxl is not None:
            near = [Path(f) for f in comps.t5xxl.files] + [Path(f) for f in comps.mmdit.files]
            if "t5xxl" in comps.tokenizers:
                near.insert(0, comps.tokenizers["t5xxl"])
            t5_tok = load_t5_tokenizer(t5_tokenizer, near=near)
        tokenizer = SD3Tokenizer(clip=CLIPBPE.default(), t5=t5_tok, t5_min_length=t5_min_length)
        encoder = SD3TextEncoder(texts.clip_l, texts.clip_g, texts.t5xxl,
                                 context_dim=mmdit.config.context_dim, tokenizer=tokenizer)

        config = mmdit.config
        mm_file = getattr(comps.mmdit, "file", None)
        defaults = defaults_for(config.depth, bool(config.x_block_self_attn_layers),
                                getattr(mm_file, "metadata", {}) or {}, Path(str(comps.mmdit.files[0])).name)
        description = {"model": str(model), "components": comps.origins, "mmdit": config.describe(),
                       "defaults": defaults.name, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
        log.info("loaded %s on %s (%s)", defaults.name, device, description["dtype"])
        pipe = cls(mmdit, vae, encoder, defaults, device, dtype, offload, description)
        pipe._load_args = load_args
        pipe.attention = attention  # engines built later (the mmdit setter) take the same choice
        return pipe

    # ------------------------------------------------------------------ helpers
    def warmup(self, shapes: Sequence[tuple[int, int, int]] | None = None) -> float:
        """Compile / capture the MMDiT step for each (width, height, images per prompt) now, so the first
        generation of those sizes does not pay it (None: the model's default size, one image). The
        CFG batch and the default skip-layer-guidance pass are prepared as generations use them, and the
        compiled VAE decoder (compile=True) for each shape's latent batch.
        Returns the seconds spent (0 when nothing is prepared per shape: CPU, eager sequential)."""
        d = self.defaults
        shapes = [(d.width, d.height, 1)] if shapes is None else list(shapes)
        slg = self._slg(None)
        t5 = getattr(self.text_encoder, "t5", None) is not None
        tok = getattr(self.text_encoder, "tokenizer", None)
        tokens = 77 + (max(77, getattr(tok, "t5_min_length", 77)) if t5 else 0)
        seconds = self.mmdit.warmup(shapes, cfg=abs(d.cfg - 1.0) > 1e-9, skip_layers=slg.layers if slg else (),
                                    context_tokens=tokens)
        if "_compiled_decoder" in self.vae.__dict__:  # the compiled road: the VAE decoder's graph per shape too
            t0 = time.perf_counter()
            p = next(self.vae.parameters())
            with torch.inference_mode():
                for width, height, batch in shapes:
                    self.vae.decode(torch.zeros(batch, self.vae.config.latent_channels, height // 8, width // 8,
                                                device=p.device, dtype=p.dtype))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds += time.perf_counter() - t0
        return seconds

    @contextmanager
    def _on_device(self, module: torch.nn.Module):
        """With offload, the text encoders and VAE are on the device only while they run
        (sd35fp8.offload.ModelOffload); the MMDiT engine places its own weights (fast/engine.py)."""
        if self._offloader is None or not self._offloader.manages(module):
            yield module
            return
        with self._offloader.on_device(module):
            yield module

    @contextmanager
    def _stage(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            self.stats.peak_bytes[name] = torch.cuda.max_memory_allocated(self.device)
        self.stats.seconds[name] = time.perf_counter() - start

    def encode_prompt(self, prompts: Sequence[str]):
        """prompts -> Conditioning(context [B, L, C], pooled [B, P]) on the device."""
        return self.encode_prompt_groups(prompts)[0]

    def encode_prompt_groups(self, *groups: Sequence[str]):
        """Several prompt lists (e.g. prompts and negatives) encoded in ONE batch through each text
        encoder (SD3TextEncoder.encode_prompt_groups) -> one Conditioning per list."""
        return encode_groups(self.text_encoder, groups, self.device, self.dtype, self._on_device)

    def components(self) -> Components:
        """The models and hooks the generation core runs on (read at each call: `pipe.mmdit` may be
        swapped between calls, as the tiny evaluation does for each FP8 mode)."""
        return Components(mmdit=self.mmdit, vae=self.vae, text_encoder=self.text_encoder, device=self.device,
                          dtype=self.dtype, on_device=self._on_device, stage=self._stage,
                          tiled_decode=self._tiled_decode, batch_encode=self.batch_encode,
                          decode_slices=self._vae_slicing or bool(getattr(self.vae, "use_slicing", False)))

    def check_size(self, width: int, height: int) -> None:
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % 16:
                raise InputError(f"{name} must be a positive multiple of 16, got {value}")
        limit = self.mmdit.config.max_pixels
        if max(width, height) > limit:
            raise InputError(f"{width}x{height} exceeds this model's position grid: at most {limit} pixels "
                             f"per side ({self.defaults.name}, pos_embed {self.mmdit.config.pos_embed_max_size}²)")

    def _tiled_decode(self, width: int, height: int, batch: int = 1) -> bool:
        """Tiled VAE decode (bounded memory, not bit-equal to a full decode) only when needed.

        Offload model / sequential: tiled when the engine's resident weights (all of the MMDiT / its
        fused adaLN, embedders and final layer) plus a full decode exceed MODEL_OFFLOAD_BUDGET (a 12 GB
        card) / SEQUENTIAL_OFFLOAD_BUDGET (an 8 GB card). Offload none on
        CUDA: full decode when its estimated activations fit the device's free memory (with 10 %
        margin), as ComfyUI falls back to tiles only when a full decode does not fit. CPU: tiles
        above TILED_DECODE_PIXELS.
        """
        from .offload import (MODEL_OFFLOAD_BUDGET, SEQUENTIAL_OFFLOAD_BUDGET, free_device_bytes, use_tiled_decode,
                              vae_decode_bytes)

        if self._vae_tiling or getattr(getattr(self, "vae", None), "use_tiling", False):  # enable_vae_tiling(), vae.enable_tiling()
            return True
        if self.offload != "none":  # the engine's resident weights plus a full decode within the card's budget
            budget = MODEL_OFFLOAD_BUDGET if self.offload == "model" else SEQUENTIAL_OFFLOAD_BUDGET
            return use_tiled_decode(width, height, budget, self.mmdit.weight_bytes()["resident"])
        free = free_device_bytes(self.device)
        if free is None:
            return width * height > TILED_DECODE_PIXELS
        return batch * vae_decode_bytes(width, height) > 0.9 * free

    def _slg(self, slg: bool | SLGConfig | None) -> SLGConfig | None:
        """The model's skip-layer guidance (defaults.py; the sd3.5 reference's step window), unless
        slg is False or the model has none; an SLGConfig as given (its layers checked against the depth)."""
        if isinstance(slg, SLGConfig):
            depth = self.mmdit.config.depth
            bad = [i for i in slg.layers if not 0 <= i < depth]
            if bad or not slg.layers:
                raise InputError(f"skip-layer guidance layers {list(slg.layers)}: the MMDiT has joint blocks "
                                 f"0-{depth - 1}")
            return slg
        d = self.defaults
        if slg is False or d.slg_scale <= 0 or not d.slg_layers:
            return None
        return SLGConfig(scale=d.slg_scale, start=d.slg_start, end=d.slg_end, layers=d.slg_layers)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "",
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 height: int | None = None, width: int | None = None, seed: int = 0,
                 sampler: str | None = None, scheduler: str | None = None, shift: float | None = None,
                 denoise: float = 1.0, image: Image.Image | torch.Tensor | None = None,
                 num_images_per_prompt: int = 1, callback: StepCallback | None = None,
                 slg: bool | SLGConfig | None = None, progress: bool = True,
                 interrupt: Callable[[], None] | None = None,
                 mask: torch.Tensor | None = None, cache_threshold: float = 0.0, *,
                 conditioning: tuple[Conditioning, Conditioning | None] | None = None,
                 noise: torch.Tensor | None = None, sigmas: Sequence[float] | None = None) -> GenerationOutput:
        """Generate images; missing parameters take the model's defaults (see defaults.py).

        Checks the arguments, then runs the generation core (`sd35fp8.generation.generate`, the
        same code `sd35fp8 run` and the server sample with). Seeds: the initial noise of the whole
        batch is one CPU draw from `seed`, as ComfyUI does, so the same seed gives the same image on
        every device. `image` + `denoise` < 1 is img2img: one image (PIL, or a float tensor
        [3, H, W] / [1, 3, H, W] in [0, 1]) for every prompt, or one per prompt (a list of PIL
        images or a [P, 3, H, W] tensor); the image sets the size. Prompts whose contexts cannot be
        batched (a long prompt among short ones, as ComfyUI decides) run in one pass each, on their
        rows of the batch's noise; the per-step noise of ancestral/SDE samplers is then drawn per
        pass. `callback(step, total, denoised)` runs after every step (of every pass); `interrupt()`
        before every step (it stops the call by raising). slg: None = the model's skip-layer
        guidance (Medium), False = none; with it and no guidance_scale, cfg is the model's
        `slg_cfg` (the reference's 4.0 for Medium). `mask` [1 or B, 1, H, W] in [0, 1] with `image`:
        inpainting, 1 = repaint (ComfyUI's SetLatentNoiseMask; resized to the latent bilinearly).
        cache_threshold > 0: step caching (sd35fp8.step_cache; 0 = off; 1.0 is the measured default of
        `--cache-threshold`): an evaluation is skipped, and its velocity forecast linearly in sigma from the
        last two full ones, while the forecast's estimated error stays under the threshold (never in the first
        20% of the schedule or at the last step; at most one or two skips in a row); the counts land in
        `self.stats.cache`. conditioning: (cond [P, L, C], uncond or None) instead of encoding `prompt` (then only
        labels: one string per row of cond, or one for all); noise: the initial noise [P x images, 16, h, w]
        (model space) instead of the draw from `seed` (text-to-image only; it sets the size when width /
        height are unset). sigmas: the whole schedule (steps + 1 decreasing sigmas in (0, 1], the last 0), used
        as given instead of `scheduler`'s (text-to-image; num_inference_steps must be unset or len(sigmas) - 1).
        """
        from .models.vae import image_to_uint8
        from .sampling import check_scheduler, get_sampler

        d = self.defaults
        if conditioning is not None and isinstance(prompt, str):
            prompt = [prompt] * int(conditioning[0].context.shape[0])  # one label per row of the given embeddings
        prompts = _prompt_list(prompt, "prompt")
        negatives = ([negative_prompt] * len(prompts) if isinstance(negative_prompt, str)
                     else _prompt_list(negative_prompt, "negative_prompt"))
        if not prompts:
            raise InputError("no prompt given (an empty list)")
        if len(negatives) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        steps = d.steps if num_inference_steps is None else _as_int(num_inference_steps, "num_inference_steps")
        if sigmas is not None:
            sigmas = _check_sigmas(sigmas, None if num_inference_steps is None else steps, image is not None)
            steps = len(sigmas) - 1
        n = _as_int(num_images_per_prompt, "num_images_per_prompt")
        seed = _as_int(seed, "seed")
        width = None if width is None else _as_int(width, "width")
        height = None if height is None else _as_int(height, "height")
        slg_config = self._slg(slg)
        if guidance_scale is not None:
            cfg = float(guidance_scale)
        else:
            cfg = d.slg_cfg if slg_config is not None and d.slg_cfg is not None else d.cfg
        sampler = sampler or d.sampler
        scheduler = scheduler or d.scheduler
        shift = d.shift if shift is None else float(shift)
        get_sampler(sampler)  # InputError naming the valid ones
        check_scheduler(scheduler)
        if not 0 <= seed < 2**64:
            raise InputError(f"seed must be in [0, 2**64), got {seed}")
        if not cfg >= 0 or steps < 1 or n < 1 or not 0 < denoise <= 1:
            raise InputError(f"invalid cfg {cfg}, steps {steps}, batch {n} or denoise {denoise}")
        pixels = None
        if image is not None:
            pixels = _image_tensor(image)  # [1 or P, 3, H, W] in [-1, 1], CPU
            ih, iw = pixels.shape[-2:]
            if (width is not None and width != iw) or (height is not None and height != ih):
                raise InputError(f"init image is {iw}x{ih} but width/height are {width}x{height}: leave them "
                                 "unset or resize the image")
            width, height = iw, ih
            if pixels.shape[0] not in (1, len(prompts)):
                raise InputError(f"{pixels.shape[0]} init images for {len(prompts)} prompts: give one image "
                                 "or one per prompt")
        if mask is not None and pixels is None:
            raise InputError("mask (inpainting) needs the init image (image=)")
        if conditioning is not None:
            self._check_conditioning(conditioning, len(prompts))
        if noise is not None:
            if pixels is not None:
                raise InputError("initial noise (latents) with an init image: the image sets the starting latent")
            if noise.ndim != 4 or noise.shape[0] != len(prompts) * n or noise.shape[1] != self.mmdit.config.in_channels:
                raise InputError(f"latents must be [{len(prompts) * n}, {self.mmdit.config.in_channels}, height/8, "
                                 f"width/8] (prompts x images per prompt), got {list(noise.shape)}")
            lh, lw = int(noise.shape[2]) * 8, int(noise.shape[3]) * 8
            if (width is not None and width != lw) or (height is not None and height != lh):
                raise InputError(f"latents are for {lw}x{lh} images, width/height are {width}x{height}")
            width, height = lw, lh
        width = d.width if width is None else width
        height = d.height if height is None else height
        self.check_size(width, height)

        self.stats = StageStats()
        settings = SampleSettings(steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, shift=shift,
                                  denoise=denoise, slg=slg_config, cache_threshold=check_threshold(cache_threshold),
                                  sigmas=sigmas)
        request = GenerationRequest(prompts=prompts, negatives=negatives, settings=settings, width=width,
                                    height=height, seed=seed, images_per_prompt=n, init_pixels=pixels,
                                    callback=callback, interrupt=interrupt, progress=progress,
                                    mask=mask, conditioning=conditioning,
                                    noise=None if noise is None else noise.float())
        out = generate(self.components(), request)
        self.stats.cache = out.cache_stats
        images = [Image.fromarray(a) for a in image_to_uint8(out.pixels)]
        params = [dict(prompt=prompts[i // n], negative_prompt=negatives[i // n], steps=steps, cfg=cfg,
                       sampler=sampler, scheduler=scheduler, shift=shift, seed=seed, batch_index=i,
                       width=width, height=height, denoise=denoise, model=self.description.get("model", ""),
                       mmdit=self.description.get("mmdit", ""), fp8=self.fp8_mode)
                  for i in range(len(images))]
        return GenerationOutput(images=images, latents=out.latents.cpu(), params=params)

    def _check_conditioning(self, conditioning: tuple, prompts: int) -> None:
        """Given embeddings: (cond, uncond or None), each Conditioning(context [B, L, context_dim], pooled
        [B, pooled_dim]); cond has a row per prompt, uncond one or as many."""
        cfg = self.mmdit.config
        for name, e in zip(("prompt", "negative_prompt"), conditioning):
            if e is None:
                continue
            ctx, pooled = e.context, e.pooled
            rows = (prompts,) if name == "prompt" else (1, prompts)
            if ctx.ndim != 3 or ctx.shape[-1] != cfg.context_dim or ctx.shape[0] not in rows:
                raise InputError(f"{name}_embeds must be [{prompts}, tokens, {cfg.context_dim}], got {list(ctx.shape)}")
            if pooled.ndim != 2 or pooled.shape[-1] != cfg.pooled_dim or pooled.shape[0] != ctx.shape[0]:
                raise InputError(f"pooled {name}_embeds must be [{ctx.shape[0]}, {cfg.pooled_dim}], "
                                 f"got {list(pooled.shape)}")

    def summary(self) -> str:
        """One line: model, device, dtype and the MMDiT's compute mode (with the reason for FP8 choices)."""
        report = getattr(self.mmdit.model, "fp8_report", None)
        mode = report.describe() if report is not None else f"MMDiT in {self.description.get('dtype')}"
        return f"{self.defaults.name} on {self.device}; {mode}; {self.mmdit.describe()}"

    @property
    def fp8_mode(self) -> str:
        from .fp8.linear import FP8Linear

        modes = {m.effective_mode for m in self.mmdit.modules() if isinstance(m, FP8Linear)}
        return ",".join(sorted(modes)) if modes else "none"


# diffusers' class names: one class does text-to-image, img2img (image=, strength=) and inpainting (mask_image=)
StableDiffusion3Pipeline = StableDiffusion3Img2ImgPipeline = StableDiffusion3InpaintPipeline = SD35Pipeline


def _prompt_list(value, name: str) -> list[str]:
    """A prompt or a sequence of prompts -> list of str (InputError for anything else)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InputError(f"{name} must be a string or a list of strings, got {type(value).__name__}")


def _check_sigmas(sigmas, steps: int | None, img2img: bool) -> tuple[float, ...]:
    """A whole schedule given as sigmas: finite, in [0, 1], decreasing, ending at 0 -> a tuple."""
    try:
        values = tuple(float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas))
    except (TypeError, ValueError):
        raise InputError(f"sigmas must be a sequence of numbers, got {type(sigmas).__name__}") from None
    if img2img:
        raise InputError("sigmas with an init image: give denoise / strength and a scheduler instead")
    if len(values) < 2 or values[-1] != 0.0 or not all(0.0 <= s <= 1.0 for s in values) or \
            any(b >= a for a, b in zip(values, values[1:])):
        raise InputError(f"sigmas must decrease from at most 1.0 to a final 0.0, got {list(values)[:8]}")
    if steps is not None and steps != len(values) - 1:
        raise InputError(f"{len(values)} sigmas are {len(values) - 1} steps, num_inference_steps is {steps}")
    return values


def _as_int(value, name: str) -> int:
    """An integer argument (Python or NumPy int; not bool or float) -> int."""
    import operator

    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {value!r}") from None


def _image_tensor(image) -> torch.Tensor:
    """PIL image, list of PIL images of one size, or float tensor [3,H,W] / [B,3,H,W] in [0,1]
    -> float32 [1 or B, 3, H, W] in [-1, 1] on the CPU (InputError for anything else)."""
    import numpy as np

    def from_pil(im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype="float32") / 255.0).permute(2, 0, 1)

    if isinstance(image, Image.Image):
        image = from_pil(image)[None]
    elif isinstance(image, (list, tuple)) and image and all(isinstance(im, Image.Image) for im in image):
        sizes = {im.size for im in image}
        if len(sizes) != 1:
            raise InputError(f"init images differ in size: {sorted(sizes)}")
        image = torch.stack([from_pil(im) for im in image])
    elif isinstance(image, torch.Tensor):
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[1] != 3:
            raise InputError(f"init image tensor must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise InputError(f"init image tensor must be floating point in [0, 1], got {image.dtype}")
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise InputError(f"init image tensor values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")
        image = image.detach().to("cpu", torch.float32)
    else:
        raise InputError(f"image must be a PIL image, a list of them or a tensor, got {type(image).__name__}")
    return image * 2.0 - 1.0
