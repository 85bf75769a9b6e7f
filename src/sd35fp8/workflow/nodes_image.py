"""ComfyUI's image batch / transform nodes: LoadImageMask, ImageBatch, EmptyImage (nodes.py) and ImageCrop,
RepeatImageBatch, ImageFromBatch, ImageRotate, ImageFlip (comfy_extras/nodes_images.py), with their inputs,
outputs and arithmetic.

IMAGE is [B, H, W, C] float32 in 0..1, MASK [B, H, W]. Inputs ComfyUI's widgets bound (min / max, combo
lists) are checked again when a node runs, since a linked value skips the prompt validation: out of range is
an InputError naming the node and the input (`check_widgets`, also used by nodes_latent_ops). A node that
builds a batch from numbers (EmptyImage, RepeatImageBatch) also stays within image_ops.MAX_CANVAS_PIXELS.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sd35fp8.errors import InputError
from sd35fp8.image_ops import MAX_CANVAS_PIXELS, common_upscale
from sd35fp8.workflow import engine
from sd35fp8.workflow.node_base import MAX_RESOLUTION, Node

MASK_CHANNELS = ["alpha", "red", "green", "blue"]  # LoadImageMask's order (ImageToMask's differs)
ROTATIONS = ["none", "90 degrees", "180 degrees", "270 degrees"]
FLIP_METHODS = ["x-axis: vertically", "y-axis: horizontally"]


def check_widgets(cls: type[Node], **values: Any) -> None:
    """The values of `cls`'s INT / FLOAT / combo inputs within what its INPUT_TYPES allow (ComfyUI's prompt
    validation, which a linked value skips): InputError naming the node and the input otherwise."""
    spec = cls.INPUT_TYPES(None)
    for section in ("required", "optional"):
        for key, info in spec.get(section, {}).items():
            if key not in values:
                continue
            kind, opts, v = info[0], (info[1] if len(info) > 1 else {}), values[key]
            if kind in ("INT", "FLOAT"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise InputError(f"{cls.__name__}: {key} must be a finite number, got {v!r}")
                if kind == "INT" and not float(v).is_integer():
                    raise InputError(f"{cls.__name__}: {key} must be an integer, got {v!r}")
                lo, hi = opts.get("min", -math.inf), opts.get("max", math.inf)
                if not lo <= v <= hi:
                    raise InputError(f"{cls.__name__}: {key} {v} is outside {lo}..{hi}")
            elif isinstance(kind, list) and not opts.get("image_upload") and v not in kind:
                raise InputError(f"{cls.__name__}: {key} {v!r} is not one of {kind}")


def check_image(node: str, name: str, image: Any) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"{node}: {name} must be an IMAGE [B, H, W, C], got {got}")
    return image


def check_canvas(node: str, batch: int, height: int, width: int) -> None:
    if batch * height * width > MAX_CANVAS_PIXELS:
        raise InputError(f"{node}: {batch} images of {width}x{height} are more than {MAX_CANVAS_PIXELS} pixels")


def rotation_turns(rotation: str) -> int:
    """ComfyUI's quarter turns of a rotation name (by its leading number)."""
    for k, prefix in ((1, "90"), (2, "180"), (3, "270")):
        if rotation.startswith(prefix):
            return k
    return 0


def load_image_mask(path, channel: str) -> torch.Tensor:
    """LoadImageMask: one channel of the image's first frame as MASK [1, H, W] (0..1); alpha as 1 - alpha.
    An image that is not RGBA is converted to RGBA first (32-bit integer images scaled by 1/255 before)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            img = ImageOps.exif_transpose(opened)
            if img.getbands() != ("R", "G", "B", "A"):
                if img.mode == "I":
                    img = img.point(lambda v: v * (1 / 255))
                img = img.convert("RGBA")
            band = channel[0].upper()
            if band not in img.getbands():
                return torch.zeros((1, 64, 64), dtype=torch.float32)
            mask = torch.from_numpy(np.array(img.getchannel(band)).astype(np.float32) / 255.0)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"LoadImageMask: cannot read image {path.name!r}: {e}") from e
    if band == "A":
        mask = 1.0 - mask
    return mask.unsqueeze(0)


class LoadImageMask(Node):
    RETURN_TYPES = ("MASK",)
    FUNCTION = "load_image"
    CATEGORY = "mask"
    DISPLAY_NAME = "Load Image (as Mask)"

    @classmethod
    def INPUT_TYPES(cls, folders):
        files = folders.input_images() if folders is not None else []
        return {"required": {"image": (files, {"image_upload": True}), "channel": (list(MASK_CHANNELS),)}}

    @classmethod
    def VALIDATE_INPUTS(cls, folders, image):
        """As LoadImage: any existing file of the input folder ('sub/x.png', 'x.png [output]' too)."""
        try:
            folders.input_image_path(image)
        except (InputError, AttributeError):
            return f"Invalid image file: {image}"
        return True

    @classmethod
    def IS_CHANGED(cls, folders, image=None, **_):
        return engine.file_sha256(folders.input_image_path(image))

    def load_image(self, image, channel):
        check_widgets(LoadImageMask, channel=channel)
        return (load_image_mask(self.ctx.folders.input_image_path(image), channel),)


class ImageBatch(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "batch"
    CATEGORY = "image"
    DISPLAY_NAME = "Batch Images"
    DEPRECATED = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",)}}

    def batch(self, image1, image2):
        """image1's items then image2's; image2 brought to image1's size (bilinear, center crop). Where one has
        one channel less (RGB and RGBA), it gets an opaque alpha channel first."""
        check_image("ImageBatch", "image1", image1)
        check_image("ImageBatch", "image2", image2)
        c1, c2 = image1.shape[-1], image2.shape[-1]
        if c1 > c2:
            image2 = F.pad(image2, (0, 1), mode="constant", value=1.0)
        elif c2 > c1:
            image1 = F.pad(image1, (0, 1), mode="constant", value=1.0)
        if image1.shape[-1] != image2.shape[-1]:
            raise InputError(f"ImageBatch: cannot batch images of {c1} and {c2} channels")
        if image1.shape[1:] != image2.shape[1:]:
            image2 = common_upscale(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bilinear",
                                    "center").movedim(1, -1)
        return (torch.cat((image1, image2), dim=0),)


class EmptyImage(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "generate"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
        }}

    def generate(self, width, height, batch_size=1, color=0):
        """[batch_size, height, width, 3] of one colour, 0xRRGGBB, each byte / 255."""
        check_widgets(EmptyImage, width=width, height=height, batch_size=batch_size, color=color)
        width, height, batch_size, color = int(width), int(height), int(batch_size), int(color)
        check_canvas("EmptyImage", batch_size, height, width)
        rgb = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
        planes = [torch.full([batch_size, height, width, 1], v, dtype=torch.float32) for v in rgb]
        return (torch.cat(planes, dim=-1),)


class ImageCrop(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "crop"
    CATEGORY = "image/transform"
    DISPLAY_NAME = "Crop Image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "width": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 1, "max": MAX_RESOLUTION, "step": 1}),
            "x": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "y": ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
        }}

    def crop(self, image, width, height, x, y):
        """The width x height window at (x, y), cut at the image's edges; a corner past the image moves to its
        last row / column."""
        check_widgets(ImageCrop, width=width, height=height, x=x, y=y)
        check_image("ImageCrop", "image", image)
        x, y = min(int(x), image.shape[2] - 1), min(int(y), image.shape[1] - 1)
        return (image[:, y:y + int(height), x:x + int(width), :],)


class RepeatImageBatch(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "repeat"
    CATEGORY = "image/batch"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",), "amount": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    def repeat(self, image, amount):
        check_widgets(RepeatImageBatch, amount=amount)
        check_image("RepeatImageBatch", "image", image)
        check_canvas("RepeatImageBatch", image.shape[0] * int(amount), image.shape[1], image.shape[2])
        return (image.repeat((int(amount), 1, 1, 1)),)


class ImageFromBatch(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "frombatch"
    CATEGORY = "image/batch"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",), "batch_index": ("INT", {"default": 0, "min": 0, "max": 4095}),
                             "length": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    def frombatch(self, image, batch_index, length):
        """Items [batch_index, batch_index + length), both clipped to the batch (at least its last item)."""
        check_widgets(ImageFromBatch, batch_index=batch_index, length=length)
        check_image("ImageFromBatch", "image", image)
        batch_index = min(image.shape[0] - 1, int(batch_index))
        length = min(image.shape[0] - batch_index, int(length))
        return (image[batch_index:batch_index + length].clone(),)


class ImageRotate(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "rotate"
    CATEGORY = "image/transform"
    DISPLAY_NAME = "Rotate"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",), "rotation": (list(ROTATIONS),)}}

    def rotate(self, image, rotation):
        """Clockwise quarter turns (torch.rot90 from the width axis to the height axis)."""
        check_widgets(ImageRotate, rotation=rotation)
        check_image("ImageRotate", "image", image)
        return (torch.rot90(image, k=rotation_turns(rotation), dims=[2, 1]),)


class ImageFlip(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "flip"
    CATEGORY = "image/transform"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",), "flip_method": (list(FLIP_METHODS),)}}

    def flip(self, image, flip_method):
        """x-axis: rows reversed (upside down); y-axis: columns reversed (mirrored)."""
        check_widgets(ImageFlip, flip_method=flip_method)
        check_image("ImageFlip", "image", image)
        return (torch.flip(image, dims=[1] if flip_method.startswith("x") else [2]),)


class GetImageSize(Node):
    """The image's width, height and batch size (comfy_extras/nodes_images.py; its size text on the node is a web
    UI nicety not sent here)."""

    RETURN_TYPES = ("INT", "INT", "INT")
    RETURN_NAMES = ("width", "height", "batch_size")
    FUNCTION = "get_size"
    CATEGORY = "image"
    DISPLAY_NAME = "Get Image Size"
    DESCRIPTION = "Returns width and height of the image, and passes it through unchanged."

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",)}}

    def get_size(self, image):
        image = check_image("GetImageSize", "image", image)
        return (int(image.shape[2]), int(image.shape[1]), int(image.shape[0]))


class ImageScaleToMaxDimension(Node):
    """The image scaled so its longer side is `largest_size` (the other rounded to keep the aspect ratio; a square
    to largest_size both ways), comfy_extras/nodes_images.py; its method list keeps ComfyUI's repeated bilinear."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Scale Image to Max Dimension"
    METHODS = ["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"]

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",), "upscale_method": (cls.METHODS,),
                             "largest_size": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1})}}

    def upscale(self, image, upscale_method, largest_size):
        image = check_image("ImageScaleToMaxDimension", "image", image)
        height, width = image.shape[1], image.shape[2]
        if height > width:
            width, height = round((width / height) * largest_size), largest_size
        elif width > height:
            width, height = largest_size, round((height / width) * largest_size)
        else:
            width = height = largest_size
        check_canvas("ImageScaleToMaxDimension", image.shape[0], height, width)
        return (common_upscale(image.movedim(-1, 1), width, height, upscale_method, "disabled").movedim(1, -1),)


class ImageBlend(Node):
    """image1 blended with image2 (resized bicubic, centre-cropped, to image1's size when they differ) by a blend
    mode, then mixed by blend_factor and clamped (comfy_extras/nodes_post_processing.py Blend)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blend_images"
    CATEGORY = "image/postprocessing"
    DISPLAY_NAME = "Image Blend"
    MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image1": ("IMAGE",), "image2": ("IMAGE",),
                             "blend_factor": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
                             "blend_mode": (cls.MODES,)}}

    def blend_images(self, image1, image2, blend_factor, blend_mode):
        image1 = check_image("ImageBlend", "image1", image1)
        image2 = check_image("ImageBlend", "image2", image2)
        if image1.shape[-1] != image2.shape[-1]:
            raise InputError(f"ImageBlend: image1 has {image1.shape[-1]} channels, image2 {image2.shape[-1]}")
        if image1.shape != image2.shape:
            image2 = common_upscale(image2.movedim(-1, 1), image1.shape[2], image1.shape[1], "bicubic",
                                    "center").movedim(1, -1)
            if image2.shape[0] != image1.shape[0]:
                if image1.shape[0] % image2.shape[0]:
                    raise InputError(f"ImageBlend: {image2.shape[0]} images cannot blend into {image1.shape[0]}")
                image2 = image2.repeat(image1.shape[0] // image2.shape[0], 1, 1, 1)
        blended = self._mode(image1, image2, blend_mode)
        return (torch.clamp(image1 * (1 - blend_factor) + blended * blend_factor, 0, 1),)

    @staticmethod
    def _mode(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "normal":
            return b
        if mode == "multiply":
            return a * b
        if mode == "screen":
            return 1 - (1 - a) * (1 - b)
        if mode == "overlay":
            return torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
        if mode == "soft_light":
            g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
            return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a))
        if mode == "difference":
            return a - b
        raise InputError(f"ImageBlend: blend_mode {mode!r} is not one of {ImageBlend.MODES}")


IMAGE_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    LoadImageMask, ImageBatch, EmptyImage, ImageCrop, RepeatImageBatch, ImageFromBatch, ImageRotate, ImageFlip,
    GetImageSize, ImageScaleToMaxDimension, ImageBlend,
)}
ImageBlend.PYTHON_MODULE = "comfy_extras.nodes_post_processing"
for _cls in (ImageCrop, RepeatImageBatch, ImageFromBatch, ImageRotate, ImageFlip, GetImageSize, ImageScaleToMaxDimension):
    _cls.PYTHON_MODULE = "comfy_extras.nodes_images"
