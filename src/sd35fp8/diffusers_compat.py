"""diffusers' names on SD35Pipeline: a door onto the pipeline's own call, never a second generation.

A diffusers StableDiffusion3Pipeline script runs with only its import changed
(`from sd35fp8 import StableDiffusion3Pipeline`). Every diffusers argument is translated here into
the native call (`SD35Pipeline.generate`, which runs the generation core) or refused by name:

- `generator`: its `initial_seed()` is our `seed`. The initial noise is then one CPU draw
  `torch.Generator("cpu").manual_seed(seed)` + `torch.randn(shape)`, which is exactly what a fresh
  CPU generator gives diffusers; a generator already used (state advanced) still counts by its
  initial seed. No generator and no seed: seed 0 (a fixed image; diffusers would draw at random).
- `strength` with `image`: diffusers runs the last int(steps * strength) steps of its schedule,
  which is ComfyUI's denoise = strength with steps = int(steps * strength) (what we run).
  `mask_image` (white = repaint) adds ComfyUI's SetLatentNoiseMask semantics.
- `prompt_2` / `prompt_3` (and the negatives): CLIP-G's and T5's texts (`text.EncoderTexts`, as
  CLIPTextEncodeSD3); `max_sequence_length`: T5 padded and cut to exactly that many tokens
  (diffusers' rule; unset = ComfyUI's: at least 77, no limit).
- `callback_on_step_end(pipe, step, timestep, callback_kwargs)`: timestep = sigma * 1000;
  callback_kwargs["latents"] is the step's prediction of the clean latent (model space, as
  diffusers' latents), not the noisy sample; a callback that returns changed latents is refused.
- `output_type` "pil" | "np" | "pt" | "latent": np/pt are the 8-bit images / 255 (NHWC / NCHW in
  [0, 1]); "latent" is model-space (scaled and shifted, as diffusers returns). `return_dict=False`
  gives `(images,)`.
- `.to(device, dtype)`, `enable_model_cpu_offload()` / `enable_sequential_cpu_offload()`: reload
  the same files through `from_pretrained` with the new device / dtype / offload mode (the loader
  decides FP8 layout and engine per device); no-op when nothing changes, a logged no-op for
  offload without CUDA. `enable_vae_tiling()` (or `pipe.vae.enable_tiling()`): always decode in tiles;
  `enable_vae_slicing()` (`pipe.vae.enable_slicing()`): one image at a time. `enable_attention_slicing()`,
  `enable_xformers_memory_efficient_attention()`, `fuse_qkv_projections()` and their opposites are accepted and
  change nothing (diffusers' SD3 has no attention slicing; our attention is SDPA / the FP8 kernel; qkv is fused).
- LoRA (lora/pipeline.py): load_lora_weights, set_adapters, fuse_lora / unfuse_lora, disable_lora / enable_lora,
  delete_adapters, unload_lora_weights, get_active_adapters, get_list_adapters.
- Unset num_inference_steps / guidance_scale take the MODEL's defaults (defaults.py), not
  diffusers' fixed 28 / 7.0.
- `prompt_embeds` + `pooled_prompt_embeds` (instead of `prompt`, diffusers' rule: both or neither) and
  `negative_prompt_embeds` + `negative_pooled_prompt_embeds` (else the negative text, "" by default, is encoded
  as usual): [B, L, 4096] and [B, 2048], as diffusers' encode_prompt returns them; repeated for
  num_images_per_prompt. `latents`: the initial noise [B x num_images_per_prompt, 16, height/8, width/8]
  (text-to-image; it sets the size when height / width are unset), which is diffusers' starting latent at
  the schedule's first sigma (1.0): the same images as diffusers from the same latents.
- `mu`: accepted and ignored, as diffusers ignores it for SD3.5 (its scheduler configs have
  use_dynamic_shifting off; the shift is the model's, or `shift=`).
- `joint_attention_kwargs={"scale": s}`: the LoRA scale, every active adapter's weight times s for the call
  (the text encoders' LoRAs too, as diffusers' lora_scale); fused LoRAs keep theirs.
- `skip_guidance_layers` (+ `skip_layer_guidance_scale` / `_start` / `_stop`, diffusers' defaults 2.8, 0.01,
  0.2): diffusers' skip-layer guidance (SLGConfig window "steps": the steps i with start < i / steps < stop,
  the cond rows without those joint blocks); the knobs alone do nothing, as in diffusers. Without it the
  model's own SLG applies (SD3.5 Medium's, as the reference sd3_infer.py; slg=False turns it off).
- `clip_skip` k: CLIP-L / CLIP-G states from hidden_states[-(k + 2)] (diffusers' rule), T5 unchanged.
- `sigmas`: a custom schedule, as FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=) takes it: shifted by
  the scheduler's shift (3.0 for SD3.5), a final 0 appended; num_inference_steps = len(sigmas).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .devices import resolve_device
from .errors import InputError
from .models.vae import to_model_space
from .output import GenerationOutput
from .sampling import FlowMatching, get_sigmas
from .text.tokenizer import EncoderTexts

log = logging.getLogger(__name__)

LOAD_KWARGS_ACCEPTED = ("variant", "use_safetensors", "low_cpu_mem_usage", "local_files_only")
# diffusers' call arguments we do not implement: refused by name when given (not None)
UNSUPPORTED_CALL_ARGS = ("ip_adapter_image", "ip_adapter_image_embeds", "masked_image_latents",
                         "padding_mask_crop")
CALLBACK_TENSOR_INPUTS = ("latents",)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DIFFUSERS_IMG2IMG_STRENGTH = 0.6  # diffusers' default strength for img2img / inpainting


def load_kwargs(dtype: torch.dtype | None, torch_dtype: torch.dtype | None, extra: dict[str, Any]) -> torch.dtype | None:
    """from_pretrained's diffusers arguments -> the dtype to load in. torch_dtype is dtype's
    diffusers name; the file-choice flags diffusers takes (variant, use_safetensors, ...) are
    accepted and logged (we pick files by what they hold); anything else is an InputError."""
    unknown = sorted(k for k in extra if k not in LOAD_KWARGS_ACCEPTED)
    if unknown:
        raise InputError(f"from_pretrained: unknown argument(s) {', '.join(unknown)}; sd35fp8 takes clip_l, clip_g, "
                         f"t5xxl, t5_tokenizer, device, dtype/torch_dtype, fp8, offload, compile and diffusers' "
                         f"{', '.join(LOAD_KWARGS_ACCEPTED)}")
    if extra.get("use_safetensors") is False:
        raise InputError("from_pretrained: use_safetensors=False: sd35fp8 reads safetensors files only")
    if extra:
        log.info("from_pretrained: %s accepted; files are chosen by what they hold", ", ".join(sorted(extra)))
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise InputError(f"from_pretrained: dtype={dtype} and torch_dtype={torch_dtype} disagree; give one")
    return dtype if dtype is not None else torch_dtype


@dataclass
class SchedulerInfo:
    """`pipe.scheduler`: the sampler, schedule and shift a call uses by default (ComfyUI's names;
    set the fields, or pass sampler= / scheduler= / shift= to a call)."""

    sampler: str
    scheduler: str
    shift: float
    config: dict = field(init=False)

    def __post_init__(self) -> None:
        self.config = {"sampler": self.sampler, "scheduler": self.scheduler, "shift": self.shift}


def _seed_from(generator, seed: int | None) -> int:
    """diffusers' generator -> our seed (its initial seed; see the module docstring)."""
    if generator is None:
        return 0 if seed is None else seed
    if seed is not None:
        raise InputError("give generator= or seed=, not both")
    if isinstance(generator, (list, tuple)):
        seeds = {g.initial_seed() for g in generator}
        if len(seeds) != 1:
            raise InputError(f"one generator per image ({len(generator)} with seeds {sorted(seeds)}) is not supported: "
                             "the batch's noise is one draw from one seed; pass one generator")
        return seeds.pop()
    if not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator.initial_seed()


def _texts(prompt, prompt_2, prompt_3, t5_length: int | None, name: str) -> str | list[str]:
    """diffusers' per-encoder prompts -> EncoderTexts (a str, or a list of them); plain strings when
    every encoder gets the same text and T5 keeps our rule."""
    if prompt_2 is None and prompt_3 is None and t5_length is None:
        return prompt
    one = isinstance(prompt, str)
    ps = [prompt] if one else list(prompt)

    def each(value, what: str) -> list:
        if value is None or isinstance(value, str):
            return [value] * len(ps)
        if len(value) != len(ps):
            raise InputError(f"{len(ps)} {name}s but {len(value)} {what}")
        return list(value)

    out = [EncoderTexts(p, g, t, t5_length) for p, g, t in
           zip(ps, each(prompt_2, f"{name}_2"), each(prompt_3, f"{name}_3"))]
    return out[0] if one else out


def _as_pil(image, what: str):
    """diffusers' image inputs (PIL, numpy HWC/NHWC in [0, 1], tensor) -> what SD35Pipeline takes."""
    if isinstance(image, np.ndarray):
        arr = image if image.ndim == 4 else image[None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise InputError(f"{what} as a numpy array must be [H, W, C] or [B, H, W, C], got {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    return image


def _resize(image, width: int | None, height: int | None):
    """diffusers resizes the init image to height x width when they are given."""
    if width is None and height is None:
        return image
    if isinstance(image, Image.Image):
        size = (width or image.width, height or image.height)
        return image if image.size == size else image.resize(size, Image.LANCZOS)
    if isinstance(image, (list, tuple)) and all(isinstance(im, Image.Image) for im in image):
        return [_resize(im, width, height) for im in image]
    return image


def _mask_tensor(mask) -> torch.Tensor:
    """mask_image (PIL L/RGB, numpy or tensor; white / 1 = repaint) -> float32 [1 or B, 1, H, W] in [0, 1]."""
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr)[None, None]
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.asarray(mask, dtype=np.float32))
    if isinstance(mask, torch.Tensor):
        m = mask.detach().to("cpu", torch.float32)
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None] if m.shape[0] != 1 else m[None]
        if m.ndim != 4 or m.shape[1] != 1:
            raise InputError(f"mask_image tensor must be [H, W], [B, H, W] or [B, 1, H, W], got {tuple(mask.shape)}")
        return m.clamp(0, 1)
    raise InputError(f"mask_image must be a PIL image, numpy array or tensor, got {type(mask).__name__}")


def _convert(out: GenerationOutput, output_type: str):
    if output_type == "pil":
        return out.images
    if output_type == "latent":
        return to_model_space(out.latents.float())  # [B, 16, h, w]
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in out.images])  # [B, H, W, 3]
    return arr if output_type == "np" else torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # [B, 3, H, W]


class DiffusersSurface:
    """The diffusers names of SD35Pipeline (mixed into it). Needs from the pipeline: `generate`
    (the native call), `from_pretrained`, `mmdit`, `vae`, `text_encoder` (our SD3TextEncoder,
    holding all three towers), `defaults`, `device`, `dtype`, `offload`, `_load_args`."""

    vae_scale_factor = 8
    _progress_disabled: bool = False
    _vae_tiling: bool = False
    _vae_slicing: bool = False
    _scheduler: SchedulerInfo | None = None
    _guidance_scale: float | None = None
    _num_timesteps: int | None = None

    # ------------------------------------------------------------------ loading and placement
    @classmethod
    def from_single_file(cls, path, **kwargs):
        """diffusers' from_single_file: a checkpoint file (our from_pretrained reads files too)."""
        return cls.from_pretrained(path, **kwargs)

    @classmethod
    def from_pipe(cls, pipe, **kwargs):
        """diffusers' Img2ImgPipeline.from_pipe(pipe): the same pipeline (one class does text-to-image,
        img2img and inpainting); diffusers' component overrides are refused."""
        if kwargs:
            raise InputError(f"from_pipe: component overrides {', '.join(sorted(kwargs))} not supported")
        if not isinstance(pipe, cls):
            raise InputError(f"from_pipe needs an sd35fp8 pipeline, got {type(pipe).__name__}")
        return pipe

    def _reload(self, **changes):
        args = dict(getattr(self, "_load_args", None) or {})
        if not args:
            raise InputError("this pipeline was not built by from_pretrained: it cannot be moved or offloaded")
        args.update(changes)
        keep = {k: v for k, v in self.__dict__.items() if k in ("_progress_disabled", "_vae_tiling", "_vae_slicing",
                                                                 "_scheduler")}
        fresh = type(self).from_pretrained(**args)
        for switch in ("use_tiling", "use_slicing"):  # pipe.vae.enable_tiling() / enable_slicing() outlive the move
            if getattr(getattr(self, "vae", None), switch, False):
                setattr(fresh.vae, switch, True)
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        self.__dict__.update(keep)
        return self

    def to(self, *args, **kwargs):
        """diffusers' .to(device), .to(dtype), .to(device, dtype), .to(device=, dtype=): the same
        files reloaded on that device / in that dtype (nothing happens when both are unchanged)."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs:
            raise InputError(f"to(): unknown argument(s) {', '.join(sorted(kwargs))}")
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = a
            else:
                raise InputError(f"to(): expected a device or a torch.dtype, got {a!r}")
        new_device = self.device if device is None else resolve_device(device)
        new_dtype = self.dtype if dtype is None else dtype
        same_device = new_device.type == self.device.type and (new_device.index or 0) == (self.device.index or 0)
        if same_device and new_dtype == self.dtype:
            return self
        return self._reload(device=new_device, dtype=new_dtype)

    def _offload(self, mode: str, device) -> None:
        target = torch.device(device) if device is not None else (
            self.device if self.device.type == "cuda" else torch.device("cuda"))
        if target.type == "cuda" and not torch.cuda.is_available():
            log.warning("offload %r asked for, but there is no CUDA device: the models stay on the %s", mode,
                        self.device)
            return
        target = resolve_device(target)
        if self.offload != mode or target != self.device:
            self._reload(device=target, offload=mode)

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        """Our offload "model": every model in CPU memory, on the GPU only while it runs."""
        self._offload("model", device if gpu_id is None else f"cuda:{gpu_id}")

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: str | torch.device | None = None) -> None:
        """Our offload "sequential": also streams the MMDiT's and T5's blocks (an 8 GB card)."""
        self._offload("sequential", device if gpu_id is None else f"cuda:{gpu_id}")

    def enable_vae_tiling(self) -> None:
        """Decode in tiles always (bounded memory; close to, not equal to, a full decode)."""
        self._vae_tiling = True

    def disable_vae_tiling(self) -> None:
        self._vae_tiling = False

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time (the VAE's activations of one image at once; the same images)."""
        self._vae_slicing = True

    def disable_vae_slicing(self) -> None:
        self._vae_slicing = False

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Accepted, nothing changes: as in diffusers for SD3 (its transformer has no set_attention_slice), the
        joint attention runs whole (SDPA / the FP8 kernel: memory linear in the sequence)."""
        log.debug("enable_attention_slicing(%r): SD3's attention is not sliced (as in diffusers)", slice_size)

    def disable_attention_slicing(self) -> None:
        log.debug("disable_attention_slicing: SD3's attention is not sliced")

    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None) -> None:
        """Accepted, nothing changes: the attention already is a memory-efficient kernel (torch SDPA, or the FP8
        attention on sm_89+ GPUs: `attention=` of from_pretrained); xformers is not used."""
        log.info("enable_xformers_memory_efficient_attention: sd35fp8 keeps its own attention (%s); xformers is "
                 "not used", getattr(self, "attention", "auto"))

    def disable_xformers_memory_efficient_attention(self) -> None:
        log.debug("disable_xformers_memory_efficient_attention: nothing to undo")

    def fuse_qkv_projections(self) -> None:
        """Accepted, nothing changes: the MMDiT's q, k and v projections are always one fused Linear (qkv)."""

    def unfuse_qkv_projections(self) -> None:
        """Accepted, nothing changes (see fuse_qkv_projections)."""

    def maybe_free_model_hooks(self) -> None:
        """diffusers' end-of-call hook reset: offload here needs no hooks, so nothing to do."""

    @property
    def default_sample_size(self) -> int:
        """diffusers': the transformer's sample_size, the default height / width in latent cells (128 for
        SD3.5: 1024 px = default_sample_size * vae_scale_factor)."""
        return int(self.defaults.width) // self.vae_scale_factor

    @property
    def patch_size(self) -> int:
        return int(self.mmdit.config.patch_size)

    def set_progress_bar_config(self, **kwargs) -> None:
        """disable=True hides the sampling progress bar; other tqdm options are not used (logged)."""
        if "disable" in kwargs:
            self._progress_disabled = bool(kwargs.pop("disable"))
        if kwargs:
            log.info("set_progress_bar_config: %s not used (only disable is)", ", ".join(sorted(kwargs)))

    # ------------------------------------------------------------------ components
    @property
    def transformer(self):
        return self.mmdit

    @property
    def text_encoder_2(self):
        return self.text_encoder.clip_g

    @property
    def text_encoder_3(self):
        return self.text_encoder.t5

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer.clip

    @property
    def tokenizer_2(self):
        return self.text_encoder.tokenizer.clip

    @property
    def tokenizer_3(self):
        return self.text_encoder.tokenizer.t5

    @property
    def scheduler(self) -> SchedulerInfo:
        if self._scheduler is None:
            d = self.defaults
            self._scheduler = SchedulerInfo(d.sampler, d.scheduler, d.shift)
        return self._scheduler

    @scheduler.setter
    def scheduler(self, value: SchedulerInfo) -> None:
        if not isinstance(value, SchedulerInfo):
            raise InputError(f"pipe.scheduler must be an sd35fp8 SchedulerInfo (sampler, scheduler, shift), got "
                             f"{type(value).__name__}: diffusers scheduler objects are not used")
        self._scheduler = value

    @property
    def guidance_scale(self) -> float | None:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale is not None and self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int | None:
        return self._num_timesteps

    # ------------------------------------------------------------------ the call
    def __call__(self, prompt: str | Sequence[str] | None = None, *, prompt_2=None, prompt_3=None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, negative_prompt: str | Sequence[str] | None = None,
                 negative_prompt_2=None, negative_prompt_3=None, num_images_per_prompt: int | None = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True, callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
                 max_sequence_length: int | None = None, image=None, strength: float | None = None,
                 mask_image=None, seed: int | None = None, sampler: str | None = None, scheduler: str | None = None,
                 shift: float | None = None, denoise: float | None = None, callback=None, slg: bool | None = None,
                 progress: bool | None = None, interrupt: Callable[[], None] | None = None,
                 cache_threshold: float = 0.0, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None, sigmas: Sequence[float] | None = None,
                 joint_attention_kwargs: dict | None = None, skip_guidance_layers: Sequence[int] | None = None,
                 skip_layer_guidance_scale: float = 2.8, skip_layer_guidance_start: float = 0.01,
                 skip_layer_guidance_stop: float = 0.2, clip_skip: int | None = None, mu: float | None = None,
                 **unsupported):
        """diffusers' StableDiffusion3Pipeline call (and its img2img / inpaint pipelines' image,
        strength, mask_image), plus our own names (seed, sampler, scheduler, shift, denoise,
        callback, slg, progress, interrupt, cache_threshold). Translation rules: the module docstring."""
        if mu is not None:  # SD3.5's scheduler configs have use_dynamic_shifting off: diffusers ignores mu too
            log.info("mu=%s ignored: SD3.5's flow schedule has a fixed shift (the model's, or shift=)", mu)
        given = sorted(k for k, v in unsupported.items() if v is not None)
        unknown = [k for k in given if k not in UNSUPPORTED_CALL_ARGS]
        if unknown:
            raise InputError(f"unknown argument(s) {', '.join(unknown)}")
        if given:
            raise InputError(f"diffusers argument(s) {', '.join(given)} not supported by sd35fp8")
        if skip_guidance_layers is not None:  # diffusers' SLG: on the cond rows, steps i with start < i / steps < stop
            if slg is not None:
                raise InputError("give skip_guidance_layers (diffusers) or slg, not both")
            from .sampling import SLGConfig

            slg = SLGConfig(scale=float(skip_layer_guidance_scale), start=float(skip_layer_guidance_start),
                            end=float(skip_layer_guidance_stop), layers=tuple(skip_guidance_layers), window="steps")
        conditioning = self._given_embeddings(prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                                              negative_pooled_prompt_embeds)
        if prompt is None and conditioning is None:
            raise InputError("prompt must be a string or a list of strings (or give prompt_embeds), got None")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
        extra = [t for t in callback_on_step_end_tensor_inputs if t not in CALLBACK_TENSOR_INPUTS]
        if extra:
            raise InputError(f"callback_on_step_end_tensor_inputs {extra} not available; sd35fp8 offers "
                             f"{list(CALLBACK_TENSOR_INPUTS)}")
        seed = _seed_from(generator, seed)
        sched = self.scheduler
        sampler = sampler or sched.sampler
        scheduler = scheduler or sched.scheduler
        shift = sched.shift if shift is None else shift
        steps = self.defaults.steps if num_inference_steps is None else num_inference_steps
        schedule = None
        if sigmas is not None:  # FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=): shifted, then a final 0
            unshifted = [float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
            schedule = [shift * s / (1 + (shift - 1) * s) for s in unshifted] + [0.0]
            steps = len(unshifted)
        if strength is not None and denoise is not None:
            raise InputError("give strength= (diffusers) or denoise= (ComfyUI), not both")
        if strength is not None or (image is not None and denoise is None):
            strength = DIFFUSERS_IMG2IMG_STRENGTH if strength is None else float(strength)
            if image is None:
                raise InputError("strength needs an init image (image=)")
            if not 0 < strength <= 1:
                raise InputError(f"strength must be in (0, 1], got {strength}")
            steps = max(1, int(int(steps) * strength))  # diffusers runs the last steps * strength of its schedule
            denoise = strength
        denoise = 1.0 if denoise is None else float(denoise)
        if mask_image is not None and image is None:
            raise InputError("mask_image needs the image to inpaint (image=)")
        if image is not None:
            image = _resize(_as_pil(image, "image"), width, height)
            if isinstance(image, (Image.Image, list, tuple)):
                width = height = None  # the resized PIL image sets the size
        mask = None if mask_image is None else _mask_tensor(mask_image)
        negative = "" if negative_prompt is None else negative_prompt
        if conditioning is not None:
            prompt = [""] * int(conditioning[0].context.shape[0])  # labels only: the rows are the given embeddings
        prompts = _texts(prompt, prompt_2, prompt_3, max_sequence_length, "prompt")
        if isinstance(prompt, (list, tuple)) and isinstance(negative, str):
            negative = [negative] * len(prompt)
        negatives = _texts(negative, negative_prompt_2, negative_prompt_3, max_sequence_length, "negative_prompt")
        if conditioning is not None and conditioning[1] is None:  # (unused where cfg is 1)
            conditioning = (conditioning[0], self._encode_negatives(negatives))
        step_cb = callback
        if callback_on_step_end is not None:
            step_cb = self._step_end(callback_on_step_end, callback, sampler, scheduler, shift, steps, denoise,
                                     schedule)
        self._guidance_scale = self.defaults.cfg if guidance_scale is None else float(guidance_scale)
        self._num_timesteps = steps
        progress = (not self._progress_disabled) if progress is None else progress
        kwargs = dict(negative_prompt=negatives, num_inference_steps=steps, guidance_scale=guidance_scale,
                      height=height, width=width, seed=seed, sampler=sampler, scheduler=scheduler, shift=shift,
                      denoise=denoise, image=image, num_images_per_prompt=num_images_per_prompt or 1,
                      callback=step_cb, slg=slg, progress=progress, cache_threshold=cache_threshold)
        if mask is not None:
            kwargs["mask"] = mask
        if interrupt is not None:
            kwargs["interrupt"] = interrupt
        if conditioning is not None:
            kwargs["conditioning"] = conditioning
        if latents is not None:
            kwargs["noise"] = latents
        if schedule is not None:
            kwargs["sigmas"] = schedule
            kwargs["num_inference_steps"] = None
        with self._lora_scale(joint_attention_kwargs), self._clip_skip(clip_skip):
            out = self.generate(prompts, **kwargs)
        images = _convert(out, output_type)
        if not return_dict:
            return (images,)
        return out if output_type == "pil" else GenerationOutput(images=images, latents=out.latents, params=out.params)

    def _clip_skip(self, clip_skip: int | None):
        """diffusers' clip_skip k: the CLIP encoders' states k layers before their usual one (hidden_states
        [-(k + 2)]), T5 unchanged."""
        if clip_skip is None:
            return nullcontext()
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0:
            raise InputError(f"clip_skip must be a non-negative integer, got {clip_skip!r}")
        return self.text_encoder.last_layer(-(clip_skip + 2), t5=False)

    @contextmanager
    def _lora_scale(self, joint_attention_kwargs: dict | None) -> Iterator[None]:
        """diffusers' joint_attention_kwargs={"scale": s}: every active (unfused) LoRA's weight times s for this
        call, the text encoders' too (diffusers passes it to encode_prompt as lora_scale); other keys refused."""
        if not joint_attention_kwargs:
            yield
            return
        other = sorted(set(joint_attention_kwargs) - {"scale"})
        if other:
            raise InputError(f"joint_attention_kwargs: only 'scale' (the LoRA scale) is supported, got {other}")
        scale = float(joint_attention_kwargs["scale"])
        loras = self._loras
        if loras is None or not loras.active or scale == 1.0:
            yield
            return
        before = dict(loras.active)
        loras.set_active({name: weight * scale for name, weight in before.items()})
        try:
            yield
        finally:
            loras.set_active(before)

    @staticmethod
    def _given_embeddings(prompt, prompt_embeds, pooled, negative_embeds, negative_pooled) -> tuple | None:
        """diffusers' precomputed embeddings -> (Conditioning, Conditioning or None), or None when none are given;
        InputError for the combinations diffusers refuses (check_inputs)."""
        from .sampling import Conditioning

        if prompt_embeds is None:
            if pooled is not None or negative_embeds is not None or negative_pooled is not None:
                raise InputError("pooled / negative prompt embeddings need prompt_embeds")
            return None
        if prompt is not None:
            raise InputError("give prompt or prompt_embeds, not both")
        if pooled is None:
            raise InputError("prompt_embeds needs pooled_prompt_embeds (from the same encode_prompt call)")
        if (negative_embeds is None) != (negative_pooled is None):
            raise InputError("negative_prompt_embeds and negative_pooled_prompt_embeds go together")
        uncond = None if negative_embeds is None else Conditioning(negative_embeds, negative_pooled)
        return Conditioning(prompt_embeds, pooled), uncond

    def _encode_negatives(self, negatives):
        """The negative texts' conditioning (diffusers encodes negative_prompt, "" by default, beside given
        prompt_embeds): one row for a shared text, else one per prompt."""
        texts = negatives if isinstance(negatives, (list, tuple)) else [negatives]
        if len(texts) > 1 and all(t == texts[0] for t in texts):
            texts = texts[:1]
        return self.encode_prompt(list(texts))

    def _step_end(self, fn: Callable, callback, sampler: str, scheduler: str, shift: float, steps: int,
                  denoise: float, schedule: Sequence[float] | None = None):
        """callback_on_step_end(pipe, step, timestep, callback_kwargs) on top of our step callback."""
        sigmas = torch.tensor(schedule) if schedule is not None else get_sigmas(
            scheduler, int(steps), shift=float(shift), denoise=float(denoise), sampler=sampler,
            model_sampling=FlowMatching(float(shift)))

        def on_step(step: int, total: int, denoised: torch.Tensor) -> None:
            if callback is not None:
                callback(step, total, denoised)
            i = step - 1  # diffusers counts steps from 0
            timestep = sigmas[min(i, len(sigmas) - 1)] * 1000
            latents = denoised  # [B, 16, h, w] model space: the step's clean-latent prediction
            result = fn(self, i, timestep, {"latents": latents})
            if isinstance(result, dict) and result.get("latents") is not None and result["latents"] is not latents:
                raise InputError("callback_on_step_end returned changed latents: sd35fp8 does not take latents "
                                 "back from the callback")

        return on_step
