"""ComfyUI's latent resize nodes (nodes.py LatentUpscale, LatentUpscaleBy): comfy.utils.common_upscale on
the latent, "bislerp" included (image_ops.bislerp, ComfyUI's slerp resampler). And
RepeatLatentBatch (nodes.py): the batch repeated `amount` times, its noise mask and batch_index with it."""

from __future__ import annotations

from sd35fp8.errors import InputError
from sd35fp8.image_ops import CROP_METHODS, repeat_to_batch_size
from sd35fp8.workflow.node_base import MAX_RESOLUTION, Node

LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]


def _upscale(samples, width: int, height: int, method: str, crop: str, node: str):
    from sd35fp8.image_ops import common_upscale

    if method not in LATENT_UPSCALE_METHODS:  # a linked value skips validation
        raise InputError(f"{node}: upscale_method {method!r} is not one of {LATENT_UPSCALE_METHODS}")
    return common_upscale(samples, width, height, method, crop)


class LatentUpscale(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"
    CATEGORY = "latent"
    DISPLAY_NAME = "Upscale Latent"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "samples": ("LATENT",),
            "upscale_method": (list(LATENT_UPSCALE_METHODS),),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "crop": (list(CROP_METHODS),),
        }}

    def upscale(self, samples, upscale_method, width, height, crop):
        if width == 0 and height == 0:
            return (samples,)
        z = samples["samples"]
        if width == 0:
            height = max(64, height)
            width = max(64, round(z.shape[-1] * height / z.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(z.shape[-2] * width / z.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        out = dict(samples)
        out["samples"] = _upscale(z, width // 8, height // 8, upscale_method, crop, "LatentUpscale")
        return (out,)


class LatentUpscaleBy(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "upscale"
    CATEGORY = "latent"
    DISPLAY_NAME = "Upscale Latent By"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "samples": ("LATENT",),
            "upscale_method": (list(LATENT_UPSCALE_METHODS),),
            "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}),
        }}

    def upscale(self, samples, upscale_method, scale_by):
        z = samples["samples"]
        out = dict(samples)
        out["samples"] = _upscale(z, round(z.shape[-1] * scale_by), round(z.shape[-2] * scale_by), upscale_method,
                                  "disabled", "LatentUpscaleBy")
        return (out,)


class RepeatLatentBatch(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "repeat"
    CATEGORY = "latent/batch"
    DISPLAY_NAME = "Repeat Latent Batch"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",), "amount": ("INT", {"default": 1, "min": 1, "max": 64})}}

    def repeat(self, samples, amount):
        """ComfyUI's: samples [B, C, h, w] -> [amount * B, ...]; a per-item noise mask is first brought to B
        items (cycled), then repeated; batch_index continues past the batch's own span for each copy."""
        z = samples["samples"]
        out = dict(samples)
        out["samples"] = z.repeat((amount, 1, 1, 1))
        masks = samples.get("noise_mask")
        if masks is not None and masks.shape[0] > 1:
            if masks.shape[0] < z.shape[0]:
                masks = repeat_to_batch_size(masks, z.shape[0])
            out["noise_mask"] = masks.repeat((amount, 1, 1, 1))
        if "batch_index" in samples:
            idx = list(samples["batch_index"])
            offset = max(idx) - min(idx) + 1
            out["batch_index"] = idx + [x + i * offset for i in range(1, amount) for x in idx]
        return (out,)


class LatentFromBatch(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "frombatch"
    CATEGORY = "latent/batch"
    DISPLAY_NAME = "Latent From Batch"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",), "batch_index": ("INT", {"default": 0, "min": 0, "max": 63}),
                             "length": ("INT", {"default": 1, "min": 1, "max": 64})}}

    def frombatch(self, samples, batch_index, length):
        """ComfyUI's: items [batch_index, batch_index + length) (clipped), their noise masks, and their batch_index
        (the KSampler then draws each item's noise as it would in the whole batch)."""
        z = samples["samples"]
        out = dict(samples)
        batch_index = min(z.shape[0] - 1, batch_index)
        length = min(z.shape[0] - batch_index, length)
        out["samples"] = z[batch_index:batch_index + length].clone()
        masks = samples.get("noise_mask")
        if masks is not None:
            if masks.shape[0] == 1:
                out["noise_mask"] = masks.clone()
            else:
                if masks.shape[0] < z.shape[0]:
                    masks = repeat_to_batch_size(masks, z.shape[0])
                out["noise_mask"] = masks[batch_index:batch_index + length].clone()
        if "batch_index" not in samples:
            out["batch_index"] = list(range(batch_index, batch_index + length))
        else:
            out["batch_index"] = list(samples["batch_index"])[batch_index:batch_index + length]
        return (out,)


LATENT_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (LatentUpscale, LatentUpscaleBy,
                                                                      RepeatLatentBatch, LatentFromBatch)}
