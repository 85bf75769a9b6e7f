"""ComfyUI's ControlNet and image-preparation nodes (nodes.py, comfy_extras/nodes_sd3.py, nodes_canny.py,
nodes_post_processing.py), same class names, inputs, defaults, outputs and categories.

    CONTROL_NET: models/controlnet.ControlNet        IMAGE: [B, H, W, C] float in 0..1
The control itself rides in the CONDITIONING's dict as "control" (sd35fp8.control.ControlApply),
chained to the one already there, as ComfyUI's ControlNetApplyAdvanced does.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sd35fp8.errors import InputError
from sd35fp8.image_ops import CROP_METHODS, UPSCALE_METHODS
from sd35fp8.workflow.node_base import MAX_RESOLUTION, Node, _files

log = logging.getLogger(__name__)

# nodes of the official templates whose models cannot exist here -> what to do instead
UNAVAILABLE_NODES = {
    "LotusConditioning": (
        "the Lotus depth estimator (lotus-depth-*.safetensors, an SD 2-class UNet with an SD1.5 VAE) cannot run "
        "here: this engine runs only SD3/SD3.5 MMDiTs. Feed a depth image from a LoadImage node into "
        "ControlNetApplyAdvanced's image input instead (near = white, as Depth Anything / Lotus give it)"),
}


class ControlNetLoader(Node):
    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "load_controlnet"
    CATEGORY = "loaders"
    DISPLAY_NAME = "Load ControlNet Model"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"control_net_name": (_files(folders, "controlnet"),)}}

    def load_controlnet(self, control_net_name):
        from sd35fp8.checkpoints.controlnet import load_controlnet

        path = self.ctx.folders.get_full_path_or_raise("controlnet", control_net_name)
        dtype = self.ctx.dtype if self.ctx.dtype is not None else torch.float32
        fp8 = self.ctx.options.get("controlnet_fp8")  # None: the file's precision, as the base loaders
        net = load_controlnet(path, device=self.ctx.device, dtype=dtype, fp8=fp8)
        log.info("ControlNetLoader %s: %s", control_net_name, net.config.describe())
        return (net,)


class DiffControlNetLoader(ControlNetLoader):
    """ComfyUI's loader for "diff" ControlNets (SD1.x files holding the difference to a base UNet). SD3 ControlNets
    are whole models, so the MODEL input is not needed, as comfy.controlnet.load_controlnet ignores it for them."""

    DISPLAY_NAME = "Load ControlNet Model (diff)"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "control_net_name": (_files(folders, "controlnet"),)}}

    def load_controlnet(self, model=None, control_net_name=None):
        return super().load_controlnet(control_net_name)


def apply_control(positive: list, negative: list, control_net: Any, image: torch.Tensor, strength: float,
                  start_percent: float, end_percent: float, vae: Any = None) -> tuple[list, list]:
    """ComfyUI ControlNetApplyAdvanced.apply_controlnet: one ControlApply per previous control, shared by
    the positive and negative entries that had the same previous one."""
    from sd35fp8.control import ControlApply

    if strength == 0:
        return positive, negative
    made: dict[int, Any] = {}
    out = []
    for conditioning in (positive, negative):
        c = []
        for cond, extra in conditioning:
            d = dict(extra)
            prev = d.get("control")
            if id(prev) not in made:
                made[id(prev)] = ControlApply(control_net, image, float(strength), float(start_percent),
                                              float(end_percent), vae=vae, previous=prev)
            d["control"] = made[id(prev)]
            d["control_apply_to_uncond"] = False
            c.append([cond, d])
        out.append(c)
    return out[0], out[1]


class ControlNetApplyAdvanced(Node):
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply_controlnet"
    CATEGORY = "conditioning/controlnet"
    DISPLAY_NAME = "Apply ControlNet"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {
            "required": {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "control_net": ("CONTROL_NET",),
                "image": ("IMAGE",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            },
            "optional": {"vae": ("VAE",)},
        }

    def apply_controlnet(self, positive, negative, control_net, image, strength, start_percent, end_percent,
                         vae=None):
        return apply_control(positive, negative, control_net, image, strength, start_percent, end_percent, vae)


class ControlNetApply(Node):
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply_controlnet"
    CATEGORY = "conditioning/controlnet"
    DISPLAY_NAME = "Apply ControlNet (OLD)"
    DEPRECATED = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "conditioning": ("CONDITIONING",),
            "control_net": ("CONTROL_NET",),
            "image": ("IMAGE",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
        }}

    def apply_controlnet(self, conditioning, control_net, image, strength):
        """ComfyUI's deprecated node: no VAE input, and every SD3 ControlNet takes its hint through the VAE, so
        it stops with ComfyUI's own message (which ComfyUI raises once sampling starts)."""
        from sd35fp8.control import ControlApply

        if strength == 0:
            return (conditioning,)
        ControlApply(control_net, image, float(strength))  # raises: "This Controlnet needs a VAE ..."
        raise InputError("ControlNetApply: use ControlNetApplyAdvanced with a VAE input for SD3 ControlNets")


class ControlNetApplySD3(ControlNetApplyAdvanced):
    CATEGORY = "conditioning/controlnet"
    DISPLAY_NAME = "Apply Controlnet with VAE"
    DEPRECATED = True
    PYTHON_MODULE = "comfy_extras.nodes_sd3"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "control_net": ("CONTROL_NET",),
            "vae": ("VAE",),
            "image": ("IMAGE",),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }}

    def apply_controlnet(self, positive, negative, control_net, vae, image, strength, start_percent, end_percent):
        return apply_control(positive, negative, control_net, image, strength, start_percent, end_percent, vae)


# ---- image preparation ---------------------------------------------------------------------------------------
class Canny(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "detect_edge"
    CATEGORY = "image/preprocessors"
    PYTHON_MODULE = "comfy_extras.nodes_canny"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "low_threshold": ("FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}),
            "high_threshold": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01}),
        }}

    def detect_edge(self, image, low_threshold, high_threshold):
        from sd35fp8.image_ops import canny

        return (canny(image, float(low_threshold), float(high_threshold)).cpu(),)


def _scaled(image: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    from sd35fp8.image_ops import common_upscale

    return common_upscale(image.movedim(-1, 1), width, height, method, crop).movedim(1, -1)


class ImageScale(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (list(UPSCALE_METHODS),),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (list(CROP_METHODS),),
        }}

    def upscale(self, image, upscale_method, width, height, crop):
        from sd35fp8.image_ops import scale_size

        if width == 0 and height == 0:
            return (image,)
        w, h = scale_size(image.shape[2], image.shape[1], int(width), int(height))
        return (_scaled(image, w, h, upscale_method, crop),)


class ImageScaleBy(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image By"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (list(UPSCALE_METHODS),),
            "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}),
        }}

    def upscale(self, image, upscale_method, scale_by):
        w, h = round(image.shape[2] * scale_by), round(image.shape[1] * scale_by)
        return (_scaled(image, w, h, upscale_method, "disabled"),)


class ImageScaleToTotalPixels(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Scale Image to Total Pixels"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "upscale_method": (list(UPSCALE_METHODS),),
            "megapixels": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 16.0, "step": 0.01}),
            "resolution_steps": ("INT", {"default": 1, "min": 1, "max": 256}),
        }}

    def upscale(self, image, upscale_method, megapixels, resolution_steps=1):
        from sd35fp8.image_ops import total_pixels_size

        w, h = total_pixels_size(image.shape[2], image.shape[1], float(megapixels), int(resolution_steps))
        return (_scaled(image, w, h, upscale_method, "disabled"),)


class ImageInvert(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "invert"
    CATEGORY = "image"
    DISPLAY_NAME = "Invert Image"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"image": ("IMAGE",)}}

    def invert(self, image):
        return (1.0 - image,)


class ImageBlur(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "blur"
    CATEGORY = "image/postprocessing"
    DISPLAY_NAME = "Image Blur"
    PYTHON_MODULE = "comfy_extras.nodes_post_processing"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "image": ("IMAGE",),
            "blur_radius": ("INT", {"default": 1, "min": 1, "max": 31, "step": 1}),
            "sigma": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1}),
        }}

    def blur(self, image, blur_radius, sigma):
        from sd35fp8.image_ops import blur

        return (blur(image, int(blur_radius), float(sigma)),)


class ImagePadForOutpaint(Node):
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "expand_image"
    CATEGORY = "image"
    DISPLAY_NAME = "Pad Image for Outpainting"

    @classmethod
    def INPUT_TYPES(cls, folders):
        side = ("INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8})
        return {"required": {"image": ("IMAGE",), "left": side, "top": side, "right": side, "bottom": side,
                             "feathering": ("INT", {"default": 40, "min": 0, "max": MAX_RESOLUTION, "step": 1})}}

    def expand_image(self, image, left, top, right, bottom, feathering):
        from sd35fp8.image_ops import pad_for_outpaint

        return pad_for_outpaint(image, int(left), int(top), int(right), int(bottom), int(feathering))


def check_available(class_type: str, where: str) -> None:
    """Raise the clear error for a template node whose model cannot exist here (UNAVAILABLE_NODES)."""
    if class_type in UNAVAILABLE_NODES:
        raise InputError(f"{where}: {class_type}: {UNAVAILABLE_NODES[class_type]}")


CONTROL_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    ControlNetLoader, DiffControlNetLoader, ControlNetApply, ControlNetApplyAdvanced, ControlNetApplySD3, Canny, ImageScale, ImageScaleBy,
    ImageScaleToTotalPixels, ImageInvert, ImageBlur, ImagePadForOutpaint,
)}
