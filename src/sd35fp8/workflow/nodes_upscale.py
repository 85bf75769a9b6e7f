"""ComfyUI's upscale-model nodes (comfy_extras/nodes_upscale_model.py): UpscaleModelLoader reads a file of
models/upscale_models (checkpoints/upscale.py: ESRGAN / Real-ESRGAN RRDBNet, SRVGGNetCompact);
ImageUpscaleWithModel runs it over 512-pixel tiles overlapping by 32 (ComfyUI's tiling; halved down to 128 when
the device runs out of memory), clamped to [0, 1]."""

from __future__ import annotations

import logging

import torch

from sd35fp8.errors import InputError
from sd35fp8.workflow.node_base import Node, _file_stamps, _files

log = logging.getLogger(__name__)
MAX_OUTPUT_PIXELS = 64 * 2**20  # per image: a 4x upscale of up to 2048 x 2048 (ComfyUI has no bound)


class UpscaleModelLoader(Node):
    RETURN_TYPES = ("UPSCALE_MODEL",)
    FUNCTION = "load_model"
    CATEGORY = "loaders"
    DISPLAY_NAME = "Load Upscale Model"
    PYTHON_MODULE = "comfy_extras.nodes_upscale_model"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model_name": (_files(folders, "upscale_models"),)}}

    @classmethod
    def IS_CHANGED(cls, folders, model_name=None, **_):
        return _file_stamps(folders, "upscale_models", model_name)

    def load_model(self, model_name):
        from sd35fp8.checkpoints.upscale import load_upscale_model

        net = load_upscale_model(self.ctx.folders.get_full_path_or_raise("upscale_models", model_name))
        log.info("UpscaleModelLoader %s: %s", model_name, net.config.describe())
        return (net,)


class ImageUpscaleWithModel(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "upscale"
    CATEGORY = "image/upscaling"
    DISPLAY_NAME = "Upscale Image (using Model)"
    PYTHON_MODULE = "comfy_extras.nodes_upscale_model"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"upscale_model": ("UPSCALE_MODEL",), "image": ("IMAGE",)}}

    def upscale(self, upscale_model, image):
        from sd35fp8.tiles import run_tiled

        b, h, w, c = image.shape
        s = upscale_model.scale
        if h * w * s * s > MAX_OUTPUT_PIXELS:
            raise InputError(f"ImageUpscaleWithModel: {w}x{h} x{s} would be {w * s}x{h * s} px; at most "
                             f"{MAX_OUTPUT_PIXELS // 2**20} Mpx an image")
        if c != upscale_model.config.in_channels:
            raise InputError(f"ImageUpscaleWithModel: the image has {c} channels, the model takes "
                             f"{upscale_model.config.in_channels}")
        device = torch.device(self.ctx.device)
        net = upscale_model.to(device)
        x = image.movedim(-1, -3).to(device, torch.float32)  # [B, C, H, W]
        tile = 512
        try:
            while True:
                try:
                    with torch.inference_mode():
                        out = run_tiled(net, x, tile, 32, upscale_model.config.out_channels, s, 1, torch.float32,
                                        on_tile=self._tile_done)
                    break
                except torch.OutOfMemoryError:
                    tile //= 2
                    if tile < 128:
                        raise
                    log.warning("ImageUpscaleWithModel: out of memory; tiles of %d px", tile)
        finally:
            upscale_model.to("cpu")
        return (torch.clamp(out.movedim(-3, -1), 0.0, 1.0).cpu(),)

    def _tile_done(self, done: int, total: int) -> None:
        """Before each tile: the prompt's interrupt, and the node's progress (ComfyUI's ProgressBar over tiles)."""
        self.ctx.check_interrupt()
        self.ctx.progress(done, total)


UPSCALE_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (UpscaleModelLoader, ImageUpscaleWithModel)}
