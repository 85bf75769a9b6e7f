"""ComfyUI's MODEL patch nodes: TorchCompileModel (comfy_extras/nodes_torch_compile.py), and the post-CFG patches
(comfy_extras/nodes_cfg.py): CFGZeroStar (CFG-Zero*, arXiv 2503.18886,
evaluated on SD3 / SD3.5: the uncond prediction rescaled by its projection onto the cond one) and CFGNorm (the
guided prediction's channel norm capped at the cond prediction's). Each adds its function to the MODEL's
post-CFG list, after the ones already there (SkipLayerGuidanceSD3 is one too); the denoiser runs them in that
order (sampling/guidance.py CFGDenoiser._finish)."""

from __future__ import annotations

import logging
from dataclasses import replace

from sd35fp8.workflow.node_base import Node

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


GUIDANCE_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (CFGZeroStar, CFGNorm, TorchCompileModel)}
