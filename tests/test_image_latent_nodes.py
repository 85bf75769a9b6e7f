"""ComfyUI's image batch / transform nodes (workflow/nodes_image.py) and latent arithmetic / transform nodes
(workflow/nodes_latent_ops.py) against ComfyUI's formulas written out here with numpy: LoadImageMask's channel
and alpha inversion, ImageBatch's bilinear center-cropped resize, LatentComposite's feather ramp,
LatentInterpolate's norm interpolation, LatentBatch / LatentBatchSeedBehavior's batch_index; and their
object_info entries (names, inputs, categories as ComfyUI declares them)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd35fp8.errors import InputError
from sd35fp8.image_ops import MAX_CANVAS_PIXELS
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.node_base import MAX_RESOLUTION, NodeContext
from sd35fp8.workflow.nodes import node_info
from sd35fp8.workflow.nodes_image import IMAGE_NODES
from sd35fp8.workflow.nodes_latent_ops import LATENT_OPS_NODES

NODES = {k: v for k, v in {**IMAGE_NODES, **LATENT_OPS_NODES}.items()
         if k not in ("GetImageSize", "ImageScaleToMaxDimension", "ImageBlend")}  # checked on their own below
CTX = NodeContext(folders=None)


def run(name, ctx=CTX, **kw):
    cls = NODES[name]
    return getattr(cls(ctx), cls.FUNCTION)(**kw)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def close(got, ref, tol=1e-6):
    got = got.numpy() if isinstance(got, torch.Tensor) else got
    assert got.shape == np.shape(ref), (got.shape, np.shape(ref))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)


# ---- object_info ------------------------------------------------------------------------------------------
# name: (python_module, category, FUNCTION, display_name, input names in order) as ComfyUI declares them
SPEC = {
    "LoadImageMask": ("nodes", "mask", "load_image", "Load Image (as Mask)", ["image", "channel"]),
    "ImageBatch": ("nodes", "image", "batch", "Batch Images", ["image1", "image2"]),
    "EmptyImage": ("nodes", "image", "generate", "EmptyImage", ["width", "height", "batch_size", "color"]),
    "ImageCrop": ("comfy_extras.nodes_images", "image/transform", "crop", "Crop Image",
                  ["image", "width", "height", "x", "y"]),
    "RepeatImageBatch": ("comfy_extras.nodes_images", "image/batch", "repeat", "RepeatImageBatch",
                         ["image", "amount"]),
    "ImageFromBatch": ("comfy_extras.nodes_images", "image/batch", "frombatch", "ImageFromBatch",
                       ["image", "batch_index", "length"]),
    "ImageRotate": ("comfy_extras.nodes_images", "image/transform", "rotate", "Rotate", ["image", "rotation"]),
    "ImageFlip": ("comfy_extras.nodes_images", "image/transform", "flip", "ImageFlip", ["image", "flip_method"]),
    "LatentComposite": ("nodes", "latent", "composite", "Latent Composite",
                        ["samples_to", "samples_from", "x", "y", "feather"]),
    "LatentBlend": ("nodes", "_for_testing", "blend", "Latent Blend", ["samples1", "samples2", "blend_factor"]),
    "LatentCrop": ("nodes", "latent/transform", "crop", "Crop Latent", ["samples", "width", "height", "x", "y"]),
    "LatentFlip": ("nodes", "latent/transform", "flip", "Flip Latent", ["samples", "flip_method"]),
    "LatentRotate": ("nodes", "latent/transform", "rotate", "Rotate Latent", ["samples", "rotation"]),
    "LatentAdd": ("comfy_extras.nodes_latent", "latent/advanced", "op", "LatentAdd", ["samples1", "samples2"]),
    "LatentSubtract": ("comfy_extras.nodes_latent", "latent/advanced", "op", "LatentSubtract",
                       ["samples1", "samples2"]),
    "LatentMultiply": ("comfy_extras.nodes_latent", "latent/advanced", "op", "LatentMultiply",
                       ["samples", "multiplier"]),
    "LatentInterpolate": ("comfy_extras.nodes_latent", "latent/advanced", "op", "LatentInterpolate",
                          ["samples1", "samples2", "ratio"]),
    "LatentBatch": ("comfy_extras.nodes_latent", "latent/batch", "batch", "LatentBatch", ["samples1", "samples2"]),
    "LatentBatchSeedBehavior": ("comfy_extras.nodes_latent", "latent/advanced", "op", "LatentBatchSeedBehavior",
                                ["samples", "seed_behavior"]),
}


def test_object_info_entries():
    assert set(NODES) == set(SPEC) and not set(IMAGE_NODES) & set(LATENT_OPS_NODES)
    info = node_info("GetImageSize", IMAGE_NODES["GetImageSize"])
    assert info["output"] == ["INT", "INT", "INT"] and info["output_name"] == ["width", "height", "batch_size"]
    for name, cls in NODES.items():
        info = json.loads(json.dumps(node_info(name, cls)))  # JSON-ready
        module, category, function, display, order = SPEC[name]
        assert (info["name"], info["python_module"], info["category"], info["display_name"]) == \
               (name, module, category, display)
        assert cls.FUNCTION == function and callable(getattr(cls, function))
        assert info["input_order"] == {"required": order} and list(info["input"]["required"]) == order
        output = "MASK" if name == "LoadImageMask" else "LATENT" if name.startswith("Latent") else "IMAGE"
        assert info["output"] == [output]
        assert info["output_is_list"] == [False] and info["output_name"] == info["output"]
        assert info["output_node"] is False and info.get("deprecated", False) == (name in ("ImageBatch",
                                                                                          "LatentBatch"))
        for spec in info["input"]["required"].values():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            assert len(spec) in (1, 2) and isinstance(opts, dict)
            if kind in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"]
            elif isinstance(kind, list) and "default" in opts:
                assert opts["default"] in kind
    inputs = node_info("EmptyImage", NODES["EmptyImage"])["input"]["required"]
    assert inputs["color"] == ["INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}]
    assert inputs["width"][1]["max"] == MAX_RESOLUTION == 16384
    assert node_info("LatentComposite", NODES["LatentComposite"])["input"]["required"]["feather"] == \
        ["INT", {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}]
    assert node_info("LatentBatchSeedBehavior", NODES["LatentBatchSeedBehavior"])["input"]["required"][
        "seed_behavior"] == [["random", "fixed"], {"default": "fixed"}]
    assert node_info("LoadImageMask", NODES["LoadImageMask"])["input"]["required"]["channel"] == \
        [["alpha", "red", "green", "blue"]]


# ---- LoadImageMask ----------------------------------------------------------------------------------------
@pytest.fixture
def input_folder(tmp_path):
    folders = ModelFolders(tmp_path / "models", input_dir=tmp_path / "input")
    folders.input_dir.mkdir(parents=True)
    return folders


def test_load_image_mask_channels(input_folder):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(input_folder.input_dir / "m.png")
    ctx = NodeContext(folders=input_folder)
    for channel, ref in (("alpha", 1.0 - rgba[..., 3] / 255.0), ("red", rgba[..., 0] / 255.0),
                         ("green", rgba[..., 1] / 255.0), ("blue", rgba[..., 2] / 255.0)):
        (mask,) = run("LoadImageMask", ctx, image="m.png", channel=channel)
        assert mask.dtype == torch.float32
        close(mask, ref[None].astype(np.float32))
    cls = NODES["LoadImageMask"]
    assert cls.INPUT_TYPES(input_folder)["required"]["image"] == (["m.png"], {"image_upload": True})
    assert cls.IS_CHANGED(input_folder, image="m.png", channel="red") == \
        hashlib.sha256((input_folder.input_dir / "m.png").read_bytes()).hexdigest()
    assert cls.VALIDATE_INPUTS(input_folder, "m.png") is True
    assert cls.VALIDATE_INPUTS(input_folder, "nope.png") == "Invalid image file: nope.png"
    with pytest.raises(InputError, match="nope.png"):
        run("LoadImageMask", ctx, image="nope.png", channel="alpha")
    with pytest.raises(InputError, match="LoadImageMask: channel 'luma'"):
        run("LoadImageMask", ctx, image="m.png", channel="luma")


def test_load_image_mask_converts_to_rgba(input_folder):
    ctx = NodeContext(folders=input_folder)
    rgb = np.random.default_rng(1).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(input_folder.input_dir / "rgb.jpg.png")
    (alpha,) = run("LoadImageMask", ctx, image="rgb.jpg.png", channel="alpha")
    close(alpha, np.zeros((1, 4, 6), np.float32))  # opaque: 1 - 1
    (green,) = run("LoadImageMask", ctx, image="rgb.jpg.png", channel="green")
    close(green, (rgb[..., 1] / 255.0)[None].astype(np.float32))
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(grey, "L").save(input_folder.input_dir / "grey.png")
    (red,) = run("LoadImageMask", ctx, image="grey.png", channel="red")
    close(red, (grey / 255.0)[None].astype(np.float32))
    # 32-bit integer images: scaled by 1/255 (truncated), then clipped to 8 bits by the RGBA conversion
    wide = np.array([[0, 2550, 25500, 1000, 70000]], np.int32)
    Image.fromarray(wide).save(input_folder.input_dir / "wide.tiff")
    (blue,) = run("LoadImageMask", ctx, image="wide.tiff", channel="blue")
    close(blue, (np.clip(wide // 255, 0, 255) / 255.0)[None].astype(np.float32))
    (input_folder.input_dir / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InputError, match="LoadImageMask: cannot read image 'bad.png'"):
        run("LoadImageMask", ctx, image="bad.png", channel="red")


# ---- images -----------------------------------------------------------------------------------------------
def bilinear(img, out_h, out_w):
    """torch's bilinear resize (align_corners=False, no antialias) of [H, W, C]."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    r0, r1, ly = axis(img.shape[0], out_h)
    c0, c1, lx = axis(img.shape[1], out_w)
    top = img[r0][:, c0] * (1 - lx)[None, :, None] + img[r0][:, c1] * lx[None, :, None]
    bottom = img[r1][:, c0] * (1 - lx)[None, :, None] + img[r1][:, c1] * lx[None, :, None]
    return top * (1 - ly)[:, None, None] + bottom * ly[:, None, None]


def center_crop(img, width, height):
    h, w = img.shape[:2]
    old, new = w / h, width / height
    x = round((w - w * (new / old)) / 2) if old > new else 0
    y = round((h - h * (old / new)) / 2) if old < new else 0
    return img[y:h - y, x:w - x]


def test_image_batch():
    a, b = rand(2, 8, 12, 3), rand(3, 10, 10, 3, seed=1)
    (out,) = run("ImageBatch", image1=a, image2=b)
    ref_b = [bilinear(center_crop(x, 12, 8), 8, 12) for x in b.numpy()]
    close(out, np.concatenate([a.numpy(), np.stack(ref_b)]), 1e-5)
    (same,) = run("ImageBatch", image1=a, image2=a[:1])
    close(same, np.concatenate([a.numpy(), a[:1].numpy()]))
    rgba = rand(1, 8, 12, 4, seed=2)
    (out,) = run("ImageBatch", image1=rgba, image2=a)  # the RGB one gets an opaque alpha channel
    close(out, np.concatenate([rgba.numpy(), np.concatenate([a.numpy(), np.ones((2, 8, 12, 1))], -1)]))
    (out,) = run("ImageBatch", image1=a, image2=rgba)
    assert out.shape == (3, 8, 12, 4) and (out[:2, ..., 3] == 1).all()
    with pytest.raises(InputError, match="ImageBatch: cannot batch images of 1 and 3 channels"):
        run("ImageBatch", image1=rand(1, 8, 12, 1), image2=a)
    with pytest.raises(InputError, match="ImageBatch: image2 must be an IMAGE"):
        run("ImageBatch", image1=a, image2=rand(8, 12, 3))


def test_empty_image():
    (img,) = run("EmptyImage", width=5, height=3, batch_size=2, color=0x12F0A0)
    ref = np.broadcast_to(np.array([0x12, 0xF0, 0xA0], np.float32) / np.float32(255), (2, 3, 5, 3))
    close(img, ref)
    assert img.dtype == torch.float32
    for bad, match in (({"width": 0}, "width 0 is outside 1..16384"),
                       ({"height": MAX_RESOLUTION + 1}, "height 16385 is outside"),
                       ({"batch_size": 4097}, "batch_size 4097 is outside 1..4096"),
                       ({"color": 0x1000000}, "color 16777216 is outside"),
                       ({"width": 2.5}, "width must be an integer"),
                       ({"width": True}, "width must be a finite number")):
        with pytest.raises(InputError, match=f"EmptyImage: {match}"):
            run("EmptyImage", **{"width": 8, "height": 8, "batch_size": 1, "color": 0, **bad})
    with pytest.raises(InputError, match=f"EmptyImage: 4096 images of 16384x16384 are more than {MAX_CANVAS_PIXELS}"):
        run("EmptyImage", width=MAX_RESOLUTION, height=MAX_RESOLUTION, batch_size=4096, color=0)


def test_image_crop_repeat_from_batch():
    img = rand(3, 6, 9, 3)
    a = img.numpy()
    (out,) = run("ImageCrop", image=img, width=4, height=3, x=2, y=1)
    close(out, a[:, 1:4, 2:6])
    (out,) = run("ImageCrop", image=img, width=512, height=512, x=100, y=100)  # corner moved to the last pixel
    close(out, a[:, 5:, 8:])
    with pytest.raises(InputError, match="ImageCrop: width 0 is outside"):
        run("ImageCrop", image=img, width=0, height=3, x=0, y=0)
    (out,) = run("RepeatImageBatch", image=img, amount=3)
    close(out, np.concatenate([a, a, a]))
    with pytest.raises(InputError, match="RepeatImageBatch: .* more than"):
        run("RepeatImageBatch", image=torch.zeros(1, 2048, 2048, 3), amount=4096)
    (out,) = run("ImageFromBatch", image=img, batch_index=1, length=5)
    close(out, a[1:3])
    (out,) = run("ImageFromBatch", image=img, batch_index=4095, length=2)
    close(out, a[2:3])
    assert out.data_ptr() != img.data_ptr()


def test_image_rotate_and_flip():
    img = rand(2, 3, 5, 3)
    a = img.numpy()
    h, w = a.shape[1:3]
    cw = np.empty((2, w, h, 3), np.float32)  # 90 degrees clockwise: out[i, j] = in[h - 1 - j, i]
    for i in range(w):
        for j in range(h):
            cw[:, i, j] = a[:, h - 1 - j, i]
    turned = {"none": a, "90 degrees": cw, "180 degrees": a[:, ::-1, ::-1],
              "270 degrees": cw[:, ::-1, ::-1]}
    for rotation, ref in turned.items():
        (out,) = run("ImageRotate", image=img, rotation=rotation)
        close(out, ref)
    (out,) = run("ImageFlip", image=img, flip_method="x-axis: vertically")
    close(out, a[:, ::-1])
    (out,) = run("ImageFlip", image=img, flip_method="y-axis: horizontally")
    close(out, a[:, :, ::-1])
    with pytest.raises(InputError, match="ImageRotate: rotation '45 degrees' is not one of"):
        run("ImageRotate", image=img, rotation="45 degrees")


# ---- latents ----------------------------------------------------------------------------------------------
def latent(*shape, seed=0, **extra):
    return {"samples": randn(*shape, seed=seed), **extra}


def feather_mask(h, w, feather, top, bottom, left, right):
    """LatentComposite's ramp on an h x w block: on each side that lies inside the destination, the t-th row /
    column from that edge (t < feather) weighs (t + 1) / feather; sides multiply."""
    rows, cols = np.ones(h, np.float32), np.ones(w, np.float32)
    for t in range(feather):
        f = np.float32((t + 1) / feather)
        if top:
            rows[t] *= f
        if bottom:
            rows[h - 1 - t] *= f
        if left:
            cols[t] *= f
        if right:
            cols[w - 1 - t] *= f
    return rows[:, None] * cols[None, :]


def test_latent_composite():
    mask_in = torch.ones(1, 1, 16, 16)
    to = latent(2, 16, 16, 16, noise_mask=mask_in, batch_index=[4, 5])
    src = latent(1, 16, 6, 20, seed=1)
    a, b = to["samples"].numpy(), src["samples"].numpy()
    (out,) = run("LatentComposite", samples_to=to, samples_from=src, x=24, y=40, feather=0)
    ref = a.copy()
    ref[:, :, 5:11, 3:16] = b[:, :, :, :13]  # cut at the right edge
    close(out["samples"], ref)
    assert out["noise_mask"] is mask_in and out["batch_index"] == [4, 5]
    assert torch.equal(to["samples"], torch.from_numpy(a))  # the input latent is left alone

    small = latent(1, 16, 6, 5, seed=2)
    s = small["samples"].numpy()
    for x, y, feather, sides in ((16, 24, 16, (True, True, True, True)),  # inside: all four sides fade
                                 (0, 80, 24, (True, False, False, True)),  # top-left flush, bottom edge cut
                                 (88, 0, 8, (False, True, True, False))):  # right edge reached, top flush
        (out,) = run("LatentComposite", samples_to=to, samples_from=small, x=x, y=y, feather=feather)
        xi, yi, f = x // 8, y // 8, feather // 8
        piece = s[:, :, :16 - yi, :16 - xi]
        ph, pw = piece.shape[2:]
        m = feather_mask(ph, pw, f, *sides)
        ref = a.copy()
        ref[:, :, yi:yi + ph, xi:xi + pw] = piece * m + a[:, :, yi:yi + ph, xi:xi + pw] * (1 - m)
        close(out["samples"], ref, 1e-5)
    with pytest.raises(InputError, match="LatentComposite: samples_from .* does not fit"):
        run("LatentComposite", samples_to=latent(1, 16, 8, 8), samples_from=latent(2, 16, 4, 4), x=0, y=0)
    with pytest.raises(InputError, match="LatentComposite: samples_from and samples_to batches"):
        run("LatentComposite", samples_to=latent(3, 16, 8, 8), samples_from=latent(2, 16, 4, 4), x=0, y=0)
    with pytest.raises(InputError, match="LatentComposite: x=128, y=0 puts samples_from"):
        run("LatentComposite", samples_to=latent(1, 16, 8, 8), samples_from=latent(1, 16, 4, 12), x=128, y=0)
    with pytest.raises(InputError, match="LatentComposite: feather -8 is outside"):
        run("LatentComposite", samples_to=to, samples_from=small, x=0, y=0, feather=-8)


def test_latent_blend():
    s1, s2 = latent(2, 16, 4, 6, batch_index=[1, 2]), latent(2, 16, 4, 6, seed=1)
    (out,) = run("LatentBlend", samples1=s1, samples2=s2, blend_factor=0.3)
    close(out["samples"], s1["samples"].numpy() * 0.3 + s2["samples"].numpy() * 0.7)
    assert out["batch_index"] == [1, 2]
    flat = {"samples": torch.full((1, 16, 8, 8), 2.0)}  # bicubic of a constant is that constant
    (out,) = run("LatentBlend", samples1=s1, samples2=flat, blend_factor=0.25)
    close(out["samples"], s1["samples"].numpy() * 0.25 + 2.0 * 0.75)
    with pytest.raises(InputError, match="LatentBlend: blend_factor 1.5 is outside 0..1"):
        run("LatentBlend", samples1=s1, samples2=s2, blend_factor=1.5)
    with pytest.raises(InputError, match="LatentBlend: samples1 and samples2"):
        run("LatentBlend", samples1=s1, samples2=latent(3, 16, 4, 6), blend_factor=0.5)


def test_latent_crop_flip_rotate():
    lat = latent(2, 16, 12, 20, noise_mask=torch.ones(1, 1, 96, 160))
    a = lat["samples"].numpy()
    (out,) = run("LatentCrop", samples=lat, width=64, height=72, x=40, y=16)
    close(out["samples"], a[:, :, 2:11, 5:13])
    assert out["noise_mask"] is lat["noise_mask"]  # ComfyUI leaves the mask uncropped
    (out,) = run("LatentCrop", samples=lat, width=512, height=512, x=1000, y=1000)  # corner >= 8 from the edges
    close(out["samples"], a[:, :, 4:, 12:])
    with pytest.raises(InputError, match="LatentCrop: width 32 is outside 64..16384"):
        run("LatentCrop", samples=lat, width=32, height=64, x=0, y=0)
    (out,) = run("LatentFlip", samples=lat, flip_method="x-axis: vertically")
    close(out["samples"], a[:, :, ::-1])
    (out,) = run("LatentFlip", samples=lat, flip_method="y-axis: horizontally")
    close(out["samples"], a[:, :, :, ::-1])
    cw = np.transpose(a, (0, 1, 3, 2))[:, :, :, ::-1]  # clockwise: out[i, j] = in[h - 1 - j, i]
    for rotation, ref in (("none", a), ("90 degrees", cw), ("180 degrees", a[:, :, ::-1, ::-1]),
                          ("270 degrees", cw[:, :, ::-1, ::-1])):
        (out,) = run("LatentRotate", samples=lat, rotation=rotation)
        close(out["samples"], ref)
    with pytest.raises(InputError, match=r"LatentRotate: samples must be a LATENT with samples \[B, C, h, w\]"):
        run("LatentRotate", samples={"samples": torch.zeros(16, 4, 4)}, rotation="none")


def test_latent_add_subtract_multiply():
    s1, s2 = latent(3, 16, 4, 6, noise_mask=torch.ones(1, 1, 4, 6)), latent(1, 16, 4, 6, seed=1)
    a, b = s1["samples"].numpy(), s2["samples"].numpy()
    (out,) = run("LatentAdd", samples1=s1, samples2=s2)  # samples2 cycled to the batch
    close(out["samples"], a + b)
    assert out["noise_mask"] is s1["noise_mask"]
    (out,) = run("LatentSubtract", samples1=s1, samples2=latent(5, 16, 4, 6, seed=2))  # cut to the batch
    close(out["samples"], a - randn(5, 16, 4, 6, seed=2).numpy()[:3])
    (out,) = run("LatentAdd", samples1=s1, samples2={"samples": torch.full((1, 16, 8, 8), 0.5)})  # resized
    close(out["samples"], a + 0.5)
    (out,) = run("LatentMultiply", samples=s1, multiplier=-2.5)
    close(out["samples"], a * -2.5)
    with pytest.raises(InputError, match="LatentMultiply: multiplier 11 is outside -10.0..10.0"):
        run("LatentMultiply", samples=s1, multiplier=11)
    with pytest.raises(InputError, match="LatentAdd: latents of 16 and 4 channels"):
        run("LatentAdd", samples1=s1, samples2=latent(1, 4, 4, 6))


def interpolate_ref(a, b, ratio):
    """LatentInterpolate as ComfyUI writes it: norms over the channel axis, dropped ([B, h, w]), which numpy's
    broadcasting then lines up with [B, C, h, w] from the right (a batch of 1: each position's own norm)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m1, m2 = np.sqrt((a * a).sum(1)), np.sqrt((b * b).sum(1))
        u1, u2 = np.nan_to_num(a / m1), np.nan_to_num(b / m2)
        t = u1 * ratio + u2 * (1.0 - ratio)
        st = np.nan_to_num(t / np.sqrt((t * t).sum(1)))
    return st * (m1 * ratio + m2 * (1.0 - ratio))


def test_latent_interpolate():
    s1, s2 = latent(1, 16, 5, 7), latent(1, 16, 5, 7, seed=1)
    s1["samples"][:, :, 0, 0] = 0.0  # a zero vector: 0 / 0 -> 0
    s2["samples"][:, :, 0, 0] = 0.0
    for ratio in (0.0, 0.3, 1.0):
        (out,) = run("LatentInterpolate", samples1=s1, samples2=s2, ratio=ratio)
        close(out["samples"], interpolate_ref(s1["samples"].numpy().astype(np.float64),
                                              s2["samples"].numpy().astype(np.float64), ratio), 1e-5)
    assert (out["samples"][:, :, 0, 0] == 0).all()
    # norms keep their length, directions mix: at ratio 0.5 of two opposite-free vectors the norm is the mean
    (out,) = run("LatentInterpolate", samples1=s1, samples2=s2, ratio=0.5)
    norms = torch.linalg.vector_norm(out["samples"], dim=1)
    close(norms[0, 1:], ((torch.linalg.vector_norm(s1["samples"], dim=1)
                          + torch.linalg.vector_norm(s2["samples"], dim=1)) / 2)[0, 1:].numpy(), 1e-5)
    pair1, pair2 = latent(2, 2, 3, 3, seed=3), latent(2, 2, 3, 3, seed=4)  # batch == channels: ComfyUI's pairing
    (out,) = run("LatentInterpolate", samples1=pair1, samples2=pair2, ratio=0.6)
    close(out["samples"], interpolate_ref(pair1["samples"].numpy().astype(np.float64),
                                          pair2["samples"].numpy().astype(np.float64), 0.6), 1e-5)
    with pytest.raises(InputError, match="LatentInterpolate: .*samples1 has a batch of 3"):
        run("LatentInterpolate", samples1=latent(3, 16, 4, 4), samples2=latent(3, 16, 4, 4), ratio=0.5)


def test_latent_batch_and_seed_behavior():
    s1 = latent(2, 16, 4, 6, noise_mask=torch.ones(1, 1, 4, 6))
    s2 = {"samples": torch.full((3, 16, 8, 8), 1.5)}
    (out,) = run("LatentBatch", samples1=s1, samples2=s2)
    close(out["samples"], np.concatenate([s1["samples"].numpy(), np.full((3, 16, 4, 6), 1.5, np.float32)]))
    assert out["batch_index"] == [0, 1, 0, 1, 2] and out["noise_mask"] is s1["noise_mask"]
    (out,) = run("LatentBatch", samples1={**s1, "batch_index": [7, 8]}, samples2={**s2, "batch_index": [1, 1, 3]})
    assert out["batch_index"] == [7, 8, 1, 1, 3]
    assert "batch_index" not in s1  # inputs untouched
    with pytest.raises(InputError, match="LatentBatch: latents of 16 and 4 channels"):
        run("LatentBatch", samples1=s1, samples2=latent(1, 4, 4, 6))

    lat = latent(3, 16, 2, 2)
    (out,) = run("LatentBatchSeedBehavior", samples=lat, seed_behavior="fixed")
    assert out["batch_index"] == [0, 0, 0] and "batch_index" not in lat
    (out,) = run("LatentBatchSeedBehavior", samples={**lat, "batch_index": [5, 6, 7]}, seed_behavior="fixed")
    assert out["batch_index"] == [5, 5, 5]
    given = {**lat, "batch_index": [5, 6, 7]}
    (out,) = run("LatentBatchSeedBehavior", samples=given, seed_behavior="random")
    assert "batch_index" not in out and given["batch_index"] == [5, 6, 7] and out["samples"] is lat["samples"]
    with pytest.raises(InputError, match="LatentBatchSeedBehavior: seed_behavior 'same' is not one of"):
        run("LatentBatchSeedBehavior", samples=lat, seed_behavior="same")


def test_get_image_size():
    from sd35fp8.workflow.nodes_image import GetImageSize

    assert GetImageSize(None).get_size(torch.zeros(3, 40, 56, 3)) == (56, 40, 3)


def test_image_scale_to_max_dimension():
    from sd35fp8.workflow.nodes_image import ImageScaleToMaxDimension

    img = torch.rand(2, 30, 50, 3)
    (out,) = ImageScaleToMaxDimension(None).upscale(img, "bilinear", 20)
    want = F.interpolate(img.movedim(-1, 1), size=(round(30 / 50 * 20), 20), mode="bilinear").movedim(1, -1)
    torch.testing.assert_close(out, want)
    assert ImageScaleToMaxDimension(None).upscale(torch.rand(1, 8, 8, 3), "area", 12)[0].shape == (1, 12, 12, 3)
    with pytest.raises(InputError):
        ImageScaleToMaxDimension(None).upscale(img, "area", 0)


@pytest.mark.parametrize("mode", ["normal", "multiply", "screen", "overlay", "soft_light", "difference"])
def test_image_blend(mode):
    from sd35fp8.workflow.nodes_image import ImageBlend

    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 6, 5, 3, generator=g), torch.rand(2, 6, 5, 3, generator=g)
    ref = {"normal": b, "multiply": a * b, "screen": 1 - (1 - a) * (1 - b),
           "overlay": torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b)),
           "soft_light": torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a),
                                     a + (2 * b - 1) * (torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a,
                                                                    a.sqrt()) - a)),
           "difference": a - b}[mode]
    (out,) = ImageBlend(None).blend_images(a, b, 0.3, mode)
    torch.testing.assert_close(out, torch.clamp(a * 0.7 + ref * 0.3, 0, 1))
    (resized,) = ImageBlend(None).blend_images(a, torch.rand(1, 12, 10, 3, generator=g), 0.5, mode)
    assert resized.shape == a.shape
