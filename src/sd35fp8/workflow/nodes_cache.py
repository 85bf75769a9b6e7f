"""ComfyUI's step-cache nodes (comfy_extras/nodes_easycache.py): EasyCache and LazyCache patch the MODEL so its
sampling runs skip evaluations (sampling/easycache.py), with ComfyUI's inputs, defaults, ranges and tooltips.
Every sampler that takes the MODEL (KSampler, KSamplerAdvanced, SamplerCustom(Advanced)) runs the cache; the last
cache node applied wins. The server does not batch prompts across a cached MODEL (its skips read the first rows)."""

from __future__ import annotations

from dataclasses import replace

from sd35fp8.sampling.easycache import ComfyCache
from sd35fp8.workflow.node_base import Node
from sd35fp8.workflow.nodes_image import check_widgets


def _inputs(kind: str) -> dict:
    return {"required": {
        "model": ("MODEL", {"tooltip": f"The model to add {kind} to."}),
        "reuse_threshold": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 3.0, "step": 0.01, "advanced": True,
                                      "tooltip": "The threshold for reusing cached steps."}),
        "start_percent": ("FLOAT", {"default": 0.15, "min": 0.0, "max": 1.0, "step": 0.01, "advanced": True,
                                    "tooltip": f"The relative sampling step to begin use of {kind}."}),
        "end_percent": ("FLOAT", {"default": 0.95, "min": 0.0, "max": 1.0, "step": 0.01, "advanced": True,
                                  "tooltip": f"The relative sampling step to end use of {kind}."}),
        "verbose": ("BOOLEAN", {"default": False, "advanced": True,
                                "tooltip": "Whether to log verbose information."}),
    }}


class _CacheNode(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "execute"
    CATEGORY = "advanced/debug"
    PYTHON_MODULE = "comfy_extras.nodes_easycache"
    EXPERIMENTAL = True
    KIND = ""

    @classmethod
    def INPUT_TYPES(cls, folders):
        return _inputs(cls.KIND)

    def execute(self, model, reuse_threshold, start_percent, end_percent, verbose):
        check_widgets(type(self), reuse_threshold=reuse_threshold, start_percent=start_percent,
                      end_percent=end_percent, verbose=verbose)
        cache = ComfyCache(self.KIND, float(reuse_threshold), float(start_percent), float(end_percent), bool(verbose))
        return (replace(model, step_cache=cache),)


class EasyCache(_CacheNode):
    DESCRIPTION = "Native EasyCache implementation."
    DISPLAY_NAME = "EasyCache"
    OUTPUT_TOOLTIPS = ("The model with EasyCache.",)
    KIND = "EasyCache"


class LazyCache(_CacheNode):
    DESCRIPTION = ("A homebrew version of EasyCache - even 'easier' version of EasyCache to implement. Overall works "
                   "worse than EasyCache, but better in some rare cases AND universal compatibility with everything "
                   "in ComfyUI.")
    DISPLAY_NAME = "LazyCache"
    OUTPUT_TOOLTIPS = ("The model with LazyCache.",)
    KIND = "LazyCache"


CACHE_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (EasyCache, LazyCache)}
