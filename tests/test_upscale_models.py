"""Upscale models (checkpoints/upscale.py, models/esrgan.py, workflow/nodes_upscale.py) against the published
architectures written out here functionally (F.conv2d straight from each layout's own key names): the original
ESRGAN layout (model.0, model.1.sub.N.RDBK.convJ.0, ...), Real-ESRGAN's x2plus (pixel-unshuffle, in a
{"params_ema": ...} .pth) and SRVGGNetCompact; then the ComfyUI nodes in a workflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from sd35fp8.checkpoints.upscale import load_upscale_model
from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.node_base import NodeContext
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, object_info

NF, GC, NB = 8, 4, 2


def conv(g, cin, cout):
    return torch.randn(cout, cin, 3, 3, generator=g) * (0.5 / (cin * 9) ** 0.5), torch.randn(cout, generator=g) * 0.01


def lrelu(x):
    return F.leaky_relu(x, 0.2)


def old_esrgan_sd(g, ups=2) -> dict:
    sd = {}

    def put(name, cin, cout):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = conv(g, cin, cout)

    put("model.0", 3, NF)
    for i in range(NB):
        for k in (1, 2, 3):
            for j in range(1, 6):
                put(f"model.1.sub.{i}.RDB{k}.conv{j}.0", NF + (j - 1) * GC, GC if j < 5 else NF)
    put(f"model.1.sub.{NB}", NF, NF)
    for k in range(1, ups + 1):
        put(f"model.{3 * k}", NF, NF)
    put(f"model.{3 * ups + 2}", NF, NF)
    put(f"model.{3 * ups + 4}", NF, 3)
    return sd


def old_esrgan_ref(sd: dict, x: torch.Tensor, ups=2) -> torch.Tensor:
    """ESRGAN's RRDB_net as the original repository builds it: Sequential(conv, ShortcutBlock(RRDBs + conv),
    (upsample nearest, conv, lrelu) x n, HR conv, lrelu, last conv)."""
    def c(name, t):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    fea = c("model.0", x)
    trunk = fea
    for i in range(NB):
        rrdb_in = trunk
        for k in (1, 2, 3):
            feats = [trunk]
            for j in range(1, 5):
                feats.append(lrelu(c(f"model.1.sub.{i}.RDB{k}.conv{j}.0", torch.cat(feats, 1))))
            trunk = c(f"model.1.sub.{i}.RDB{k}.conv5.0", torch.cat(feats, 1)) * 0.2 + trunk
        trunk = trunk * 0.2 + rrdb_in
    fea = fea + c(f"model.1.sub.{NB}", trunk)
    for k in range(1, ups + 1):
        fea = lrelu(c(f"model.{3 * k}", F.interpolate(fea, scale_factor=2, mode="nearest")))
    return c(f"model.{3 * ups + 4}", lrelu(c(f"model.{3 * ups + 2}", fea)))


def to_new_names(sd: dict, ups=2) -> dict:
    out = {}
    names = {"model.0": "conv_first", f"model.1.sub.{NB}": "conv_body", f"model.{3 * ups + 2}": "conv_hr",
             f"model.{3 * ups + 4}": "conv_last", **{f"model.{3 * k}": f"conv_up{k}" for k in range(1, ups + 1)}}
    for k, v in sd.items():
        stem, kind = k.rsplit(".", 1)
        if stem in names:
            out[f"{names[stem]}.{kind}"] = v
        else:  # model.1.sub.i.RDBk.convj.0
            p = stem.split(".")
            out[f"body.{p[3]}.rdb{p[4][3]}.{p[5]}.{kind}"] = v
    return out


def test_old_esrgan_layout_matches_reference(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = old_esrgan_sd(g)
    save_file(sd, str(tmp_path / "4x_old.safetensors"))
    net = load_upscale_model(tmp_path / "4x_old.safetensors")
    assert net.scale == 4 and net.config.blocks == NB and net.config.features == NF
    x = torch.rand(1, 3, 6, 7, generator=g)
    torch.testing.assert_close(net(x), old_esrgan_ref(sd, x), rtol=1e-4, atol=1e-5)


def test_real_esrgan_x2plus_pth(tmp_path):
    """Real-ESRGAN x2plus: pixel_unshuffle(2) then the x4 RRDBNet on 12 channels; saved as {"params_ema": sd}."""
    g = torch.Generator().manual_seed(1)
    sd = to_new_names(old_esrgan_sd(g))
    sd["conv_first.weight"], sd["conv_first.bias"] = conv(g, 12, NF)
    torch.save({"params_ema": sd}, tmp_path / "RealESRGAN_x2plus.pth")
    net = load_upscale_model(tmp_path / "RealESRGAN_x2plus.pth")
    assert net.scale == 2 and net.config.unshuffle == 2
    x = torch.rand(1, 3, 8, 6, generator=g)
    old = {f"model.0.{k}": sd[f"conv_first.{k}"] for k in ("weight", "bias")}
    back = to_new_names({k: k for k in old_esrgan_sd(torch.Generator().manual_seed(1))})  # new name -> old
    old.update({back[k]: v for k, v in sd.items() if not k.startswith("conv_first")})
    torch.testing.assert_close(net(x), old_esrgan_ref(old, F.pixel_unshuffle(x, 2)), rtol=1e-4, atol=1e-5)
    assert net(torch.rand(1, 3, 7, 5, generator=g)).shape == (1, 3, 14, 10)  # odd sizes padded, cropped back


def test_compact_matches_reference(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd, convs, nf = {}, 3, 8
    sd["body.0.weight"], sd["body.0.bias"] = conv(g, 3, nf)
    for i in range(convs + 1):
        sd[f"body.{2 * i + 1}.weight"] = torch.rand(nf, generator=g) * 0.3
        if i < convs:
            sd[f"body.{2 * i + 2}.weight"], sd[f"body.{2 * i + 2}.bias"] = conv(g, nf, nf)
    sd[f"body.{2 * convs + 2}.weight"], sd[f"body.{2 * convs + 2}.bias"] = conv(g, nf, 3 * 16)
    save_file(sd, str(tmp_path / "realesr-general-x4v3.safetensors"))
    net = load_upscale_model(tmp_path / "realesr-general-x4v3.safetensors")
    x = torch.rand(1, 3, 5, 4, generator=g)
    h = x
    for i in range(convs + 1):
        h = F.conv2d(h, sd[f"body.{2 * i}.weight"], sd[f"body.{2 * i}.bias"], padding=1)
        h = F.prelu(h, sd[f"body.{2 * i + 1}.weight"])
    h = F.conv2d(h, sd[f"body.{2 * convs + 2}.weight"], sd[f"body.{2 * convs + 2}.bias"], padding=1)
    want = F.pixel_shuffle(h, 4) + F.interpolate(x, scale_factor=4, mode="nearest")
    torch.testing.assert_close(net(x), want, rtol=1e-4, atol=1e-5)


def test_bad_files_name_the_file(tmp_path):
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(tmp_path / "swinir.safetensors"))
    with pytest.raises(CheckpointError, match="swinir.safetensors.*not an upscale model"):
        load_upscale_model(tmp_path / "swinir.safetensors")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_upscale_model(tmp_path / "cut.pth")
    sd = old_esrgan_sd(torch.Generator().manual_seed(0))
    sd["model.1.sub.0.RDB1.conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(sd, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match="wrong.safetensors"):
        load_upscale_model(tmp_path / "wrong.safetensors")


def test_upscale_nodes(tmp_path):
    models = tmp_path / "models"
    (models / "upscale_models").mkdir(parents=True)
    sd = old_esrgan_sd(torch.Generator().manual_seed(3))
    save_file(sd, str(models / "upscale_models" / "4x_test.safetensors"))
    folders = ModelFolders(tmp_path)
    info = object_info(folders)
    assert info["UpscaleModelLoader"]["input"]["required"]["model_name"][0] == ["4x_test.safetensors"]
    assert info["ImageUpscaleWithModel"]["output"] == ["IMAGE"]
    ctx = NodeContext(folders=folders)
    (net,) = NODE_CLASS_MAPPINGS["UpscaleModelLoader"](ctx).load_model("4x_test.safetensors")
    up = NODE_CLASS_MAPPINGS["ImageUpscaleWithModel"](ctx).upscale
    image = torch.rand(2, 24, 40, 3)
    (out,) = up(net, image)
    assert out.shape == (2, 96, 160, 3) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    want = old_esrgan_ref(sd, image.movedim(-1, 1)).clamp(0, 1).movedim(1, -1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)  # one tile: the whole image
    with pytest.raises(InputError, match="Mpx"):
        up(net, torch.zeros(1, 4096, 4096, 3))


def test_upscale_in_a_workflow(tmp_path):
    from sd35fp8.workflow.executor import PromptExecutor

    (tmp_path / "models" / "upscale_models").mkdir(parents=True)
    (tmp_path / "input").mkdir()
    save_file(old_esrgan_sd(torch.Generator().manual_seed(4)), str(tmp_path / "models" / "upscale_models" / "x4.pth.safetensors"))
    Image.fromarray((np.random.default_rng(0).random((16, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / "input" / "a.png")
    ex = PromptExecutor(ModelFolders(tmp_path), device="cpu", dtype=torch.float32)
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}},
              "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "x4.pth.safetensors"}},
              "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
              "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}}}
    result = ex.execute(prompt, prompt_id="u", extra_data={})
    assert result.success, result.error
    (img,) = result.outputs["4"]["images"]
    assert Image.open(tmp_path / "output" / img["subfolder"] / img["filename"]).size == (80, 64)
