"""ComfyUI's model merging nodes (comfy_extras/nodes_model_merging.py, nodes_model_merging_model_specific.py):
ModelMergeSimple, ModelMergeBlocks, ModelMergeSubtract, ModelMergeAdd, ModelMergeSD3_2B, ModelMergeSD35_Large,
CLIPMergeSimple / Subtract / Add, and the save nodes (ModelSave, CheckpointSave, CLIPSave, VAESave: ComfyUI's file layouts, LoRAs baked in), with
ComfyUI's inputs and arithmetic (checkpoints/merge.py). Each merge builds a new engine from the
merged weights in model1's FP8 mode (workflow/engine.merge_models), so a merged Large model holds its own copy of
the weights while both inputs stay loaded, as the executor caches them.
"""

from __future__ import annotations

from sd35fp8.checkpoints.merge import block_strengths, ratio_strengths
from sd35fp8.workflow import engine
from sd35fp8.workflow.node_base import Node

RATIO = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})


class _Merge(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging"
    PYTHON_MODULE = "comfy_extras.nodes_model_merging"

    def _merged(self, model1, model2, strengths):
        return (engine.merge_models(model1, model2, strengths, type(self).__name__, self.ctx.device, self.ctx.dtype,
                                    self.ctx.engine_options),)


class ModelMergeSimple(_Merge):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",), "ratio": RATIO}}

    def merge(self, model1, model2, ratio):
        return self._merged(model1, model2, ratio_strengths(float(ratio)))


class ModelMergeBlocks(_Merge):
    """Each weight takes the ratio of the longest input name its key starts with (UNet block names: for an SD3
    MMDiT none matches, so every weight takes the first one's)."""

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",), "input": RATIO, "middle": RATIO,
                             "out": RATIO}}

    def merge(self, model1, model2, **ratios):
        return self._merged(model1, model2, block_strengths({k: float(v) for k, v in ratios.items()}))


class ModelMergeSubtract(_Merge):
    """model1 - model2, scaled: add_patches(model2, -multiplier, multiplier) = (w1 - w2) * multiplier."""

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",),
                             "multiplier": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    def merge(self, model1, model2, multiplier):
        m = float(multiplier)
        return self._merged(model1, model2, lambda key: (-m, m))


class ModelMergeAdd(_Merge):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model1": ("MODEL",), "model2": ("MODEL",)}}

    def merge(self, model1, model2):
        return self._merged(model1, model2, lambda key: (1.0, 1.0))


def _sd3_blocks(depth: int) -> dict:
    """The model-specific nodes' inputs: the embedders, each joint block, the final layer (key prefixes)."""
    names = ["pos_embed.", "x_embedder.", "context_embedder.", "y_embedder.", "t_embedder."]
    names += [f"joint_blocks.{i}." for i in range(depth)] + ["final_layer."]
    return {"model1": ("MODEL",), "model2": ("MODEL",), **{n: RATIO for n in names}}


class ModelMergeSD3_2B(ModelMergeBlocks):
    CATEGORY = "advanced/model_merging/model_specific"
    PYTHON_MODULE = "comfy_extras.nodes_model_merging_model_specific"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": _sd3_blocks(24)}


class ModelMergeSD35_Large(ModelMergeSD3_2B):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": _sd3_blocks(38)}


class ModelSave(Node):
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "advanced/model_merging"
    PYTHON_MODULE = "comfy_extras.nodes_model_merging"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "filename_prefix": ("STRING", {"default": "diffusion_models/ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, model, filename_prefix, prompt=None, extra_pnginfo=None):
        engine.save_model(model, self.ctx.folders.output_dir, filename_prefix, prompt, extra_pnginfo)
        return {}


class _ClipMerge(Node):
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "merge"
    CATEGORY = "advanced/model_merging"
    PYTHON_MODULE = "comfy_extras.nodes_model_merging"


class CLIPMergeSimple(_ClipMerge):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"clip1": ("CLIP",), "clip2": ("CLIP",), "ratio": RATIO}}

    def merge(self, clip1, clip2, ratio):
        return (engine.merge_clips(clip1, clip2, ratio_strengths(float(ratio)), "CLIPMergeSimple"),)


class CLIPMergeSubtract(_ClipMerge):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"clip1": ("CLIP",), "clip2": ("CLIP",),
                             "multiplier": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01})}}

    def merge(self, clip1, clip2, multiplier):
        m = float(multiplier)
        return (engine.merge_clips(clip1, clip2, lambda key: (-m, m), "CLIPMergeSubtract"),)


class CLIPMergeAdd(_ClipMerge):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"clip1": ("CLIP",), "clip2": ("CLIP",)}}

    def merge(self, clip1, clip2):
        return (engine.merge_clips(clip1, clip2, lambda key: (1.0, 1.0), "CLIPMergeAdd"),)


class CheckpointSave(ModelSave):
    DISPLAY_NAME = "Save Checkpoint"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",),
                             "filename_prefix": ("STRING", {"default": "checkpoints/ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, model, clip, vae, filename_prefix, prompt=None, extra_pnginfo=None):
        engine.save_checkpoint(model, clip, vae, self.ctx.folders.output_dir, filename_prefix, prompt, extra_pnginfo)
        return {}


class CLIPSave(ModelSave):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"clip": ("CLIP",), "filename_prefix": ("STRING", {"default": "clip/ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, clip, filename_prefix, prompt=None, extra_pnginfo=None):
        engine.save_clip(clip, self.ctx.folders.output_dir, filename_prefix, prompt, extra_pnginfo)
        return {}


class VAESave(ModelSave):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"vae": ("VAE",), "filename_prefix": ("STRING", {"default": "vae/ComfyUI_vae"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, vae, filename_prefix, prompt=None, extra_pnginfo=None):
        engine.save_vae(vae, self.ctx.folders.output_dir, filename_prefix, prompt, extra_pnginfo)
        return {}


MERGE_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    ModelMergeSimple, ModelMergeBlocks, ModelMergeSubtract, ModelMergeAdd, ModelMergeSD3_2B, ModelMergeSD35_Large,
    CLIPMergeSimple, CLIPMergeSubtract, CLIPMergeAdd, ModelSave, CheckpointSave, CLIPSave, VAESave)}
