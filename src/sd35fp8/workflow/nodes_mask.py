"""ComfyUI's mask and composite nodes (comfy_extras/nodes_mask.py), with its inputs, outputs and math: the
building blocks of shared inpainting and outpainting workflows.

MASK is [B, H, W] in 0..1 (a 2-D mask is taken as one of a batch); IMAGE [B, H, W, C]; LATENT {"samples": [B, C,
h, w]}. GrowMask's grey dilation / erosion over a 3x3 cross (tapered corners) or square is a max / min over the
footprint's in-bounds neighbours, which is what scipy.ndimage's "reflect" border gives. MaskPreview saves the mask as a
grey PNG into the temp folder, as PreviewImage does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sd35fp8.errors import InputError
from sd35fp8.image_ops import repeat_to_batch_size
from sd35fp8.workflow import engine
from sd35fp8.workflow.node_base import MAX_RESOLUTION, Node

CHANNELS = ["red", "green", "blue", "alpha"]
OPERATIONS = ["multiply", "add", "subtract", "and", "or", "xor"]


def _batch(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape((-1, mask.shape[-2], mask.shape[-1]))


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int, mask: torch.Tensor | None = None,
              multiplier: int = 8, resize_source: bool = False) -> torch.Tensor:
    """ComfyUI's composite: `source` [B, C, h, w] pasted into `destination` (in place) at (x, y) / multiplier,
    through `mask` (resized to the source) where given, clipped to the destination."""
    source = source.to(destination.device)
    if resize_source:
        source = F.interpolate(source, size=(destination.shape[2], destination.shape[3]), mode="bilinear")
    source = repeat_to_batch_size(source, destination.shape[0])
    x = max(-source.shape[3] * multiplier, min(x, destination.shape[3] * multiplier))
    y = max(-source.shape[2] * multiplier, min(y, destination.shape[2] * multiplier))
    left, top = x // multiplier, y // multiplier
    right, bottom = left + source.shape[3], top + source.shape[2]
    if mask is None:
        mask = torch.ones_like(source)
    else:
        mask = mask.to(destination.device, copy=True)
        mask = F.interpolate(mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])),
                             size=(source.shape[2], source.shape[3]), mode="bilinear")
        mask = repeat_to_batch_size(mask, source.shape[0])
    visible_width, visible_height = destination.shape[3] - left + min(0, x), destination.shape[2] - top + min(0, y)
    mask = mask[:, :, :visible_height, :visible_width]
    source_portion = mask * source[:, :, :visible_height, :visible_width]
    destination_portion = (torch.ones_like(mask) - mask) * destination[:, :, top:bottom, left:right]
    destination[:, :, top:bottom, left:right] = source_portion + destination_portion
    return destination


def _footprint_extreme(m: torch.Tensor, tapered: bool, grow: bool) -> torch.Tensor:
    """One grey dilation (grow) or erosion of a [H, W] mask over the 3x3 cross (tapered) or square."""
    fill = float("-inf") if grow else float("inf")
    p = F.pad(m[None, None], (1, 1, 1, 1), value=fill)[0, 0]
    h, w = m.shape
    offsets = [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)] if tapered else [(a, b) for a in range(3) for b in range(3)]
    stack = torch.stack([p[a:a + h, b:b + w] for a, b in offsets])
    return stack.amax(0) if grow else stack.amin(0)


class LatentCompositeMasked(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "composite"
    CATEGORY = "latent"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "destination": ("LATENT",), "source": ("LATENT",),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "resize_source": ("BOOLEAN", {"default": False}),
        }, "optional": {"mask": ("MASK",)}}

    def composite(self, destination, source, x, y, resize_source, mask=None):
        output = dict(destination)
        output["samples"] = composite(destination["samples"].clone(), source["samples"], x, y, mask, 8, resize_source)
        return (output,)


class ImageCompositeMasked(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "composite"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "destination": ("IMAGE",), "source": ("IMAGE",),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "resize_source": ("BOOLEAN", {"default": False}),
        }, "optional": {"mask": ("MASK",)}}

    def composite(self, destination, source, x, y, resize_source, mask=None):
        if destination.shape[-1] < source.shape[-1]:  # node_helpers.image_alpha_fix
            source = source[..., :destination.shape[-1]]
        elif destination.shape[-1] > source.shape[-1]:
            source = F.pad(source, (0, 1))
            source[..., -1] = 1.0
        out = composite(destination.clone().movedim(-1, 1), source.movedim(-1, 1), x, y, mask, 1, resize_source)
        return (out.movedim(1, -1),)


class MaskToImage(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "mask_to_image"
    CATEGORY = "mask"
    DISPLAY_NAME = "Convert Mask to Image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"mask": ("MASK",)}}

    def mask_to_image(self, mask):
        return (mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3),)


class ImageToMask(Node):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"
    DISPLAY_NAME = "Convert Image to Mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",), "channel": (CHANNELS,)}}

    def image_to_mask(self, image, channel):
        index = CHANNELS.index(channel)
        if index >= image.shape[-1]:

            raise InputError(f"ImageToMask: the image has {image.shape[-1]} channels, no {channel}")
        return (image[:, :, :, index],)


class ImageColorToMask(Node):
    """1.0 where a pixel's 8-bit RGB, as the integer (r << 16) + (g << 8) + b, equals `color`; 0.0 elsewhere (ComfyUI
    rounds each channel of the clamped image times 255)."""

    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        color = ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "number"})
        return {"required": {"image": ("IMAGE",), "color": color}}

    def image_to_mask(self, image, color):
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InputError(f"ImageColorToMask: image must be an IMAGE [B, H, W, C] with 3 or 4 channels, got {got}")
        rgb = (torch.clamp(image, 0, 1.0) * 255.0).round().to(torch.int)  # [B, H, W, C] in 0..255
        packed = torch.bitwise_left_shift(rgb[:, :, :, 0], 16) + torch.bitwise_left_shift(rgb[:, :, :, 1], 8) \
            + rgb[:, :, :, 2]  # [B, H, W]
        return (torch.where(packed == color, 1.0, 0).float(),)


class SolidMask(Node):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "solid"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
        }}

    def solid(self, value, width, height):
        return (torch.full((1, height, width), value, dtype=torch.float32),)


class InvertMask(Node):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "invert"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"mask": ("MASK",)}}

    def invert(self, mask):
        return (1.0 - mask,)


class CropMask(Node):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "crop"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "mask": ("MASK",),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
        }}

    def crop(self, mask, x, y, width, height):
        return (_batch(mask)[:, y:y + height, x:x + width],)


class MaskComposite(Node):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "combine"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "destination": ("MASK",), "source": ("MASK",),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "operation": (OPERATIONS,),
        }}

    def combine(self, destination, source, x, y, operation):
        output, source = _batch(destination).clone(), _batch(source)
        if output.shape[0] != source.shape[0]:  # one mask against a batch: every item (ComfyUI fails here)
            if min(output.shape[0], source.shape[0]) != 1:
                raise InputError(f"MaskComposite: {output.shape[0]} destination masks and {source.shape[0]} source "
                                 "masks; give one of them a single mask or both the same number")
            n = max(output.shape[0], source.shape[0])
            output, source = output.expand(n, -1, -1).clone(), source.expand(n, -1, -1)
        right = min(x + source.shape[-1], output.shape[-1])
        bottom = min(y + source.shape[-2], output.shape[-2])
        if right <= x or bottom <= y:  # the source lies outside the destination
            return (torch.clamp(output, 0.0, 1.0),)
        src = source[:, :bottom - y, :right - x]
        dst = output[:, y:bottom, x:right]
        if operation == "multiply":
            value = dst * src
        elif operation == "add":
            value = dst + src
        elif operation == "subtract":
            value = dst - src
        else:
            op = {"and": torch.bitwise_and, "or": torch.bitwise_or, "xor": torch.bitwise_xor}[operation]
            value = op(dst.round().bool(), src.round().bool()).float()
        output[:, y:bottom, x:right] = value
        return (torch.clamp(output, 0.0, 1.0),)


class FeatherMask(Node):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "feather"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        side = ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1})
        return {"required": {"mask": ("MASK",), "left": side, "top": side, "right": side, "bottom": side}}

    def feather(self, mask, left, top, right, bottom):
        """ComfyUI's linear ramps, its indexing included (the right and bottom ramps start at index -0 = 0)."""
        output = _batch(mask).clone()
        left, right = min(left, output.shape[-1]), min(right, output.shape[-1])
        top, bottom = min(top, output.shape[-2]), min(bottom, output.shape[-2])
        for x in range(left):
            output[:, :, x] *= (x + 1.0) / left
        for x in range(right):
            output[:, :, -x] *= (x + 1) / right
        for y in range(top):
            output[:, y, :] *= (y + 1) / top
        for y in range(bottom):
            output[:, -y, :] *= (y + 1) / bottom
        return (output,)


class GrowMask(Node):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "expand_mask"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "mask": ("MASK",),
            "expand": ("INT", {"default": 0, "min": -MAX_RESOLUTION, "max": MAX_RESOLUTION, "step": 1}),
            "tapered_corners": ("BOOLEAN", {"default": True}),
        }}

    def expand_mask(self, mask, expand, tapered_corners):
        out = []
        for m in _batch(mask).float():
            for _ in range(min(abs(expand), sum(m.shape))):  # past H + W steps nothing changes any more
                m = _footprint_extreme(m, tapered_corners, grow=expand > 0)
            out.append(m)
        return (torch.stack(out, dim=0),)


class ThresholdMask(Node):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "image_to_mask"
    CATEGORY = "mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"mask": ("MASK",),
                             "value": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01})}}

    def image_to_mask(self, mask, value):
        return ((mask > value).float(),)


class MaskPreview(Node):
    """The mask as a grey image [B, H, W, 3] saved into the temp folder (ComfyUI's UI.PreviewMask: PreviewImage's
    "ComfyUI_temp_" + 5 random letters prefix, PNG compress level 1, the prompt and workflow as metadata)."""

    RETURN_TYPES = ()
    FUNCTION = "execute"
    OUTPUT_NODE = True
    CATEGORY = "mask"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    DISPLAY_NAME = "Preview Mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"mask": ("MASK",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def execute(self, mask, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        if not isinstance(mask, torch.Tensor) or mask.ndim < 2 or 0 in mask.shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise InputError(f"MaskPreview: mask must be a MASK [B, H, W], got {got}")
        preview = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1)  # [B, H, W, 1]
        preview = preview.expand(-1, -1, -1, 3)  # [B, H, W, 3] grey
        prefix = "ComfyUI_temp" + engine.random_suffix(5)
        saved = engine.save_images(preview, self.ctx.folders.temp_dir, prefix, prompt, extra_pnginfo,
                                   folder_type="temp", compress_level=1)
        return {"ui": {"images": saved, "animated": (False,)}}


MASK_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    LatentCompositeMasked, ImageCompositeMasked, MaskToImage, ImageToMask, SolidMask, InvertMask, CropMask,
    MaskComposite, FeatherMask, GrowMask, ThresholdMask, ImageColorToMask, MaskPreview,
)}
for _cls in MASK_NODES.values():
    _cls.PYTHON_MODULE = "comfy_extras.nodes_mask"
