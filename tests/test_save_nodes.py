"""ComfyUI's SaveImageAdvanced (comfy_extras/nodes_images.py) and SaveText (comfy_extras/nodes_text.py), in
workflow/nodes_utility.py: files, names, metadata, object_info, refusals (formats we cannot encode, paths outside
the output folder, oversized text). The official templates that use them convert and validate in
tests/test_utility_nodes.py (both are in UTILITY_NODES)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sd35fp8.errors import InputError
from sd35fp8.workflow import nodes_utility
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.node_base import NodeContext
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, node_info


@pytest.fixture
def ctx(tmp_path):
    return NodeContext(folders=ModelFolders(tmp_path / "models", output_dir=tmp_path / "out"))


def files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def save_image(ctx, images, prefix="ComfyUI", fmt="png", bit_depth="8-bit", color="sRGB", **kw):
    node = NODE_CLASS_MAPPINGS["SaveImageAdvanced"](ctx)
    return node.save_images(images, prefix, fmt, **{"format.bit_depth": bit_depth,
                                                    "format.input_color_space": color}, **kw)


# --- SaveImageAdvanced --------------------------------------------------------------------------------------

def test_save_image_advanced_png8_names_metadata_passthrough(ctx, tmp_path):
    images = torch.rand(2, 6, 5, 3)
    out = save_image(ctx, images, "sub/pic_%batch_num%", prompt={"1": {"inputs": {}}},
                     extra_pnginfo={"workflow": {"nodes": []}})
    assert out["result"][0] is images
    assert out["ui"] == {"images": [{"filename": "pic_0_00001.png", "subfolder": "sub", "type": "output"},
                                    {"filename": "pic_1_00002.png", "subfolder": "sub", "type": "output"}]}
    with Image.open(tmp_path / "out/sub/pic_0_00001.png") as im:
        assert im.mode == "RGB" and im.size == (5, 6)
        assert json.loads(im.text["prompt"]) == {"1": {"inputs": {}}}
        assert json.loads(im.text["workflow"]) == {"nodes": []}
        expected = np.clip(255.0 * images[0].numpy(), 0, 255).astype(np.uint8)  # SaveImage's pixels
        assert (np.asarray(im) == expected).all()
    # the counter past the files already there (as ComfyUI's scan: pic_1_00002.png counts as pic's 1)
    again = save_image(ctx, images[:1], "sub/pic")
    assert again["ui"]["images"][0]["filename"] == "pic_00002.png"
    again = save_image(ctx, images[:1], "sub/pic")
    assert again["ui"]["images"][0]["filename"] == "pic_00003.png"
    # %batch_num% in the prefix: ComfyUI's counter scan never matches it; the first free name is taken
    again = save_image(ctx, images[:1], "sub/pic_%batch_num%")
    assert again["ui"]["images"][0]["filename"] == "pic_0_00002.png"


@pytest.mark.parametrize("channels,mode", [(1, "I;16"), (3, "RGB"), (4, "RGBA")])
def test_save_image_advanced_png16(ctx, tmp_path, channels, mode):
    images = torch.rand(1, 7, 9, channels)
    out = save_image(ctx, images, "deep", bit_depth="16-bit", prompt={"p": 1})
    path = tmp_path / "out" / out["ui"]["images"][0]["filename"]
    raw = path.read_bytes()
    assert raw[24] == 16  # IHDR bit depth
    with Image.open(path) as im:
        assert im.size == (9, 7) and im.text["prompt"] == '{"p": 1}'
        if channels == 1:  # Pillow reads 16-bit grayscale as is (RGB(A) 16-bit it narrows to 8 bits)
            expected = (images[0, ..., 0] * 65535.0).clamp(0, 65535).to(torch.int32).numpy()
            assert (np.asarray(im).astype(np.int64) == expected).all()
        else:
            assert im.mode == mode


def test_save_image_advanced_png8_gray_and_rgba(ctx, tmp_path):
    for c, mode in ((1, "L"), (4, "RGBA")):
        out = save_image(ctx, torch.rand(1, 4, 4, c), f"c{c}")
        with Image.open(tmp_path / "out" / out["ui"]["images"][0]["filename"]) as im:
            assert im.mode == mode


@pytest.mark.parametrize("fmt,bit_depth,color,needle", [
    ("exr", "32-bit float", "linear", "'exr' is not supported"),
    ("avif", "auto", "HDR PQ", "'avif' is not supported"),
    ("png", "32-bit float", "sRGB", "bit_depth '32-bit float'"),
    ("png", "16-bit", "HDR", "input_color_space 'HDR'"),
    ("tiff", "8-bit", "sRGB", "format 'tiff'"),
])
def test_save_image_advanced_refusals(ctx, tmp_path, fmt, bit_depth, color, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        save_image(ctx, torch.rand(1, 4, 4, 3), "x", fmt, bit_depth, color)
    assert not (tmp_path / "out").exists() or files(tmp_path / "out") == []


def test_save_image_advanced_bad_images(ctx):
    with pytest.raises(InputError, match="2-channel"):
        save_image(ctx, torch.rand(1, 4, 4, 2))
    with pytest.raises(InputError, match="empty batch"):
        save_image(ctx, torch.rand(0, 4, 4, 3))
    with pytest.raises(InputError, match="IMAGE"):
        save_image(ctx, "not an image")


@pytest.mark.parametrize("prefix", ["../escape", "../../etc/x", "/tmp/abs/x", "a/../../b"])
def test_save_image_advanced_stays_in_output(ctx, tmp_path, prefix):
    with pytest.raises(InputError, match="outside the output folder"):
        save_image(ctx, torch.rand(1, 4, 4, 3), prefix)
    assert files(tmp_path) == []


def test_save_image_advanced_object_info():
    info = node_info("SaveImageAdvanced", NODE_CLASS_MAPPINGS["SaveImageAdvanced"])
    assert info["category"] == "image" and info["output_node"] is True
    assert info["display_name"] == "Save Image (Advanced)" and info["python_module"] == "comfy_extras.nodes_images"
    assert info["output"] == ["IMAGE"] and info["output_name"] == ["images"]
    assert info["input_order"] == {"required": ["images", "filename_prefix", "format"],
                                   "optional": ["format.bit_depth", "format.input_color_space"],
                                   "hidden": ["prompt", "extra_pnginfo"]}
    req, opt = info["input"]["required"], info["input"]["optional"]
    assert req["filename_prefix"][1]["default"] == "ComfyUI"
    assert req["format"][0] == ["png", "exr", "avif"] and req["format"][1]["default"] == "png"
    assert opt["format.bit_depth"][1]["default"] == "8-bit"
    assert {"8-bit", "16-bit", "32-bit float", "auto"} <= set(opt["format.bit_depth"][0])
    assert opt["format.input_color_space"][1]["default"] == "sRGB"


# --- SaveText -----------------------------------------------------------------------------------------------

def run_text(ctx, text, prefix="ComfyUI", fmt="txt"):
    return NODE_CLASS_MAPPINGS["SaveText"](ctx).execute(text, prefix, fmt)


def test_save_text_formats(ctx, tmp_path):
    out = run_text(ctx, "héllo\nworld", "notes/n", "txt")
    assert out == {"ui": {"text": ("héllo\nworld",),
                          "files": [{"filename": "n_00001.txt", "subfolder": "notes", "type": "output"}]},
                   "result": ("héllo\nworld",)}
    assert (tmp_path / "out/notes/n_00001.txt").read_text(encoding="utf-8") == "héllo\nworld"
    out = run_text(ctx, '{"a": [1, "é"]}', "notes/n", "json")  # pretty-printed, as ComfyUI
    assert out["ui"]["files"][0]["filename"] == "n_00002.json"
    assert (tmp_path / "out/notes/n_00002.json").read_text(encoding="utf-8") == \
        json.dumps({"a": [1, "é"]}, indent=2, ensure_ascii=False)
    run_text(ctx, "{not json", "notes/n", "json")  # written as is
    assert (tmp_path / "out/notes/n_00003.json").read_text(encoding="utf-8") == "{not json"
    run_text(ctx, "# t", "notes/n", "md")
    assert files(tmp_path / "out") == ["notes/n_00001.txt", "notes/n_00002.json", "notes/n_00003.json",
                                       "notes/n_00004.md"]


@pytest.mark.parametrize("prefix", ["../escape", "../../etc/passwd", "/etc/x", "a/../../b", "..\\..\\x/../../y"])
def test_save_text_stays_in_output(ctx, tmp_path, prefix):
    with pytest.raises(InputError, match="outside the output folder"):
        run_text(ctx, "x", prefix)
    assert files(tmp_path) == []


def test_save_text_bounds(ctx, tmp_path, monkeypatch):
    monkeypatch.setattr(nodes_utility, "MAX_SAVE_TEXT_BYTES", 100)
    with pytest.raises(InputError, match="at most 100"):
        run_text(ctx, "x" * 101)
    with pytest.raises(InputError, match="bytes"):
        run_text(ctx, "é" * 60)  # 60 characters, 120 bytes
    deep = "[" * 20 + "0,0,0,0,0" + "]" * 20  # indenting multiplies it
    assert len(deep) < 100
    with pytest.raises(InputError, match="pretty-printed JSON"):
        run_text(ctx, deep, fmt="json")
    assert files(tmp_path) == []
    run_text(ctx, "x" * 100)


def test_save_text_refusals(ctx):
    with pytest.raises(InputError, match="format 'pdf'"):
        run_text(ctx, "x", fmt="pdf")
    with pytest.raises(InputError, match="text must be a string"):
        run_text(ctx, 3)


def test_save_text_object_info():
    info = node_info("SaveText", NODE_CLASS_MAPPINGS["SaveText"])
    assert info["category"] == "text" and info["output_node"] is True and info["display_name"] == "Save Text"
    assert info["output"] == ["STRING"] and info["output_name"] == ["text"]
    assert info["input_order"] == {"required": ["text", "filename_prefix", "format"]}
    req = info["input"]["required"]
    assert req["text"] == ["STRING", {"forceInput": True}]
    assert req["filename_prefix"] == ["STRING", {"default": "ComfyUI"}]
    assert req["format"] == [["txt", "md", "json"], {"default": "txt"}]
