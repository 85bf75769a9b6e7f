"""LatentUpscale / LatentUpscaleBy (ComfyUI's size rules) and DualCLIPLoader(sd3) on the shipped encoders."""

from __future__ import annotations

import pytest
import torch

from comfy_ksampling import c_bislerp
from comfy_models import build_models_folder
from sd35fp8.errors import InputError
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.node_base import NodeContext
from sd35fp8.workflow.nodes import DualCLIPLoader
from sd35fp8.workflow.nodes_latent import LatentUpscale, LatentUpscaleBy


def test_latent_upscale_sizes():
    lat = {"samples": torch.randn(1, 16, 16, 24)}  # 192 x 128 px
    (out,) = LatentUpscale(None).upscale(lat, "nearest-exact", 0, 256, "disabled")
    assert out["samples"].shape == (1, 16, 32, 48)  # width from the aspect ratio: 384 px
    (out,) = LatentUpscale(None).upscale(lat, "bilinear", 32, 32, "center")
    assert out["samples"].shape == (1, 16, 8, 8)  # at least 64 px a side
    (out,) = LatentUpscaleBy(None).upscale(lat, "bicubic", 1.5)
    assert out["samples"].shape == (1, 16, 24, 36)
    with pytest.raises(InputError, match="lanczos"):  # an image method, not a latent one
        LatentUpscaleBy(None).upscale(lat, "lanczos", 2.0)


def test_latent_upscale_bislerp_matches_comfyui():
    """bislerp (comfy.utils, transcribed in tests/comfy_ksampling.py) through both nodes, crop and all."""
    lat = {"samples": torch.randn(2, 16, 10, 14, generator=torch.Generator().manual_seed(0)), "batch_index": [4, 5]}
    (out,) = LatentUpscaleBy(None).upscale(lat, "bislerp", 1.5)
    assert torch.equal(out["samples"], c_bislerp(lat["samples"], 21, 15)) and out["batch_index"] == [4, 5]
    (out,) = LatentUpscale(None).upscale(lat, "bislerp", 64, 128, "center")  # 8 x 16 cells
    x = round((14 - 14 * ((8 / 16) / (14 / 10))) / 2)  # ComfyUI's centre crop: 4 columns off each side
    assert x == 4 and torch.equal(out["samples"], c_bislerp(lat["samples"][..., x:14 - x], 8, 16))


@pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
def test_dual_clip_loader(tmp_path):
    models = build_models_folder(tmp_path)
    ctx = NodeContext(folders=ModelFolders(models), device="cpu", dtype=torch.float32)
    (clip,) = DualCLIPLoader(ctx).load_clip("clip_l.safetensors", "clip_g.safetensors", "sd3")
    assert clip.encoder is not None
    with pytest.raises(InputError, match="SD3.5 only"):
        DualCLIPLoader(ctx).load_clip("clip_l.safetensors", "clip_g.safetensors", "flux")
