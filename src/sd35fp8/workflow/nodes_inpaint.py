"""ComfyUI's inpainting nodes (nodes.py SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning),
same inputs, outputs and math. The LATENT they return carries "noise_mask" [B, 1, H, W] (1 = repaint);
the KSampler path hands it to generation.sample(mask=) (sampling/inpaint.py MaskedDenoiser: ComfyUI's
KSamplerX0Inpaint blend). Masks come from LoadImage's alpha (MASK = 1 - alpha; /upload/mask writes it).

InpaintModelConditioning also sets "concat_latent_image" / "concat_mask" on both conditionings, as
ComfyUI does; SD3.5 models have no extra input channels, so only the latent and its noise mask act.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sd35fp8.workflow import engine
from sd35fp8.workflow.node_base import Node

DOWNSCALE = 8  # the SD3 VAE's pixel -> latent factor


def _mask_to_pixels(mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """MASK [H, W] or [B, H, W] -> [B, 1, H', W'] bilinearly resized to the IMAGE [B, H', W', 3]."""
    m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    return F.interpolate(m, size=(pixels.shape[1], pixels.shape[2]), mode="bilinear")


def _crop8(pixels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI: a size not a multiple of 8 is centre-cropped to one (pixels [B, H, W, C], mask [B, 1, H, W])."""
    x, y = (pixels.shape[1] // DOWNSCALE) * DOWNSCALE, (pixels.shape[2] // DOWNSCALE) * DOWNSCALE
    if pixels.shape[1] != x or pixels.shape[2] != y:
        xo, yo = (pixels.shape[1] % DOWNSCALE) // 2, (pixels.shape[2] % DOWNSCALE) // 2
        pixels = pixels[:, xo:x + xo, yo:y + yo, :]
        mask = mask[:, :, xo:x + xo, yo:y + yo]
    return pixels, mask


def _grey_out(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The masked area (mask rounded to 1) set to 0.5 grey, as ComfyUI does before encoding."""
    m = (1.0 - mask.round()).squeeze(1)  # [B, H, W]
    out = pixels.clone()
    out[..., :3] = (out[..., :3] - 0.5) * m.unsqueeze(-1) + 0.5
    return out


class SetLatentNoiseMask(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "set_mask"
    CATEGORY = "latent/inpaint"
    DISPLAY_NAME = "Set Latent Noise Mask"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    def set_mask(self, samples, mask):
        s = dict(samples)
        s["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (s,)


class VAEEncodeForInpaint(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = "latent/inpaint"
    DISPLAY_NAME = "VAE Encode (for Inpainting)"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"pixels": ("IMAGE",), "vae": ("VAE",), "mask": ("MASK",),
                             "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1})}}

    def encode(self, vae, pixels, mask, grow_mask_by=6):
        mask = _mask_to_pixels(mask, pixels)  # [B, 1, H, W]
        pixels, mask = _crop8(pixels, mask)
        if grow_mask_by == 0:
            grown = mask
        else:  # grow the mask a few pixels to keep the seam clean in latent space
            kernel = torch.ones((1, 1, grow_mask_by, grow_mask_by))
            grown = torch.clamp(F.conv2d(mask.round(), kernel, padding=math.ceil((grow_mask_by - 1) / 2)), 0, 1)
        latent = engine.vae_encode(vae, _grey_out(pixels, mask), self.ctx.engine_options.offloader)
        x, y = pixels.shape[1], pixels.shape[2]
        return ({"samples": latent["samples"], "noise_mask": grown[:, :, :x, :y].round()},)


class InpaintModelConditioning(Node):
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    FUNCTION = "encode"
    CATEGORY = "conditioning/inpaint"
    DISPLAY_NAME = "InpaintModelConditioning"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"positive": ("CONDITIONING",), "negative": ("CONDITIONING",), "vae": ("VAE",),
                             "pixels": ("IMAGE",), "mask": ("MASK",),
                             "noise_mask": ("BOOLEAN", {"default": True,
                                                        "tooltip": "Add a noise mask to the latent so sampling "
                                                                   "only happens within the mask."})}}

    def encode(self, positive, negative, pixels, vae, mask, noise_mask=True):
        mask = _mask_to_pixels(mask, pixels)  # [B, 1, H, W]
        orig_pixels = pixels
        pixels, mask = _crop8(pixels, mask)
        offloader = self.ctx.engine_options.offloader
        concat_latent = engine.vae_encode(vae, _grey_out(pixels, mask), offloader)["samples"]
        out_latent = {"samples": engine.vae_encode(vae, orig_pixels, offloader)["samples"]}
        if noise_mask:
            out_latent["noise_mask"] = mask
        out = []
        for conditioning in (positive, negative):
            out.append([[t, {**d, "concat_latent_image": concat_latent, "concat_mask": mask}]
                        for t, d in conditioning])
        return (out[0], out[1], out_latent)


INPAINT_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in
                                        (SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning)}
