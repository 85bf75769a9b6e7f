"""More of ComfyUI's image nodes, with their inputs, outputs and arithmetic: ImageSharpen, ImageQuantize
(comfy_extras/nodes_post_processing.py), Morphology, ImageRGBToYUV, ImageYUVToRGB (comfy_extras/nodes_morphology.py),
PorterDuffImageComposite, SplitImageWithAlpha, JoinImageWithAlpha (comfy_extras/nodes_compositing.py) and
ImageStitch, ImageAddNoise (comfy_extras/nodes_images.py).

RebatchLatents and RebatchImages (comfy_extras/nodes_rebatch.py, in LIST_NODES too) take lists (INPUT_IS_LIST) and
give lists (OUTPUT_IS_LIST): the executor runs the nodes downstream once per item (workflow/lists.py).

IMAGE is [B, H, W, C] float in 0..1, MASK [B, H, W] (a 2-D mask is one of a batch). Where ComfyUI fails with an
exception (an empty image, channel counts that differ, a sharpen radius past the image's edge) the node raises an
InputError naming itself and the input. What a node builds stays within image_ops.MAX_CANVAS_PIXELS, and
Morphology's work within MORPHOLOGY_WORK.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sd35fp8.errors import InputError
from sd35fp8.image_ops import common_upscale, gaussian_kernel, repeat_to_batch_size
from sd35fp8.workflow.node_base import SEED_MAX, Node
from sd35fp8.workflow.nodes_image import check_canvas, check_image, check_widgets

QUANTIZE_DITHERS = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"]
MORPHOLOGY_OPERATIONS = ["erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat"]
PORTER_DUFF_MODES = ["ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN",
                     "MULTIPLY", "OVERLAY", "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT", "SRC_OVER", "XOR"]
STITCH_DIRECTIONS = ["right", "down", "left", "up"]
STITCH_COLORS = {"white": 1.0, "black": 0.0, "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}
# Morphology: element visits of its 1-D max / min passes (B * C * H * W * kernel length, summed); past it an
# InputError (about 3 s on two CPU cores). ComfyUI's k x k window costs k times more and runs out of memory sooner.
MORPHOLOGY_WORK = 1 << 32


def _image(node: str, name: str, image: Any) -> torch.Tensor:
    """An IMAGE [B, H, W, C] of floats with no empty dimension."""
    image = check_image(node, name, image)
    if not image.is_floating_point():
        raise InputError(f"{node}: {name} must be a float IMAGE, got {image.dtype}")
    if 0 in image.shape:
        raise InputError(f"{node}: {name} is empty: {tuple(image.shape)}")
    return image


def _mask(node: str, name: str, mask: Any) -> torch.Tensor:
    """A MASK as [B, H, W] of floats (a 2-D one as a batch of one), none of them empty."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"{node}: {name} must be a MASK [B, H, W], got {got}")
    if not mask.is_floating_point():
        raise InputError(f"{node}: {name} must be a float MASK, got {mask.dtype}")
    if 0 in mask.shape:
        raise InputError(f"{node}: {name} is empty: {tuple(mask.shape)}")
    return mask.reshape((-1, mask.shape[-2], mask.shape[-1]))


def _flag(node: str, name: str, value: Any) -> bool:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise InputError(f"{node}: {name} must be a BOOLEAN, got {value!r}")
    return bool(value)


# ---- comfy_extras/nodes_post_processing.py ---------------------------------------------------------------


class ImageSharpen(Node):
    """Unsharp kernel: the Gaussian times -(alpha * 10), its centre raised so the kernel sums to 1; reflect padding;
    the result clamped to 0..1 (ComfyUI's Sharpen)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "sharpen"
    CATEGORY = "image/postprocessing"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "sharpen_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01}),
            "alpha": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01}),
        }}

    def sharpen(self, image, sharpen_radius, sigma, alpha):
        check_widgets(ImageSharpen, sharpen_radius=sharpen_radius, sigma=sigma, alpha=alpha)
        image = _image("ImageSharpen", "image", image)
        r = int(sharpen_radius)
        if r >= min(image.shape[1], image.shape[2]):  # reflect padding needs the image wider than the pad
            raise InputError(f"ImageSharpen: sharpen_radius {r} needs an image larger than {r} px each way, "
                             f"got {image.shape[2]}x{image.shape[1]}")
        channels, size = image.shape[-1], 2 * r + 1
        kernel = (gaussian_kernel(size, sigma, device=image.device) * -(alpha * 10)).to(image.dtype)
        kernel[r, r] = kernel[r, r] - kernel.sum() + 1.0
        kernel = kernel.repeat(channels, 1, 1).unsqueeze(1)  # [C, 1, k, k]
        # ComfyUI convolves the reflect-padded image with zero padding and cuts the border off again: the same as
        # a convolution of the padded image without padding.
        padded = F.pad(image.movedim(-1, 1), (r, r, r, r), "reflect")
        return (torch.clamp(F.conv2d(padded, kernel, groups=channels).movedim(1, -1), 0, 1),)


def _bayer_matrix(n: int) -> np.ndarray:
    """ComfyUI's normalized_bayer_matrix: the 2^n x 2^n ordered-dither thresholds, centred on 0."""
    if n == 0:
        return np.zeros((1, 1), "float32")
    q = 4 ** n
    m = q * _bayer_matrix(n - 1)
    return np.block([[m - 1.5, m + 0.5], [m + 1.5, m - 0.5]]) / q


class ImageQuantize(Node):
    """Each image reduced to `colors` colours of the palette PIL's quantize (median cut) picks for it, mapped
    without dither, with Floyd-Steinberg, or with a Bayer ordered dither of 2..16 (ComfyUI's Quantize)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "quantize"
    CATEGORY = "image/postprocessing"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "colors": ("INT", {"default": 256, "min": 1, "max": 256, "step": 1}),
            "dither": (list(QUANTIZE_DITHERS),),
        }}

    @staticmethod
    def bayer(im, pal_im, order: int):
        """The image plus the tiled threshold matrix (spread 2 * 256 / palette size), clamped, truncated to 8 bits,
        then mapped to the palette without dither."""
        from PIL import Image

        spread = 2 * 256 / (len(pal_im.getpalette()) // 3)
        matrix = torch.from_numpy(spread * _bayer_matrix(int(math.log2(order))) + 0.5)
        result = torch.from_numpy(np.array(im).astype(np.float32))
        reps = (math.ceil(result.shape[0] / matrix.shape[0]), math.ceil(result.shape[1] / matrix.shape[1]))
        tiled = matrix.tile(reps).unsqueeze(-1)
        result.add_(tiled[:result.shape[0], :result.shape[1]]).clamp_(0, 255)
        dithered = Image.fromarray(result.to(torch.uint8).numpy())
        return dithered.quantize(palette=pal_im, dither=Image.Dither.NONE)

    def quantize(self, image, colors, dither):
        from PIL import Image

        check_widgets(ImageQuantize, colors=colors, dither=dither)
        image = _image("ImageQuantize", "image", image)
        if image.shape[-1] != 3:
            raise InputError(f"ImageQuantize: image must be RGB (3 channels), got {image.shape[-1]}")
        result = torch.zeros_like(image)
        for b in range(image.shape[0]):
            # ComfyUI's (x * 255).to(uint8) truncates; the clamp only keeps values outside 0..1 from wrapping
            im = Image.fromarray((image[b].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy())
            pal_im = im.quantize(colors=int(colors))  # the palette first (Pillow issue 5836)
            if dither == "none":
                quantized = im.quantize(palette=pal_im, dither=Image.Dither.NONE)
            elif dither == "floyd-steinberg":
                quantized = im.quantize(palette=pal_im, dither=Image.Dither.FLOYDSTEINBERG)
            else:
                quantized = self.bayer(im, pal_im, int(dither.split("-")[-1]))
            result[b] = torch.from_numpy(np.array(quantized.convert("RGB"))).to(result) / 255
        return (result,)


# ---- comfy_extras/nodes_morphology.py --------------------------------------------------------------------


class Morphology(Node):
    """Grey erosion / dilation over a kernel_size square of ones (kornia.morphology, geodesic border: pixels past the
    edge are left out) and their compositions: open, close, gradient (dilate - erode), top_hat (image - open),
    bottom_hat (close - image).

    The square is run as a column then a row pass of kornia with the same kernel length and origin (a max / min over
    a rectangle within the image is the max / min of the row-wise ones), and a side of at least 2 * (image side) - 1
    as 2 * (image side) - 1 (a window that covers the whole image either way): the same values as ComfyUI's one
    k x k pass, at k instead of k^2 work a pixel."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "process"
    CATEGORY = "image/postprocessing"
    DISPLAY_NAME = "ImageMorphology"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "operation": (list(MORPHOLOGY_OPERATIONS),),
            "kernel_size": ("INT", {"default": 3, "min": 3, "max": 999, "step": 1}),
        }}

    def process(self, image, operation, kernel_size):
        from kornia.morphology import dilation, erosion

        check_widgets(Morphology, operation=operation, kernel_size=kernel_size)
        image = _image("Morphology", "image", image)
        b, h, w, c = image.shape
        k = int(kernel_size)
        kh, kw = min(k, 2 * h - 1), min(k, 2 * w - 1)
        passes = 2 if operation in ("erode", "dilate") else 4
        work = passes * b * c * h * w * (kh + kw) // 2
        if work > MORPHOLOGY_WORK:
            raise InputError(f"Morphology: {operation} with kernel_size {k} on {b} images of {w}x{h} is {work} "
                             f"element visits, more than {MORPHOLOGY_WORK}; use a smaller kernel or image")
        column, row = torch.ones(kh, 1, device=image.device), torch.ones(1, kw, device=image.device)

        def erode(x):
            return erosion(erosion(x, column), row)

        def dilate(x):
            return dilation(dilation(x, column), row)

        x = image.movedim(-1, 1)
        if operation == "erode":
            out = erode(x)
        elif operation == "dilate":
            out = dilate(x)
        elif operation == "open":
            out = dilate(erode(x))
        elif operation == "close":
            out = erode(dilate(x))
        elif operation == "gradient":
            out = dilate(x) - erode(x)
        elif operation == "top_hat":
            out = x - dilate(erode(x))
        else:  # bottom_hat
            out = erode(dilate(x)) - x
        return (out.movedim(1, -1),)


class ImageRGBToYUV(Node):
    """Y, Cb, Cr (kornia.color.rgb_to_ycbcr) each as a grey image of the input's channel count."""

    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("Y", "U", "V")
    FUNCTION = "execute"
    CATEGORY = "image/batch"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",)}}

    def execute(self, image):
        from kornia.color import rgb_to_ycbcr

        image = _image("ImageRGBToYUV", "image", image)
        if image.shape[-1] != 3:
            raise InputError(f"ImageRGBToYUV: image must be RGB (3 channels), got {image.shape[-1]}")
        out = rgb_to_ycbcr(image.movedim(-1, 1)).movedim(1, -1)
        # ComfyUI hands out expanded views; copies here, so a node that writes into its input changes only its own
        return tuple(out[..., i:i + 1].expand_as(image).contiguous() for i in range(3))


class ImageYUVToRGB(Node):
    """Each of Y, U, V averaged over its channels, joined and converted back (kornia.color.ycbcr_to_rgb)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "execute"
    CATEGORY = "image/batch"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"Y": ("IMAGE",), "U": ("IMAGE",), "V": ("IMAGE",)}}

    def execute(self, Y, U, V):
        from kornia.color import ycbcr_to_rgb

        planes = {name: _image("ImageYUVToRGB", name, t) for name, t in (("Y", Y), ("U", U), ("V", V))}
        if len({p.shape[:3] for p in planes.values()}) != 1:
            raise InputError("ImageYUVToRGB: Y, U and V must have the same batch and size, got "
                             + ", ".join(f"{n} {tuple(p.shape)}" for n, p in planes.items()))
        yuv = torch.cat([p.mean(dim=-1, keepdim=True) for p in planes.values()], dim=-1)
        return (ycbcr_to_rgb(yuv.movedim(-1, 1)).movedim(1, -1),)


# ---- comfy_extras/nodes_compositing.py -------------------------------------------------------------------


def porter_duff(src: torch.Tensor, src_mask: torch.Tensor, dst: torch.Tensor, dst_mask: torch.Tensor,
                mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's porter_duff_composite: masks to alpha (1 - mask), premultiplied colours, the mode's operator,
    back to straight colour (0 where alpha <= 1e-5, clamped) and to a mask. Alphas broadcast over the channels."""
    sa, da = 1 - src_mask, 1 - dst_mask
    s, d = src * sa, dst * da
    union = sa + da - sa * da
    if mode == "ADD":
        a, img = torch.clamp(sa + da, 0, 1), torch.clamp(s + d, 0, 1)
    elif mode == "CLEAR":
        a, img = torch.zeros_like(da), torch.zeros_like(d)
    elif mode == "DARKEN":
        a, img = union, (1 - da) * s + (1 - sa) * d + torch.min(s, d)
    elif mode == "DST":
        a, img = da, d
    elif mode == "DST_ATOP":
        a, img = sa, sa * d + (1 - da) * s
    elif mode == "DST_IN":
        a, img = sa * da, d * sa
    elif mode == "DST_OUT":
        a, img = (1 - sa) * da, (1 - sa) * d
    elif mode == "DST_OVER":
        a, img = da + (1 - da) * sa, d + (1 - da) * s
    elif mode == "LIGHTEN":
        a, img = union, (1 - da) * s + (1 - sa) * d + torch.max(s, d)
    elif mode == "MULTIPLY":
        a, img = sa * da, s * d
    elif mode == "OVERLAY":
        a, img = union, torch.where(2 * d < da, 2 * s * d, sa * da - 2 * (da - s) * (sa - d))
    elif mode == "SCREEN":
        a, img = union, s + d - s * d
    elif mode == "SRC":
        a, img = sa, s
    elif mode == "SRC_ATOP":
        a, img = da, da * s + (1 - sa) * d
    elif mode == "SRC_IN":
        a, img = sa * da, s * da
    elif mode == "SRC_OUT":
        a, img = (1 - da) * sa, (1 - da) * s
    elif mode == "SRC_OVER":
        a, img = sa + (1 - sa) * da, s + (1 - sa) * d
    elif mode == "XOR":
        a, img = (1 - da) * sa + (1 - sa) * da, (1 - da) * s + (1 - sa) * d
    else:
        raise InputError(f"PorterDuffImageComposite: mode {mode!r} is not one of {PORTER_DUFF_MODES}")
    img = torch.clamp(torch.where(a > 1e-5, img / a, torch.zeros_like(img)), 0, 1)
    return img, 1 - a


def _resize(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, H, W, C] through common_upscale (bicubic, centre crop), as ComfyUI's compositing resizes."""
    return common_upscale(x.movedim(-1, 1), width, height, "bicubic", "center").movedim(1, -1)


class PorterDuffImageComposite(Node):
    """source over / in / out ... destination by a Porter-Duff operator; the masks are ComfyUI's (1 = transparent).
    The batch is the shortest of the four inputs; destination_alpha is resized (bicubic, centre crop) to the
    destination, source to the destination and source_alpha to destination_alpha where they differ."""

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "composite"
    CATEGORY = "mask/compositing"
    DISPLAY_NAME = "Porter-Duff Image Composite"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "source": ("IMAGE",),
            "source_alpha": ("MASK",),
            "destination": ("IMAGE",),
            "destination_alpha": ("MASK",),
            "mode": (list(PORTER_DUFF_MODES), {"default": "DST"}),
        }}

    def composite(self, source, source_alpha, destination, destination_alpha, mode):
        node = "PorterDuffImageComposite"
        check_widgets(PorterDuffImageComposite, mode=mode)
        source, destination = _image(node, "source", source), _image(node, "destination", destination)
        source_alpha = _mask(node, "source_alpha", source_alpha)
        destination_alpha = _mask(node, "destination_alpha", destination_alpha)
        if source.shape[-1] != destination.shape[-1]:
            raise InputError(f"{node}: source has {source.shape[-1]} channels, destination {destination.shape[-1]}")
        n = min(len(source), len(source_alpha), len(destination), len(destination_alpha))
        src, dst = source[:n], destination[:n]
        src_a, dst_a = source_alpha[:n].unsqueeze(-1), destination_alpha[:n].unsqueeze(-1)
        h, w = dst.shape[1:3]
        if dst_a.shape[1:3] != (h, w):
            dst_a = _resize(dst_a, w, h)
        if src.shape != dst.shape:
            src = _resize(src, w, h)
        if src_a.shape != dst_a.shape:
            src_a = _resize(src_a, w, h)
        image, alpha = porter_duff(src, src_a, dst, dst_a, mode)
        return (image, alpha.squeeze(-1))


class SplitImageWithAlpha(Node):
    """The colour channels (the first three) and the mask 1 - alpha (0 where the image has no fourth channel)."""

    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "split_image_with_alpha"
    CATEGORY = "mask/compositing"
    DISPLAY_NAME = "Split Image with Alpha"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",)}}

    def split_image_with_alpha(self, image):
        image = _image("SplitImageWithAlpha", "image", image)
        alpha = image[..., 3] if image.shape[-1] > 3 else torch.ones_like(image[..., 0])
        return (image[..., :3].clone(), 1.0 - alpha)


class JoinImageWithAlpha(Node):
    """The image's first three channels and alpha = 1 - mask (the mask resized bilinearly to the image); both
    brought to the larger batch (repeat_to_batch_size)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "join_image_with_alpha"
    CATEGORY = "mask/compositing"
    DISPLAY_NAME = "Join Image with Alpha"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",), "alpha": ("MASK",)}}

    def join_image_with_alpha(self, image, alpha):
        image = _image("JoinImageWithAlpha", "image", image)
        alpha = _mask("JoinImageWithAlpha", "alpha", alpha)
        n = max(len(image), len(alpha))
        check_canvas("JoinImageWithAlpha", n, image.shape[1], image.shape[2])
        image, alpha = repeat_to_batch_size(image, n), repeat_to_batch_size(alpha, n)
        alpha = F.interpolate(alpha.unsqueeze(1), size=tuple(image.shape[1:3]), mode="bilinear").squeeze(1)
        return (torch.cat((image[..., :3], (1.0 - alpha).unsqueeze(-1)), dim=-1),)


# ---- comfy_extras/nodes_images.py ------------------------------------------------------------------------


class ImageStitch(Node):
    """image2 joined to image1's right / bottom / left / top, optionally with a bar of spacing_width (made even)
    pixels between. match_image_size: image2 scaled (lanczos) to image1's height (left / right) or width (up / down)
    keeping its aspect ratio; otherwise the smaller one padded (centred) with the spacing colour's grey level (black
    for red / green / blue). The shorter batch repeats its last image; fewer channels get opaque ones added."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "stitch"
    CATEGORY = "image/transform"
    DISPLAY_NAME = "Image Stitch"
    DESCRIPTION = ("Stitches image2 to image1 in the specified direction.\nIf image2 is not provided, returns image1 "
                   "unchanged.\nOptional spacing can be added between images.")

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image1": ("IMAGE",),
            "direction": (list(STITCH_DIRECTIONS), {"default": "right"}),
            "match_image_size": ("BOOLEAN", {"default": True}),
            "spacing_width": ("INT", {"default": 0, "min": 0, "max": 1024, "step": 2}),
            "spacing_color": (list(STITCH_COLORS), {"default": "white"}),
        }, "optional": {"image2": ("IMAGE",)}}

    def stitch(self, image1, direction, match_image_size, spacing_width, spacing_color, image2=None):
        node = "ImageStitch"
        check_widgets(ImageStitch, direction=direction, spacing_width=spacing_width, spacing_color=spacing_color)
        match = _flag(node, "match_image_size", match_image_size)
        image1 = _image(node, "image1", image1)
        if image2 is None:
            return (image1,)
        image2 = _image(node, "image2", image2)
        horizontal = direction in ("left", "right")
        spacing = int(spacing_width) + int(spacing_width) % 2
        batch = max(image1.shape[0], image2.shape[0])
        h1, w1 = image1.shape[1:3]
        h2, w2 = image2.shape[1:3]
        if match:  # image2's size after the resize, as ComfyUI rounds it (int: toward zero)
            if horizontal:
                h2, w2 = h1, int(h1 * (w2 / h2))
            else:
                h2, w2 = int(w1 / (w2 / h2)), w1
            if h2 < 1 or w2 < 1:
                raise InputError(f"{node}: image2 ({image2.shape[2]}x{image2.shape[1]}) matched to image1 "
                                 f"({w1}x{h1}) would be {w2}x{h2}")
            check_canvas(node, batch, h2, w2)
            if image2.shape[-1] > 4:
                raise InputError(f"{node}: a lanczos resize takes 1 to 4 channels, image2 has {image2.shape[-1]}")
        out_h, out_w = (max(h1, h2), w1 + w2 + spacing) if horizontal else (h1 + h2 + spacing, max(w1, w2))
        check_canvas(node, batch, out_h, out_w)  # also bounds the padded inputs and the spacing bar

        def last_repeated(x):
            return x if x.shape[0] == batch else torch.cat([x, x[-1:].repeat(batch - x.shape[0], 1, 1, 1)])

        image1, image2 = last_repeated(image1), last_repeated(image2)
        if match:
            image2 = common_upscale(image2.movedim(-1, 1), w2, h2, "lanczos", "disabled").movedim(1, -1)
        color = STITCH_COLORS[spacing_color]
        if not match:
            fill = 0.0 if isinstance(color, tuple) else color
            if horizontal and h1 != h2:
                image1, image2 = (self._pad(x, 1, max(h1, h2), fill) for x in (image1, image2))
            elif not horizontal and w1 != w2:
                image1, image2 = (self._pad(x, 2, max(w1, w2), fill) for x in (image1, image2))
        channels = max(image1.shape[-1], image2.shape[-1])
        image1, image2 = (torch.cat([x, torch.ones(*x.shape[:-1], channels - x.shape[-1], dtype=x.dtype,
                                                   device=x.device)], dim=-1) for x in (image1, image2))
        parts = [image2, image1] if direction in ("left", "up") else [image1, image2]
        if spacing > 0:
            shape = ((batch, max(image1.shape[1], image2.shape[1]), spacing, channels) if horizontal
                     else (batch, spacing, max(image1.shape[2], image2.shape[2]), channels))
            bar = torch.zeros(shape, dtype=image1.dtype, device=image1.device)
            if isinstance(color, tuple):
                for i, v in enumerate(color[:channels]):
                    bar[..., i] = v
            else:
                bar[..., :min(3, channels)] = color
            if channels == 4:
                bar[..., 3] = 1.0
            parts.insert(1, bar)
        return (torch.cat(parts, dim=2 if horizontal else 1),)

    @staticmethod
    def _pad(x: torch.Tensor, dim: int, size: int, value: float) -> torch.Tensor:
        """x grown along dim (1: height, 2: width) to size, the extra split around it (the odd pixel after)."""
        extra = size - x.shape[dim]
        if extra <= 0:
            return x
        before = extra // 2
        pad = (0, 0, before, extra - before) if dim == 2 else (0, 0, 0, 0, before, extra - before)
        return F.pad(x, pad, mode="constant", value=value)


class ImageAddNoise(Node):
    """The image plus strength x Gaussian noise, clipped to 0..1. ComfyUI draws the noise with torch.manual_seed(seed),
    the global CPU generator; a CPU generator of our own seeded alike draws the same numbers and leaves the global
    one alone."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "repeat"
    CATEGORY = "image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    def repeat(self, image, seed, strength):
        image = _image("ImageAddNoise", "image", image)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
            raise InputError(f"ImageAddNoise: seed must be an integer in 0..{SEED_MAX}, got {seed!r}")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(image.size(), generator=generator, device="cpu").to(image)  # [B, H, W, C]
        return (torch.clip(image + strength * noise, min=0.0, max=1.0),)


# ---- comfy_extras/nodes_rebatch.py (LIST_NODES: see the module docstring) ---------------------------------


def _as_list(value: Any) -> list:
    """An INPUT_IS_LIST input: a list (the executor's); a lone value (a direct call) as a list of one."""
    return value if isinstance(value, list) else [value]


def _list_batch_size(node: str, batch_size: Any) -> int:
    values = _as_list(batch_size)
    if not values:
        raise InputError(f"{node}: batch_size is missing")
    check_widgets(LIST_NODES[node], batch_size=values[0])
    return int(values[0])


class RebatchLatents(Node):
    """The list of latents regrouped into batches of batch_size (a latent of another size starts a new batch),
    each {"samples", "noise_mask", "batch_index"} (a mask of all ones dropped; batch_index counted on from the
    items before where a latent has none), as ComfyUI's LatentRebatch."""

    RETURN_TYPES = ("LATENT",)
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "rebatch"
    CATEGORY = "latent/batch"
    DISPLAY_NAME = "Rebatch Latents"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"latents": ("LATENT",),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    @staticmethod
    def _parts(latent: Any, offset: int) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(samples, noise_mask [B', 1, H, W], batch_index) of one latent; the mask all ones (at 8x the latent)
        where there is none, repeated to the batch where shorter. ComfyUI leaves a mask's size as it is."""
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or 0 in samples.shape:
            got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(latent).__name__
            raise InputError(f"RebatchLatents: latents must be LATENTs with samples [B, C, h, w], got {got}")
        b, _, h, w = samples.shape
        mask = latent.get("noise_mask")
        if mask is None:
            mask = torch.ones((b, 1, h * 8, w * 8))
        else:
            if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[1] == 1:  # [B, 1, H, W]
                mask = mask[:, 0]
            mask = _mask("RebatchLatents", "noise_mask", mask).unsqueeze(1)
            if mask.shape[0] < b:
                mask = mask.repeat((b - 1) // mask.shape[0] + 1, 1, 1, 1)[:b]
        index = latent.get("batch_index")
        index = list(index) if index is not None else [offset + i for i in range(b)]
        return samples, mask, index

    @staticmethod
    def _cat(current: tuple, extra: tuple) -> tuple:
        if current[0].shape[1] != extra[0].shape[1]:
            raise InputError(f"RebatchLatents: latents of {current[0].shape[1]} and {extra[0].shape[1]} channels "
                             "cannot be batched together")
        if current[1].shape[-2:] != extra[1].shape[-2:]:
            raise InputError(f"RebatchLatents: noise masks of {tuple(current[1].shape[-2:])} and "
                             f"{tuple(extra[1].shape[-2:])} cannot be batched together")
        return torch.cat((current[0], extra[0])), torch.cat((current[1], extra[1])), current[2] + extra[2]

    def rebatch(self, latents, batch_size):
        size = _list_batch_size("RebatchLatents", batch_size)
        out: list[dict] = []

        def emit(part: tuple) -> None:
            out.append({"samples": part[0], "noise_mask": part[1], "batch_index": part[2]})

        current = None
        processed = 0
        for latent in _as_list(latents):
            extra = self._parts(latent, processed)
            processed += len(extra[2])
            if current is None:
                current = extra
            elif extra[0].shape[-2:] != current[0].shape[-2:]:
                emit(tuple(x[:size] for x in current))  # samples: at most batch_size already (cut below)
                current = extra
            else:
                current = self._cat(current, extra)
            if current[0].shape[0] > size:
                full = current[0].shape[0] // size
                for i in range(full):
                    emit(tuple(x[i * size:(i + 1) * size] for x in current))
                current = tuple(x[full * size:] for x in current) if full * size < len(current[0]) else None
        if current is not None:
            emit(tuple(x[:size] for x in current))
        for item in out:
            if item["noise_mask"].mean() == 1.0:
                del item["noise_mask"]
        return (out,)


class RebatchImages(Node):
    """Every image of the list, one by one, regrouped into batches of batch_size (the last one shorter)."""

    RETURN_TYPES = ("IMAGE",)
    INPUT_IS_LIST = True
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "rebatch"
    CATEGORY = "image/batch"
    DISPLAY_NAME = "Rebatch Images"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"images": ("IMAGE",),
                             "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})}}

    def rebatch(self, images, batch_size):
        size = _list_batch_size("RebatchImages", batch_size)
        frames = [one for image in _as_list(images) for one in _image("RebatchImages", "images", image).split(1)]
        out = []
        for i in range(0, len(frames), size):
            group = frames[i:i + size]
            if len({f.shape for f in group}) != 1:
                raise InputError("RebatchImages: images of different sizes cannot share a batch: "
                                 + ", ".join(sorted({str(tuple(f.shape[1:])) for f in group})))
            out.append(torch.cat(group, dim=0))
        return (out,)


IMAGE_EXTRA_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    ImageSharpen, ImageQuantize, Morphology, ImageRGBToYUV, ImageYUVToRGB, PorterDuffImageComposite,
    SplitImageWithAlpha, JoinImageWithAlpha, ImageStitch, RebatchLatents, RebatchImages, ImageAddNoise,
)}
LIST_NODES = {name: IMAGE_EXTRA_NODES[name] for name in ("RebatchLatents", "RebatchImages")}

for _module, _classes in (
    ("comfy_extras.nodes_post_processing", (ImageSharpen, ImageQuantize)),
    ("comfy_extras.nodes_morphology", (Morphology, ImageRGBToYUV, ImageYUVToRGB)),
    ("comfy_extras.nodes_compositing", (PorterDuffImageComposite, SplitImageWithAlpha, JoinImageWithAlpha)),
    ("comfy_extras.nodes_images", (ImageStitch, ImageAddNoise)),
    ("comfy_extras.nodes_rebatch", (RebatchLatents, RebatchImages)),
):
    for _cls in _classes:
        _cls.PYTHON_MODULE = _module
