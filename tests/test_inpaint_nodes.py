"""ComfyUI's inpainting nodes (workflow/nodes_inpaint.py): SetLatentNoiseMask, VAEEncodeForInpaint and
InpaintModelConditioning with ComfyUI's inputs, outputs and math (checked against the formulas of comfy
nodes.py written out here), and end to end on the shipped model: a mask from LoadImage's alpha repaints
only the masked area (the KSampler's noise-mask blend, sampling/inpaint.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from comfy_models import tiny_checkpoint_folder
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow import ModelFolders, PromptExecutor, engine
from sd35fp8.workflow.node_base import NodeContext
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS
from sd35fp8.workflow.nodes_inpaint import InpaintModelConditioning, SetLatentNoiseMask, VAEEncodeForInpaint


@pytest.fixture()
def fake_vae(monkeypatch):
    seen = []

    def encode(vae, pixels, offload=None):
        seen.append(pixels.clone())
        return {"samples": torch.full((pixels.shape[0], 16, pixels.shape[1] // 8, pixels.shape[2] // 8),
                                      float(len(seen)))}

    monkeypatch.setattr(engine, "vae_encode", encode)
    return seen


def _inputs():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 37, 45, 3, generator=g)  # not multiples of 8: centre-cropped to 32 x 40
    mask = torch.zeros(1, 37, 45)
    mask[:, 10:20, 12:30] = 1.0
    return pixels, mask


def test_registered_with_comfyui_io():
    for name in ("SetLatentNoiseMask", "VAEEncodeForInpaint", "InpaintModelConditioning"):
        assert name in NODE_CLASS_MAPPINGS
    assert VAEEncodeForInpaint.INPUT_TYPES(None)["required"]["grow_mask_by"][1] == {"default": 6, "min": 0,
                                                                                   "max": 64, "step": 1}
    assert InpaintModelConditioning.RETURN_NAMES == ("positive", "negative", "latent")
    assert InpaintModelConditioning.INPUT_TYPES(None)["required"]["noise_mask"][1]["default"] is True


def test_set_latent_noise_mask():
    latent = {"samples": torch.zeros(2, 16, 4, 4)}
    (out,) = SetLatentNoiseMask(NodeContext(folders=None)).set_mask(latent, torch.ones(32, 32))
    assert out["noise_mask"].shape == (1, 1, 32, 32) and "noise_mask" not in latent
    assert out["samples"] is latent["samples"]


def test_vae_encode_for_inpaint_matches_comfyui(fake_vae):
    pixels, mask = _inputs()
    (out,) = VAEEncodeForInpaint(NodeContext(folders=None)).encode(None, pixels, mask, grow_mask_by=6)
    # ComfyUI nodes.py VAEEncodeForInpaint, written out
    m = F.interpolate(mask.reshape(-1, 1, 37, 45), size=(37, 45), mode="bilinear")
    xo, yo = (37 % 8) // 2, (45 % 8) // 2
    p = pixels[:, xo:32 + xo, yo:40 + yo, :].clone()
    m = m[:, :, xo:32 + xo, yo:40 + yo]
    grown = torch.clamp(F.conv2d(m.round(), torch.ones(1, 1, 6, 6), padding=math.ceil(5 / 2)), 0, 1)
    keep = (1.0 - m.round()).squeeze(1)
    for i in range(3):
        p[:, :, :, i] = (p[:, :, :, i] - 0.5) * keep + 0.5
    assert torch.equal(out["noise_mask"], grown[:, :, :32, :40].round())
    assert torch.allclose(fake_vae[0], p)
    (no_grow,) = VAEEncodeForInpaint(NodeContext(folders=None)).encode(None, pixels, mask, grow_mask_by=0)
    assert torch.equal(no_grow["noise_mask"], m.round())


def test_inpaint_model_conditioning_matches_comfyui(fake_vae):
    pixels, mask = _inputs()
    pos, neg = [[torch.zeros(1, 4, 8), {"pooled_output": torch.zeros(1, 8)}]], [[torch.ones(1, 4, 8), {}]]
    node = InpaintModelConditioning(NodeContext(folders=None))
    p2, n2, latent = node.encode(pos, neg, pixels, None, mask, noise_mask=True)
    assert len(fake_vae) == 2 and fake_vae[1].shape == pixels.shape  # the original, uncropped, is the latent
    assert torch.equal(latent["samples"], torch.full((1, 16, 4, 5), 2.0))
    assert latent["noise_mask"].shape == (1, 1, 32, 40)
    for c, orig in ((p2, pos), (n2, neg)):
        assert c[0][0] is orig[0][0] and torch.equal(c[0][1]["concat_latent_image"], torch.full((1, 16, 4, 5), 1.0))
        assert c[0][1]["concat_mask"] is latent["noise_mask"]
    assert "concat_mask" not in pos[0][1]  # inputs untouched
    _, _, no_mask = node.encode(pos, neg, pixels, None, mask, noise_mask=False)
    assert "noise_mask" not in no_mask


@pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
@pytest.mark.parametrize("node", ["VAEEncodeForInpaint", "SetLatentNoiseMask", "InpaintModelConditioning"])
def test_inpaint_repaints_only_the_masked_area(tmp_path, node):
    """LoadImage (alpha 0 = the area to repaint, MASK = 1 - alpha) -> inpainting -> KSampler: pixels far
    from the mask stay as the VAE round trip of the original; the masked area changes."""
    tiny_checkpoint_folder(tmp_path)
    (tmp_path / "input").mkdir()
    rgba = np.zeros((128, 128, 4), np.uint8)
    rgba[..., :3] = (40, 90, 200)
    rgba[..., 3] = 255
    rgba[40:88, 40:88, 3] = 0  # repaint the centre
    Image.fromarray(rgba).save(tmp_path / "input" / "masked.png")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a yellow circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "masked.png"}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 6, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "sgm_uniform",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "inp"}},
        "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "roundtrip"}},
    }
    if node == "VAEEncodeForInpaint":
        prompt["5"] = {"class_type": node, "inputs": {"pixels": ["4", 0], "vae": ["1", 2], "mask": ["4", 1],
                                                      "grow_mask_by": 6}}
    elif node == "SetLatentNoiseMask":
        prompt["5"] = {"class_type": node, "inputs": {"samples": ["9", 0], "mask": ["4", 1]}}
    else:
        prompt["5"] = {"class_type": node, "inputs": {"positive": ["2", 0], "negative": ["3", 0], "vae": ["1", 2],
                                                      "pixels": ["4", 0], "mask": ["4", 1], "noise_mask": True}}
        prompt["6"]["inputs"].update(positive=["5", 0], negative=["5", 1], latent_image=["5", 2])
    ex = PromptExecutor(ModelFolders(tmp_path / "models", output_dir=tmp_path / "output",
                                     input_dir=tmp_path / "input"), device="cpu")
    result = ex.execute(prompt, "inp")
    assert result.success, result.error
    out = np.asarray(Image.open(next((tmp_path / "output").glob("inp_*.png")))).astype(np.float32)
    ref = np.asarray(Image.open(next((tmp_path / "output").glob("roundtrip_*.png")))).astype(np.float32)
    border = np.ones((128, 128), bool)
    border[24:104, 24:104] = False  # well away from the (grown) mask
    outside = np.abs(out - ref)[border].mean()
    inside = np.abs(out - ref)[48:80, 48:80].mean()
    print(f"{node}: mean |inpainted - round trip| outside {outside:.1f}, inside {inside:.1f} (uint8)")
    # measured (shipped model, CPU): outside 9.5-10.1, inside 92-100 uint8 levels; the kept latent is the
    # original's, what is left outside is the decoder's reach from the repainted centre
    assert outside < 15.0, outside
    assert inside > 5 * outside, (inside, outside)


@pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
def test_outpaint_workflow(tmp_path):
    """The outpainting graph people share: LoadImage -> ImagePadForOutpaint -> VAEEncodeForInpaint -> KSampler:
    the image grows by the margins, the middle (far from the feathered edge) stays the original's round trip."""
    tiny_checkpoint_folder(tmp_path)
    (tmp_path / "input").mkdir()
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[...] = (40, 90, 200)
    Image.fromarray(rgb).save(tmp_path / "input" / "src.png")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a yellow circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "src.png"}},
        "12": {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["4", 0], "left": 32, "top": 0, "right": 0,
                                                              "bottom": 32, "feathering": 16}},
        "5": {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["12", 0], "vae": ["1", 2], "mask": ["12", 1],
                                                             "grow_mask_by": 6}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 6, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "sgm_uniform",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "out"}},
        "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["1", 2]}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "roundtrip"}},
    }
    ex = PromptExecutor(ModelFolders(tmp_path / "models", output_dir=tmp_path / "output",
                                     input_dir=tmp_path / "input"), device="cpu")
    result = ex.execute(prompt, "outpaint")
    assert result.success, result.error
    out = np.asarray(Image.open(next((tmp_path / "output").glob("out_*.png")))).astype(np.float32)
    ref = np.asarray(Image.open(next((tmp_path / "output").glob("roundtrip_*.png")))).astype(np.float32)
    assert out.shape == ref.shape == (128, 128, 3)
    diff = np.abs(out - ref).mean(-1)
    middle = diff[8:64, 64:120].mean()  # inside the original (rows 0-95, columns 32-127), away from the padded sides
    margin = diff[100:, :28].mean()  # the new bottom-left corner: painted from the grey canvas
    # measured (shipped model, CPU): middle 12.1, margin 66.0 uint8 levels
    assert middle < 15.0 and margin > 3 * middle, (middle, margin)
