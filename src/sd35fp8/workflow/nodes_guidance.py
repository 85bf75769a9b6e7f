"""ComfyUI's MODEL patch nodes: TorchCompileModel (comfy_extras/nodes_torch_compile.py); skip-layer guidance
(comfy_extras/nodes_slg.py: SkipLayerGuidanceDiT, an extra cond pass without some joint blocks, with its
rescaling; SkipLayerGuidanceDiTSimple, the uncond pass without them); RescaleCFG (comfy_extras/nodes_model_advanced.py:
the CFG result's std rescaled to the cond prediction's, computed as ComfyUI does for every model); and the post-CFG
patches (comfy_extras/nodes_cfg.py): CFGZeroStar (CFG-Zero*, arXiv 2503.18886,
evaluated on SD3 / SD3.5: the uncond prediction rescaled by its projection onto the cond one) and CFGNorm (the
guided prediction's channel norm capped at the cond prediction's); Mahiro (comfy_extras/nodes_mahiro.py, post-CFG)
and APG (comfy_extras/nodes_apg.py, Adaptive Projected Guidance, a pre-CFG function). Each adds its function to
the MODEL's patch list, after the ones already there (SkipLayerGuidanceSD3 is one too); the denoiser runs them in
that order (sampling/guidance.py CFGDenoiser._pre, _finish)."""

from __future__ import annotations

import logging
from dataclasses import replace

from sd35fp8.sampling.guidance import APG as APGGuidance
from sd35fp8.workflow import engine
from sd35fp8.workflow.node_base import Node
from sd35fp8.workflow.nodes_image import check_widgets

log = logging.getLogger(__name__)


class CFGZeroStar(Node):
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("patched_model",)
    FUNCTION = "patch"
    CATEGORY = "advanced/guidance"
    PYTHON_MODULE = "comfy_extras.nodes_cfg"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        return (replace(model, post_cfg=model.post_cfg + (("cfg_zero_star",),)),)


class CFGNorm(Node):
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("patched_model",)
    FUNCTION = "patch"
    CATEGORY = "advanced/guidance"
    PYTHON_MODULE = "comfy_extras.nodes_cfg"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01})}}

    def patch(self, model, strength):
        return (replace(model, post_cfg=model.post_cfg + (("cfg_norm", float(strength)),)),)


class TorchCompileModel(Node):
    """Accepted so shared workflows that carry it run: sd35fp8's MMDiT engine already runs its fused FP8 step
    compiled with CUDA graphs wherever the server / `run` compiles (on CUDA by default; `--no-compile` turns it
    off), so the MODEL passes through unchanged whichever backend is named."""

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing"
    PYTHON_MODULE = "comfy_extras.nodes_torch_compile"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "backend": (["inductor", "cudagraphs"],)}}

    def patch(self, model, backend):
        state = "compiled" if self.ctx.engine_options.compile else "not compiled (--no-compile / the CPU)"
        log.info("TorchCompileModel (%s): the engine's step is %s; the MODEL is unchanged", backend, state)
        return (model,)


SLG_LAYERS = ("STRING", {"default": "7, 8, 9", "multiline": False})
SLG_WINDOW = {  # the scale and sigma window of SkipLayerGuidanceDiT and SkipLayerGuidanceSD3
    "scale": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 10.0, "step": 0.1}),
    "start_percent": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001}),
    "end_percent": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 1.0, "step": 0.001}),
}


class SkipLayerGuidanceDiT(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "skip_guidance"
    CATEGORY = "advanced/guidance"
    DESCRIPTION = "Generic version of SkipLayerGuidance node that can be used on every DiT model."
    PYTHON_MODULE = "comfy_extras.nodes_slg"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "double_layers": SLG_LAYERS,
            "single_layers": SLG_LAYERS,
            **SLG_WINDOW,
            "rescaling_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    def skip_guidance(self, model, scale, start_percent, end_percent, double_layers="", single_layers="",
                      rescaling_scale=0.0):
        return (engine.with_skip_layer_guidance(model, double_layers, scale, start_percent, end_percent,
                                                rescaling_scale=rescaling_scale, single_layers=single_layers),)


class SkipLayerGuidanceDiTSimple(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "skip_guidance"
    CATEGORY = "advanced/guidance"
    DESCRIPTION = "Simple version of the SkipLayerGuidanceDiT node that only modifies the uncond pass."
    PYTHON_MODULE = "comfy_extras.nodes_slg"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "double_layers": SLG_LAYERS,
            "single_layers": SLG_LAYERS,
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }}

    def skip_guidance(self, model, start_percent, end_percent, double_layers="", single_layers=""):
        return (engine.with_skip_layer_guidance(model, double_layers, 1.0, start_percent, end_percent,
                                                single_layers=single_layers, uncond_only=True),)


class RescaleCFG(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "advanced/model"
    PYTHON_MODULE = "comfy_extras.nodes_model_advanced"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",),
                             "multiplier": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01})}}

    def patch(self, model, multiplier):
        # the last CFG function set wins (ModelPatcher.set_model_sampler_cfg_function replaces)
        post = tuple(p for p in model.post_cfg if p[0] != "rescale_cfg") + (("rescale_cfg", float(multiplier)),)
        return (replace(model, post_cfg=post),)


class Mahiro(Node):
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("patched_model",)
    FUNCTION = "patch"
    CATEGORY = "_for_testing"
    DESCRIPTION = ("Modify the guidance to scale more on the 'direction' of the positive prompt rather than the "
                   "difference between the negative prompt.")
    DISPLAY_NAME = "Mahiro is so cute that she deserves a better guidance function!! (。・ω・。)"
    PYTHON_MODULE = "comfy_extras.nodes_mahiro"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        """A post-CFG function (set_model_sampler_post_cfg_function), after the ones already there."""
        return (replace(model, post_cfg=model.post_cfg + (("mahiro",),)),)


class APG(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "sampling/custom_sampling"
    DISPLAY_NAME = "Adaptive Projected Guidance"
    PYTHON_MODULE = "comfy_extras.nodes_apg"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "eta": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                              "tooltip": "Controls the scale of the parallel guidance vector. Default CFG behavior "
                                         "at a setting of 1."}),
            "norm_threshold": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 50.0, "step": 0.1,
                                         "tooltip": "Normalize guidance vector to this value, normalization disable "
                                                    "at a setting of 0."}),
            "momentum": ("FLOAT", {"default": 0.0, "min": -5.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Controls a running average of guidance during diffusion, disabled at a "
                                              "setting of 0."}),
        }}

    def patch(self, model, eta, norm_threshold, momentum):
        """A pre-CFG function (set_model_sampler_pre_cfg_function), after the ones already there. Its running
        average and previous sigma live in the APG object made here, as in ComfyUI's closure: one per execution of
        this node, shared by every sampling run of the MODEL it returns (sampling.guidance.APG)."""
        check_widgets(APG, eta=eta, norm_threshold=norm_threshold, momentum=momentum)
        apg = APGGuidance(eta=float(eta), norm_threshold=float(norm_threshold), momentum=float(momentum))
        return (replace(model, post_cfg=model.post_cfg + (("pre_cfg", apg),)),)


GUIDANCE_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    CFGZeroStar, CFGNorm, TorchCompileModel, SkipLayerGuidanceDiT,
    SkipLayerGuidanceDiTSimple, RescaleCFG, Mahiro, APG)}
