"""ComfyUI node definitions: exact class names, inputs, defaults, ranges, outputs, categories.

Each class mirrors ComfyUI's nodes.py / comfy_extras: `INPUT_TYPES(folders)` (ComfyUI's takes no
argument and reads the global folder_paths; ours receives the ModelFolders so listings are per
executor), RETURN_TYPES, RETURN_NAMES, FUNCTION, OUTPUT_NODE, CATEGORY, DESCRIPTION.
Node bodies are thin: the engine work lives in `engine.py`.

Value types between nodes (ComfyUI's shapes):
  MODEL: engine.SD3Model       CLIP: engine.SD3Clip       VAE: the SD3VAE module
  CONDITIONING: [[cond [B,L,C], {"pooled_output": [B,P]}], ...]
  LATENT: {"samples": [B,C,H/8,W/8]} raw VAE-space latents
  IMAGE: [B,H,W,C] float in 0..1        MASK: [B,H,W] float
"""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Any

from sd35fp8.errors import InputError
from sd35fp8.workflow import engine
from sd35fp8.workflow.node_base import (CLIP_TYPES, MAX_RESOLUTION, SEED_MAX, WEIGHT_DTYPES, Node,  # noqa: F401
                                         NodeContext, _file_stamps, _files, _tip)
from sd35fp8.workflow.nodes_area import AREA_NODES
from sd35fp8.workflow.nodes_control import CONTROL_NODES
from sd35fp8.workflow.nodes_cache import CACHE_NODES
from sd35fp8.workflow.nodes_guidance import GUIDANCE_NODES, SLG_LAYERS, SLG_WINDOW, SkipLayerGuidanceDiT
from sd35fp8.workflow.nodes_image import IMAGE_NODES
from sd35fp8.workflow.nodes_inpaint import INPAINT_NODES
from sd35fp8.workflow.nodes_latent import LATENT_NODES
from sd35fp8.workflow.nodes_latent_files import LATENT_FILE_NODES
from sd35fp8.workflow.nodes_latent_ops import LATENT_OPERATION_NODES, LATENT_OPS_NODES
from sd35fp8.workflow.nodes_mask import MASK_NODES
from sd35fp8.workflow.nodes_image_extra import IMAGE_EXTRA_NODES
from sd35fp8.workflow.nodes_preview_any import PREVIEW_ANY_NODES
from sd35fp8.workflow.nodes_merge import MERGE_NODES
from sd35fp8.workflow.nodes_primitive import PRIMITIVE_NODES
from sd35fp8.workflow.nodes_sampling import SAMPLING_NODES
from sd35fp8.workflow.nodes_sigmas import SIGMAS_NODES
from sd35fp8.workflow.nodes_string import STRING_NODES
from sd35fp8.workflow.nodes_upscale import UPSCALE_NODES
from sd35fp8.workflow.nodes_utility import UTILITY_NODES

if TYPE_CHECKING:
    from sd35fp8.workflow.folders import ModelFolders


# ---- loaders --------------------------------------------------------------------------------
class CheckpointLoaderSimple(Node):
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = (
        "The model used for denoising latents.",
        "The CLIP model used for encoding text prompts.",
        "The VAE model used for encoding and decoding images to and from latent space.",
    )
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a diffusion model checkpoint, diffusion models are used to denoise latents."
    DISPLAY_NAME = "Load Checkpoint"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "ckpt_name": (_files(folders, "checkpoints"), _tip("The name of the checkpoint (model) to load.")),
        }}

    @classmethod
    def IS_CHANGED(cls, folders, ckpt_name=None, **_):
        return _file_stamps(folders, "checkpoints", ckpt_name)

    def load_checkpoint(self, ckpt_name):
        path = self.ctx.folders.get_full_path_or_raise("checkpoints", ckpt_name)
        return engine.load_checkpoint(path, self.ctx.device, self.ctx.dtype, self.ctx.engine_options)


class UNETLoader(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = "advanced/loaders"
    DISPLAY_NAME = "Load Diffusion Model"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "unet_name": (_files(folders, "diffusion_models"),),
            "weight_dtype": (list(WEIGHT_DTYPES),),
        }}

    @classmethod
    def IS_CHANGED(cls, folders, unet_name=None, **_):
        return _file_stamps(folders, "diffusion_models", unet_name)

    def load_unet(self, unet_name, weight_dtype):
        path = self.ctx.folders.get_full_path_or_raise("diffusion_models", unet_name)
        return (engine.load_diffusion_model(path, self.ctx.device, self.ctx.dtype, weight_dtype,
                                            self.ctx.engine_options),)


class VAELoader(Node):
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    CATEGORY = "loaders"
    DISPLAY_NAME = "Load VAE"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"vae_name": (_files(folders, "vae"),)}}

    @classmethod
    def IS_CHANGED(cls, folders, vae_name=None, **_):
        return _file_stamps(folders, "vae", vae_name)

    def load_vae(self, vae_name):
        path = self.ctx.folders.get_full_path_or_raise("vae", vae_name)
        return (engine.load_vae_file(path, self.ctx.device, self.ctx.dtype, self.ctx.engine_options),)


class TripleCLIPLoader(Node):
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = "[Recipes]\n\nsd3: clip-l, clip-g, t5"
    PYTHON_MODULE = "comfy_extras.nodes_sd3"

    @classmethod
    def INPUT_TYPES(cls, folders):
        names = _files(folders, "text_encoders")
        return {"required": {"clip_name1": (names,), "clip_name2": (names,), "clip_name3": (names,)}}

    @classmethod
    def IS_CHANGED(cls, folders, clip_name1=None, clip_name2=None, clip_name3=None, **_):
        return _file_stamps(folders, "text_encoders", clip_name1, clip_name2, clip_name3)

    def load_clip(self, clip_name1, clip_name2, clip_name3):
        paths = [self.ctx.folders.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2, clip_name3)]
        return (engine.load_clip_files(paths, self.ctx.device, self.ctx.dtype, self.ctx.engine_options),)


class DualCLIPLoader(Node):
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = ("[Recipes]\n\nsdxl: clip-l, clip-g\nsd3: clip-l, clip-g / clip-l, t5 / clip-g, t5\nflux: clip-l, t5\n"
                   "hidream: at least one of t5 or llama, recommended t5 and llama\n"
                   "hunyuan_image: qwen2.5vl 7b and byt5 small")

    @classmethod
    def INPUT_TYPES(cls, folders):
        names = _files(folders, "text_encoders")
        return {
            "required": {"clip_name1": (names,), "clip_name2": (names,),
                         "type": (["sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image"],)},
            "optional": {"device": (["default", "cpu"], {"advanced": True})},
        }

    @classmethod
    def IS_CHANGED(cls, folders, clip_name1=None, clip_name2=None, **_):
        return _file_stamps(folders, "text_encoders", clip_name1, clip_name2)

    def load_clip(self, clip_name1, clip_name2, type, device="default"):  # noqa: A002
        if type != "sd3":
            raise engine.unsupported(f"DualCLIPLoader type {type!r}: this engine runs SD3.5 only (use type 'sd3')")
        paths = [self.ctx.folders.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2)]
        dev = "cpu" if device == "cpu" else self.ctx.device
        return (engine.load_clip_files(paths, dev, self.ctx.dtype),)


class CLIPLoader(Node):
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = (
        "[Recipes]\n\nstable_diffusion: clip-l\nstable_cascade: clip-g\nsd3: t5 xxl/ clip-g / clip-l\n"
        "stable_audio: t5 base\nmochi: t5 xxl\ncosmos: old t5 xxl\nlumina2: gemma 2 2B\nwan: umt5 xxl\n"
        " hidream: llama-3.1 (Recommend) or t5"
    )
    DISPLAY_NAME = "Load CLIP"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {
            "required": {"clip_name": (_files(folders, "text_encoders"),), "type": (list(CLIP_TYPES),)},
            "optional": {"device": (["default", "cpu"], {"advanced": True})},
        }

    @classmethod
    def IS_CHANGED(cls, folders, clip_name=None, **_):
        return _file_stamps(folders, "text_encoders", clip_name)

    def load_clip(self, clip_name, type="stable_diffusion", device="default"):  # noqa: A002
        if type != "sd3":
            raise engine.unsupported(f"CLIPLoader type {type!r}: this engine runs SD3.5 only (use type 'sd3')")
        path = self.ctx.folders.get_full_path_or_raise("text_encoders", clip_name)
        dev = "cpu" if device == "cpu" else self.ctx.device
        return (engine.load_clip_files([path], dev, self.ctx.dtype,
                                       None if device == "cpu" else self.ctx.engine_options),)


# ---- conditioning ---------------------------------------------------------------------------
class CLIPTextEncode(Node):
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = (
        "Encodes a text prompt using a CLIP model into an embedding that can be used to guide the "
        "diffusion model towards generating specific images."
    )
    DISPLAY_NAME = "CLIP Text Encode (Prompt)"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The text to be encoded."}),
            "clip": ("CLIP", _tip("The CLIP model used for encoding the text.")),
        }}

    def encode(self, clip, text):
        return (engine.encode_text(clip, self.ctx.limit_text("CLIPTextEncode", "text", text)),)


class CLIPSetLastLayer(Node):
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "set_last_layer"
    CATEGORY = "conditioning"
    DISPLAY_NAME = "CLIP Set Last Layer"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "clip": ("CLIP",),
            "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1}),
        }}

    def set_last_layer(self, clip, stop_at_clip_layer):
        """ComfyUI's clip.clip_layer(stop_at_clip_layer): CLIP-L, CLIP-G and T5 give the states after that layer
        (text/encoders.py SD3TextEncoder.last_layer)."""
        from dataclasses import replace

        return (replace(engine._require_clip(clip), layer_idx=int(stop_at_clip_layer)),)


class CLIPTextEncodeSD3(Node):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning"
    PYTHON_MODULE = "comfy_extras.nodes_sd3"

    @classmethod
    def INPUT_TYPES(cls, folders):
        text = ("STRING", {"multiline": True, "dynamicPrompts": True})
        return {"required": {
            "clip": ("CLIP",), "clip_l": text, "clip_g": text, "t5xxl": text,
            "empty_padding": (["none", "empty_prompt"],),
        }}

    def encode(self, clip, clip_l, clip_g, t5xxl, empty_padding):
        clip_l, clip_g, t5xxl = (self.ctx.limit_text("CLIPTextEncodeSD3", name, text) for name, text in
                                 (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5xxl)))
        return (engine.encode_text_sd3(clip, clip_l, clip_g, t5xxl, empty_padding),)


class ConditioningZeroOut(Node):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero_out"
    CATEGORY = "advanced/conditioning"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def zero_out(self, conditioning):
        return (engine.zero_out(conditioning),)


class ConditioningCombine(Node):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "combine"
    CATEGORY = "conditioning"
    DISPLAY_NAME = "Conditioning (Combine)"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"conditioning_1": ("CONDITIONING",), "conditioning_2": ("CONDITIONING",)}}

    def combine(self, conditioning_1, conditioning_2):
        """Both lists' entries; the sampler averages the predictions of those active at each step."""
        return (engine.combine_conditioning(conditioning_1, conditioning_2),)


class ConditioningSetTimestepRange(Node):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "set_range"
    CATEGORY = "advanced/conditioning"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }}

    def set_range(self, conditioning, start, end):
        return (engine.set_timestep_range(conditioning, start, end),)


class ConditioningAverage(Node):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "addWeighted"
    CATEGORY = "conditioning"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "conditioning_to": ("CONDITIONING",),
            "conditioning_from": ("CONDITIONING",),
            "conditioning_to_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    def addWeighted(self, conditioning_to, conditioning_from, conditioning_to_strength):  # noqa: N802 (ComfyUI's)
        return (engine.average_conditioning(conditioning_to, conditioning_from, conditioning_to_strength),)


class ConditioningConcat(Node):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "concat"
    CATEGORY = "conditioning"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"conditioning_to": ("CONDITIONING",), "conditioning_from": ("CONDITIONING",)}}

    def concat(self, conditioning_to, conditioning_from):
        return (engine.concat_conditioning(conditioning_to, conditioning_from),)


# ---- latents --------------------------------------------------------------------------------
class EmptyLatentImage(Node):
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The empty latent image batch.",)
    FUNCTION = "generate"
    CATEGORY = "latent"
    DESCRIPTION = "Create a new batch of empty latent images to be denoised via sampling."
    DISPLAY_NAME = "Empty Latent Image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                              "tooltip": "The width of the latent images in pixels."}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8,
                               "tooltip": "The height of the latent images in pixels."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096,
                                   "tooltip": "The number of latent images in the batch."}),
        }}

    def generate(self, width, height, batch_size=1):
        return (engine.empty_latent(width, height, batch_size, channels=4),)


class EmptySD3LatentImage(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = "latent/sd3"
    PYTHON_MODULE = "comfy_extras.nodes_sd3"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "width": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
            "height": ("INT", {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
        }}

    def generate(self, width, height, batch_size=1):
        return (engine.empty_latent(width, height, batch_size, channels=16),)


# ---- model patches --------------------------------------------------------------------------
class ModelSamplingSD3(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"
    PYTHON_MODULE = "comfy_extras.nodes_model_advanced"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "shift": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01}),
        }}

    def patch(self, model, shift):
        return (model.with_shift(shift),)


class SkipLayerGuidanceSD3(SkipLayerGuidanceDiT):
    """ComfyUI's SD3 form of SkipLayerGuidanceDiT (a subclass there too): one layer list, the joint blocks."""

    FUNCTION = "skip_guidance_sd3"
    PYTHON_MODULE = "comfy_extras.nodes_sd3"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "layers": SLG_LAYERS, **SLG_WINDOW}}

    def skip_guidance_sd3(self, model, layers, scale, start_percent, end_percent):
        return (engine.with_skip_layer_guidance(model, layers, scale, start_percent, end_percent),)


class LoraLoader(Node):
    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The modified diffusion model.", "The modified CLIP model.")
    FUNCTION = "load_lora"
    CATEGORY = "loaders"
    DESCRIPTION = ("LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are "
                   "denoised such as applying styles. Multiple LoRA nodes can be linked together.")
    DISPLAY_NAME = "Load LoRA"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL", _tip("The diffusion model the LoRA will be applied to.")),
            "clip": ("CLIP", _tip("The CLIP model the LoRA will be applied to.")),
            "lora_name": (_files(folders, "loras"), _tip("The name of the LoRA.")),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly to modify the diffusion model. This value can be "
                                                    "negative."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                        "tooltip": "How strongly to modify the CLIP model. This value can be "
                                                   "negative."}),
        }}

    def load_lora(self, model, clip, lora_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        path = self.ctx.folders.get_full_path_or_raise("loras", lora_name)
        return engine.with_lora(model, clip, path, strength_model, strength_clip)


class LoraLoaderModelOnly(LoraLoader):
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = None
    FUNCTION = "load_lora_model_only"
    DESCRIPTION = ""
    DISPLAY_NAME = None

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "lora_name": (_files(folders, "loras"),),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
        }}

    def load_lora_model_only(self, model, lora_name, strength_model):
        return (self.load_lora(model, None, lora_name, strength_model, 0)[0],)


# ---- sampling -------------------------------------------------------------------------------
class KSampler(Node):
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent.",)
    FUNCTION = "sample"
    CATEGORY = "sampling"
    DESCRIPTION = "Uses the provided model, positive and negative conditioning to denoise the latent image."
    DISPLAY_NAME = "KSampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL", _tip("The model used for denoising the input latent.")),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                              "tooltip": "The number of steps used in the denoising process."}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The Classifier-Free Guidance scale balances creativity and adherence "
                                         "to the prompt. Higher values result in images more closely matching "
                                         "the prompt however too high values will negatively impact quality."}),
            "sampler_name": (engine.sampler_names(), _tip(
                "The algorithm used when sampling, this can affect the quality, speed, and style of the "
                "generated output.")),
            "scheduler": (engine.scheduler_names(), _tip(
                "The scheduler controls how noise is gradually removed to form the image.")),
            "positive": ("CONDITIONING", _tip(
                "The conditioning describing the attributes you want to include in the image.")),
            "negative": ("CONDITIONING", _tip(
                "The conditioning describing the attributes you want to exclude from the image.")),
            "latent_image": ("LATENT", _tip("The latent image to denoise.")),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "The amount of denoising applied, lower values will maintain the "
                                             "structure of the initial image allowing for image to image "
                                             "sampling."}),
        }}

    @staticmethod
    def sample_args(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                    denoise=1.0) -> dict[str, Any]:
        """The node's inputs as `engine.sample` keyword arguments (also used by cross-prompt batching)."""
        return {"model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
                "scheduler": scheduler, "positive": positive, "negative": negative, "latent": latent_image,
                "denoise": denoise}

    def sample(self, **inputs):
        return (engine.sample(self.ctx, **self.sample_args(**inputs)),)


class KSamplerAdvanced(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = "sampling"
    DISPLAY_NAME = "KSampler (Advanced)"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "add_noise": (["enable", "disable"],),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (engine.sampler_names(),),
            "scheduler": (engine.scheduler_names(),),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        }}

    @staticmethod
    def sample_args(model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                    latent_image, start_at_step, end_at_step, return_with_leftover_noise,
                    denoise=1.0) -> dict[str, Any]:
        return {"model": model, "seed": noise_seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
                "scheduler": scheduler, "positive": positive, "negative": negative, "latent": latent_image,
                "denoise": denoise, "disable_noise": add_noise == "disable", "start_step": start_at_step,
                "last_step": end_at_step, "force_full_denoise": return_with_leftover_noise != "enable"}

    def sample(self, **inputs):
        return (engine.sample(self.ctx, **self.sample_args(**inputs)),)


# ---- VAE ------------------------------------------------------------------------------------
class VAEDecode(Node):
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"
    CATEGORY = "latent"
    DESCRIPTION = "Decodes latent images back into pixel space images."
    DISPLAY_NAME = "VAE Decode"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "samples": ("LATENT", _tip("The latent to be decoded.")),
            "vae": ("VAE", _tip("The VAE model used for decoding the latent.")),
        }}

    def decode(self, vae, samples):
        return (engine.vae_decode(vae, samples, self.ctx.engine_options.offloader),)


class VAEEncode(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent"
    DISPLAY_NAME = "VAE Encode"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",)}}

    def encode(self, vae, pixels):
        return (engine.vae_encode(vae, pixels, self.ctx.engine_options.offloader),)


def _tiled_inputs(first: str, first_type: str, tile_step: int, verb: str) -> dict:
    """VAEDecodeTiled / VAEEncodeTiled's inputs (ComfyUI's; the temporal ones only matter for video VAEs)."""
    return {"required": {
        first: (first_type,), "vae": ("VAE",),
        "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": tile_step}),
        "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32}),
        "temporal_size": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 4,
                                  "tooltip": f"Only used for video VAEs: Amount of frames to {verb} at a time."}),
        "temporal_overlap": ("INT", {"default": 8, "min": 4, "max": 4096, "step": 4,
                                     "tooltip": "Only used for video VAEs: Amount of frames to overlap."}),
    }}


class VAEDecodeTiled(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "_for_testing"
    DISPLAY_NAME = "VAE Decode (Tiled)"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return _tiled_inputs("samples", "LATENT", 32, "decode")

    def decode(self, vae, samples, tile_size, overlap=64, temporal_size=64, temporal_overlap=8):
        return (engine.vae_decode(vae, samples, self.ctx.engine_options.offloader, (tile_size, overlap)),)


class VAEEncodeTiled(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "_for_testing"
    DISPLAY_NAME = "VAE Encode (Tiled)"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return _tiled_inputs("pixels", "IMAGE", 64, "encode")

    def encode(self, vae, pixels, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        return (engine.vae_encode(vae, pixels, self.ctx.engine_options.offloader, (tile_size, overlap)),)


# ---- images ---------------------------------------------------------------------------------
class LoadImage(Node):
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load_image"
    CATEGORY = "image"
    DISPLAY_NAME = "Load Image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        files = folders.input_images() if folders is not None else []
        return {"required": {"image": (files, {"image_upload": True})}}

    @classmethod
    def VALIDATE_INPUTS(cls, folders, image):
        """ComfyUI: any existing file, 'sub/x.png' or 'x.png [output]' included, not only the listed ones."""
        try:
            folders.input_image_path(image)
        except InputError:
            return f"Invalid image file: {image}"
        return True

    @classmethod
    def IS_CHANGED(cls, folders, image=None, **_):
        return engine.file_sha256(folders.input_image_path(image))

    def load_image(self, image):
        return engine.load_image(self.ctx.folders.input_image_path(image))


class DiffusersLoader(Node):
    """ComfyUI's deprecated DiffusersLoader: a diffusers-format folder under models/diffusers (model_index.json,
    transformer/, vae/, text_encoder*/) as MODEL, CLIP and VAE, through the loaders that read diffusers layouts."""

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = "advanced/loaders/deprecated"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model_path": (folders.diffusers_models() if folders is not None else [],)}}

    def load_checkpoint(self, model_path, output_vae=True, output_clip=True):
        path = self.ctx.folders.diffusers_model_path(model_path)
        model, clip, vae = engine.load_checkpoint(path, self.ctx.device, self.ctx.dtype, self.ctx.engine_options,
                                                  text_encoders=bool(output_clip))
        return model, clip, vae if output_vae else None


class LoadImageOutput(LoadImage):
    """ComfyUI's LoadImageOutput (comfy_extras/nodes_images.py): LoadImage over the output folder's images
    ('name.png [output]'); any existing annotated file validates, as LoadImage."""

    DESCRIPTION = ("Load an image from the output folder. When the refresh button is clicked, the node will update "
                   "the image list and automatically select the first image, allowing for easy iteration.")
    DISPLAY_NAME = "Load Image (from Outputs)"
    EXPERIMENTAL = True
    PYTHON_MODULE = "comfy_extras.nodes_images"

    @classmethod
    def INPUT_TYPES(cls, folders):
        files = [f"{n} [output]" for n in folders.output_images()] if folders is not None else []
        return {"required": {"image": (files, {"image_upload": True, "image_folder": "output", "remote": {
            "route": "/internal/files/output", "refresh_button": True, "control_after_refresh": "first"}})}}


class SaveImage(Node):
    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    DISPLAY_NAME = "Save Image"
    FOLDER_TYPE = "output"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {
            "required": {
                "images": ("IMAGE", _tip("The images to save.")),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": (
                    "The prefix for the file to save. This may include formatting information such as "
                    "%date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes.")}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        saved = engine.save_images(images, self.ctx.folders.output_dir, filename_prefix, prompt, extra_pnginfo,
                                   folder_type="output", compress_level=4)
        return {"ui": {"images": saved}}


class PreviewImage(SaveImage):
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    DISPLAY_NAME = "Preview Image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        prefix = "ComfyUI_temp" + engine.random_suffix(5)  # ComfyUI: "ComfyUI" + "_temp_" + 5 letters
        saved = engine.save_images(images, self.ctx.folders.temp_dir, prefix, prompt, extra_pnginfo,
                                   folder_type="temp", compress_level=1)
        return {"ui": {"images": saved}}


class SaveImageWebsocket(Node):
    """ComfyUI's SaveImageWebsocket (custom_nodes/websocket_image_save.py, in every ComfyUI install): each image
    as a PNG preview frame on /ws (8-byte header: event 1, format 2), nothing written to disk, no metadata.
    script_examples/websockets_api_example_ws_images.py reads images this way."""

    RETURN_TYPES = ()
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    PYTHON_MODULE = "custom_nodes.websocket_image_save"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"images": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, folders, **inputs):
        return time.time()  # ComfyUI: never served from the cache, the frames go out on every run

    def save_images(self, images):
        from PIL import Image

        for step, image in enumerate(images):  # [H, W, C]
            buf = io.BytesIO()  # PNG at compress_level 1: ComfyUI's send_image
            Image.fromarray(engine.pixels_uint8(image)).save(buf, format="PNG", compress_level=1)
            self.ctx.image_frame(step, images.shape[0], buf.getvalue(), "PNG")
        return {}


NODE_CLASS_MAPPINGS: dict[str, type[Node]] = {
    cls.__name__: cls
    for cls in (
        CheckpointLoaderSimple, UNETLoader, VAELoader, TripleCLIPLoader, DualCLIPLoader, CLIPLoader, CLIPTextEncode,
        CLIPSetLastLayer, CLIPTextEncodeSD3, ConditioningZeroOut, ConditioningCombine, ConditioningSetTimestepRange,
        ConditioningAverage, ConditioningConcat, EmptyLatentImage, EmptySD3LatentImage, ModelSamplingSD3,
        SkipLayerGuidanceSD3, KSampler, KSamplerAdvanced, VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled, LoadImage, SaveImage,
        PreviewImage, SaveImageWebsocket, LoraLoader, LoraLoaderModelOnly, LoadImageOutput, DiffusersLoader,
    )
}
NODE_CLASS_MAPPINGS.update(CONTROL_NODES)
NODE_CLASS_MAPPINGS.update(SAMPLING_NODES)
NODE_CLASS_MAPPINGS.update(SIGMAS_NODES)
NODE_CLASS_MAPPINGS.update(AREA_NODES)
NODE_CLASS_MAPPINGS.update(UPSCALE_NODES)
NODE_CLASS_MAPPINGS.update(IMAGE_NODES)
NODE_CLASS_MAPPINGS.update(LATENT_OPS_NODES)
NODE_CLASS_MAPPINGS.update(LATENT_OPERATION_NODES)
NODE_CLASS_MAPPINGS.update(STRING_NODES)
NODE_CLASS_MAPPINGS.update(GUIDANCE_NODES)
NODE_CLASS_MAPPINGS.update(LATENT_FILE_NODES)
NODE_CLASS_MAPPINGS.update(LATENT_NODES)
NODE_CLASS_MAPPINGS.update(INPAINT_NODES)
NODE_CLASS_MAPPINGS.update(PRIMITIVE_NODES)
NODE_CLASS_MAPPINGS.update(MASK_NODES)
NODE_CLASS_MAPPINGS.update(MERGE_NODES)
NODE_CLASS_MAPPINGS.update(IMAGE_EXTRA_NODES)
NODE_CLASS_MAPPINGS.update(PREVIEW_ANY_NODES)
NODE_CLASS_MAPPINGS.update(CACHE_NODES)
NODE_CLASS_MAPPINGS.update(UTILITY_NODES)


def object_info(folders: ModelFolders | None = None,
                classes: dict[str, type[Node]] | None = None) -> dict[str, dict[str, Any]]:
    """ComfyUI's GET /object_info body, generated from the definitions (JSON-ready: lists, not tuples)."""
    classes = NODE_CLASS_MAPPINGS if classes is None else classes
    return {name: node_info(name, cls, folders) for name, cls in classes.items()}


def node_info(name: str, cls: type[Node], folders: ModelFolders | None = None) -> dict[str, Any]:
    inputs = cls.INPUT_TYPES(folders)
    info: dict[str, Any] = {
        "input": _jsonable(inputs),
        "input_order": {section: list(spec) for section, spec in inputs.items()},
        "output": list(cls.RETURN_TYPES),
        "output_is_list": list(cls.OUTPUT_IS_LIST) if cls.OUTPUT_IS_LIST is not None
        else [False] * len(cls.RETURN_TYPES),
        "output_name": list(cls.RETURN_NAMES) if cls.RETURN_NAMES is not None else list(cls.RETURN_TYPES),
        "name": name,
        "display_name": cls.DISPLAY_NAME or name,
        "description": cls.DESCRIPTION,
        "python_module": cls.PYTHON_MODULE,
        "category": cls.CATEGORY,
        "output_node": bool(cls.OUTPUT_NODE),
    }
    if cls.OUTPUT_TOOLTIPS is not None:
        info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
    if cls.DEPRECATED:
        info["deprecated"] = True
    if cls.EXPERIMENTAL:
        info["experimental"] = True
    return info


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
