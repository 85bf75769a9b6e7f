"""ComfyUI's area and mask conditioning nodes (nodes.py): ConditioningSetArea, ConditioningSetAreaPercentage,
ConditioningSetAreaStrength, ConditioningSetMask. They only record their values on each CONDITIONING entry (as
node_helpers.conditioning_set_values); the denoiser acts on them (sampling/regions.py)."""

from __future__ import annotations

import torch

from sd35fp8.errors import InputError
from sd35fp8.workflow.node_base import MAX_RESOLUTION, Node

_STRENGTH = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})


def set_values(conditioning: list, values: dict) -> list:
    """Every entry of a CONDITIONING with `values` added to its dict (node_helpers.conditioning_set_values)."""
    return [[cond, {**extra, **values}] for cond, extra in conditioning]


class _AreaNode(Node):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "conditioning"


class ConditioningSetArea(_AreaNode):
    @classmethod
    def INPUT_TYPES(cls, folders):
        size = {"default": 64, "min": 64, "max": MAX_RESOLUTION, "step": 8}
        pos = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}
        return {"required": {"conditioning": ("CONDITIONING",), "width": ("INT", size), "height": ("INT", size),
                             "x": ("INT", pos), "y": ("INT", pos), "strength": _STRENGTH}}

    def append(self, conditioning, width, height, x, y, strength):
        area = (height // 8, width // 8, y // 8, x // 8)  # latent pixels
        return (set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaPercentage(_AreaNode):
    @classmethod
    def INPUT_TYPES(cls, folders):
        frac = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {"required": {"conditioning": ("CONDITIONING",), "width": ("FLOAT", {"default": 1.0, **frac}),
                             "height": ("FLOAT", {"default": 1.0, **frac}), "x": ("FLOAT", {"default": 0.0, **frac}),
                             "y": ("FLOAT", {"default": 0.0, **frac}), "strength": _STRENGTH}}

    def append(self, conditioning, width, height, x, y, strength):
        area = ("percentage", height, width, y, x)
        return (set_values(conditioning, {"area": area, "strength": strength, "set_area_to_bounds": False}),)


class ConditioningSetAreaStrength(_AreaNode):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"conditioning": ("CONDITIONING",), "strength": _STRENGTH}}

    def append(self, conditioning, strength):
        return (set_values(conditioning, {"strength": strength}),)


class ConditioningSetMask(_AreaNode):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"conditioning": ("CONDITIONING",), "mask": ("MASK",), "strength": _STRENGTH,
                             "set_cond_area": (["default", "mask bounds"],)}}

    def append(self, conditioning, mask, strength, set_cond_area):
        if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or 0 in mask.shape:
            raise InputError(f"ConditioningSetMask: mask must be [H, W] or [B, H, W], got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        return (set_values(conditioning, {"mask": mask, "set_area_to_bounds": set_cond_area != "default",
                                          "mask_strength": strength}),)


AREA_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    ConditioningSetArea, ConditioningSetAreaPercentage, ConditioningSetAreaStrength, ConditioningSetMask,
)}
