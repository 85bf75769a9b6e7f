"""ComfyUI's ImageSharpen, ImageQuantize, Morphology, ImageRGBToYUV / ImageYUVToRGB, PorterDuffImageComposite,
Split / JoinImageWithAlpha, ImageStitch, RebatchLatents / RebatchImages (workflow/nodes_image_extra.py) against
references written here: ComfyUI's formulas transcribed with torch / numpy, PIL's quantize and resize, and kornia's
k x k morphology and colour conversions called directly; their object_info entries; and the InputErrors for bad
inputs."""

from __future__ import annotations

import math

import kornia
import kornia.morphology as km
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd35fp8.errors import InputError
from sd35fp8.image_ops import MAX_CANVAS_PIXELS
from sd35fp8.workflow.node_base import NodeContext
from sd35fp8.workflow.nodes import node_info
from sd35fp8.workflow.nodes_image_extra import (
    IMAGE_EXTRA_NODES,
    LIST_NODES,
    MORPHOLOGY_WORK,
)

NODES = {**IMAGE_EXTRA_NODES, **LIST_NODES}
CTX = NodeContext(folders=None)


def run(name, **kw):
    cls = NODES[name]
    return getattr(cls(CTX), cls.FUNCTION)(**kw)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def close(got, ref, tol=1e-6):
    assert tuple(got.shape) == tuple(ref.shape), (tuple(got.shape), tuple(ref.shape))
    np.testing.assert_allclose(got.numpy(), np.asarray(ref), rtol=tol, atol=tol)


# ---- object_info ------------------------------------------------------------------------------------------
# name: (python_module, category, FUNCTION, display_name, required inputs in order, outputs, output names)
SPEC = {
    "ImageSharpen": ("comfy_extras.nodes_post_processing", "image/postprocessing", "sharpen", "ImageSharpen",
                     ["image", "sharpen_radius", "sigma", "alpha"], ["IMAGE"], ["IMAGE"]),
    "ImageQuantize": ("comfy_extras.nodes_post_processing", "image/postprocessing", "quantize", "ImageQuantize",
                      ["image", "colors", "dither"], ["IMAGE"], ["IMAGE"]),
    "Morphology": ("comfy_extras.nodes_morphology", "image/postprocessing", "process", "ImageMorphology",
                   ["image", "operation", "kernel_size"], ["IMAGE"], ["IMAGE"]),
    "ImageRGBToYUV": ("comfy_extras.nodes_morphology", "image/batch", "execute", "ImageRGBToYUV", ["image"],
                      ["IMAGE"] * 3, ["Y", "U", "V"]),
    "ImageYUVToRGB": ("comfy_extras.nodes_morphology", "image/batch", "execute", "ImageYUVToRGB", ["Y", "U", "V"],
                      ["IMAGE"], ["IMAGE"]),
    "PorterDuffImageComposite": ("comfy_extras.nodes_compositing", "mask/compositing", "composite",
                                 "Porter-Duff Image Composite",
                                 ["source", "source_alpha", "destination", "destination_alpha", "mode"],
                                 ["IMAGE", "MASK"], ["IMAGE", "MASK"]),
    "SplitImageWithAlpha": ("comfy_extras.nodes_compositing", "mask/compositing", "split_image_with_alpha",
                            "Split Image with Alpha", ["image"], ["IMAGE", "MASK"], ["IMAGE", "MASK"]),
    "JoinImageWithAlpha": ("comfy_extras.nodes_compositing", "mask/compositing", "join_image_with_alpha",
                           "Join Image with Alpha", ["image", "alpha"], ["IMAGE"], ["IMAGE"]),
    "ImageStitch": ("comfy_extras.nodes_images", "image/transform", "stitch", "Image Stitch",
                    ["image1", "direction", "match_image_size", "spacing_width", "spacing_color"], ["IMAGE"],
                    ["IMAGE"]),
    "RebatchLatents": ("comfy_extras.nodes_rebatch", "latent/batch", "rebatch", "Rebatch Latents",
                       ["latents", "batch_size"], ["LATENT"], ["LATENT"]),
    "RebatchImages": ("comfy_extras.nodes_rebatch", "image/batch", "rebatch", "Rebatch Images",
                      ["images", "batch_size"], ["IMAGE"], ["IMAGE"]),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_object_info(name):
    module, category, function, display, required, outputs, names = SPEC[name]
    cls = NODES[name]
    info = node_info(name, cls)
    assert (info["python_module"], info["category"], cls.FUNCTION, info["display_name"]) == (
        module, category, function, display)
    assert info["input_order"]["required"] == required
    assert (info["output"], info["output_name"]) == (outputs, names)
    lists = name.startswith("Rebatch")
    assert info["output_is_list"] == [lists] * len(outputs)
    assert getattr(cls, "INPUT_IS_LIST", False) is lists


def test_widgets_as_comfyui():
    spec = {n: {**c.INPUT_TYPES(None)["required"], **c.INPUT_TYPES(None).get("optional", {})}
            for n, c in NODES.items()}
    assert spec["ImageSharpen"]["sharpen_radius"][1] == {"default": 1, "min": 1, "max": 31, "step": 1}
    assert spec["ImageSharpen"]["sigma"][1] == {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01}
    assert spec["ImageSharpen"]["alpha"][1] == {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.01}
    assert spec["ImageQuantize"]["colors"][1] == {"default": 256, "min": 1, "max": 256, "step": 1}
    assert spec["ImageQuantize"]["dither"][0] == ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8",
                                                  "bayer-16"]
    assert spec["Morphology"]["operation"][0] == ["erode", "dilate", "open", "close", "gradient", "bottom_hat",
                                                  "top_hat"]
    assert spec["Morphology"]["kernel_size"][1] == {"default": 3, "min": 3, "max": 999, "step": 1}
    assert spec["PorterDuffImageComposite"]["mode"] == (
        ["ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN", "MULTIPLY",
         "OVERLAY", "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT", "SRC_OVER", "XOR"], {"default": "DST"})
    st = spec["ImageStitch"]
    assert st["direction"] == (["right", "down", "left", "up"], {"default": "right"})
    assert st["match_image_size"] == ("BOOLEAN", {"default": True})
    assert st["spacing_width"][1] == {"default": 0, "min": 0, "max": 1024, "step": 2}
    assert st["spacing_color"] == (["white", "black", "red", "green", "blue"], {"default": "white"})
    assert list(NODES["ImageStitch"].INPUT_TYPES(None)["optional"]) == ["image2"]
    for name in ("RebatchLatents", "RebatchImages"):
        assert spec[name]["batch_size"][1] == {"default": 1, "min": 1, "max": 4096}


# ---- ImageSharpen -----------------------------------------------------------------------------------------
def ref_sharpen(image, radius, sigma, alpha):
    """ComfyUI's Sharpen, transcribed."""
    k = radius * 2 + 1
    x, y = torch.meshgrid(torch.linspace(-1, 1, k), torch.linspace(-1, 1, k), indexing="ij")
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    kernel = g / g.sum() * -(alpha * 10)
    c = k // 2
    kernel[c, c] = kernel[c, c] - kernel.sum() + 1.0
    kernel = kernel.repeat(image.shape[-1], 1, 1).unsqueeze(1)
    t = F.pad(image.permute(0, 3, 1, 2), (radius,) * 4, "reflect")
    out = F.conv2d(t, kernel, padding=c, groups=image.shape[-1])[:, :, radius:-radius, radius:-radius]
    return torch.clamp(out.permute(0, 2, 3, 1), 0, 1)


@pytest.mark.parametrize("radius,sigma,alpha,channels", [(1, 1.0, 1.0, 3), (3, 0.5, 2.5, 4), (5, 10.0, 0.0, 1)])
def test_sharpen(radius, sigma, alpha, channels):
    image = rand(2, 11, 13, channels)
    (out,) = run("ImageSharpen", image=image, sharpen_radius=radius, sigma=sigma, alpha=alpha)
    close(out, ref_sharpen(image, radius, sigma, alpha), 1e-5)
    if alpha == 0.0:
        close(out, image, 1e-6)


# ---- ImageQuantize ----------------------------------------------------------------------------------------
def ref_quantize(image, colors, dither):
    """ComfyUI's Quantize with PIL, transcribed (np.bmat's Bayer matrix)."""
    def bayer_matrix(n):
        if n == 0:
            return np.zeros((1, 1), "float32")
        q = 4 ** n
        m = q * bayer_matrix(n - 1)
        return np.bmat(((m - 1.5, m + 0.5), (m + 1.5, m - 0.5))) / q

    result = torch.zeros_like(image)
    for b in range(image.shape[0]):
        im = Image.fromarray((image[b] * 255).to(torch.uint8).numpy())
        pal = im.quantize(colors=colors)
        if dither == "none":
            q = im.quantize(palette=pal, dither=Image.Dither.NONE)
        elif dither == "floyd-steinberg":
            q = im.quantize(palette=pal, dither=Image.Dither.FLOYDSTEINBERG)
        else:
            order = int(dither.split("-")[-1])
            spread = 2 * 256 / (len(pal.getpalette()) // 3)
            bm = torch.from_numpy(np.asarray(spread * bayer_matrix(int(math.log2(order))) + 0.5))
            r = torch.from_numpy(np.array(im).astype(np.float32))
            tiled = bm.tile(math.ceil(r.shape[0] / bm.shape[0]), math.ceil(r.shape[1] / bm.shape[1])).unsqueeze(-1)
            r.add_(tiled[:r.shape[0], :r.shape[1]]).clamp_(0, 255)
            q = Image.fromarray(r.to(torch.uint8).numpy()).quantize(palette=pal, dither=Image.Dither.NONE)
        result[b] = torch.tensor(np.array(q.convert("RGB"))).float() / 255
    return result


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.bmat, as ComfyUI calls it
@pytest.mark.parametrize("dither", ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"])
@pytest.mark.parametrize("colors", [1, 5, 256])
def test_quantize(dither, colors):
    image = rand(2, 19, 23, 3, seed=colors)
    (out,) = run("ImageQuantize", image=image, colors=colors, dither=dither)
    close(out, ref_quantize(image, colors, dither), 0)
    assert all(len(torch.unique(out[b].reshape(-1, 3), dim=0)) <= colors for b in range(2))


# ---- Morphology -------------------------------------------------------------------------------------------
KORNIA = {"erode": km.erosion, "dilate": km.dilation, "open": km.opening, "close": km.closing,
          "gradient": km.gradient, "top_hat": km.top_hat, "bottom_hat": km.bottom_hat}


@pytest.mark.parametrize("operation", sorted(KORNIA))
@pytest.mark.parametrize("k", [3, 4, 5, 8, 14, 15, 30, 999])
def test_morphology_is_kornia_square(operation, k):
    """The node's row / column passes (kernels past the image cut to it) equal ComfyUI's call: kornia's function
    over a k x k kernel of ones (999 cut to 2 * max(H, W) - 1 here, which covers the whole image from any pixel;
    test_morphology_cut_kernel checks that cut)."""
    image = rand(2, 7, 9, 3, seed=k)
    (out,) = run("Morphology", image=image, operation=operation, kernel_size=k)
    kk = k if k <= 30 else 17  # ComfyUI's own kernel; 999 x 999 (slow in kornia) as 17 x 17
    close(out, KORNIA[operation](image.movedim(-1, 1), torch.ones(kk, kk)).movedim(1, -1), 0)


@pytest.mark.parametrize("k", [17, 18, 19, 24])
def test_morphology_cut_kernel(k):
    """kornia over any k >= 2 * max(H, W) - 1 gives what it gives at 2 * max(H, W) - 1 = 17 (even k too)."""
    x = rand(1, 3, 7, 9, seed=k)
    for f in KORNIA.values():
        close(f(x, torch.ones(k, k)), f(x, torch.ones(17, 17)), 0)


def test_morphology_large_kernel_is_global_extreme():
    image = rand(1, 6, 5, 3)
    (out,) = run("Morphology", image=image, operation="dilate", kernel_size=999)
    close(out, image.amax(dim=(1, 2), keepdim=True).expand_as(image), 0)


def test_morphology_work_bound():
    image = torch.zeros(1, 1024, 1024, 3)
    with pytest.raises(InputError, match="Morphology: .*element visits"):
        run("Morphology", image=image, operation="open", kernel_size=999)
    assert 4 * 3 * 1024 * 1024 * 999 > MORPHOLOGY_WORK


# ---- ImageRGBToYUV / ImageYUVToRGB ------------------------------------------------------------------------
def test_rgb_to_yuv_and_back():
    image = rand(2, 5, 6, 3)
    y, u, v = run("ImageRGBToYUV", image=image)
    ycc = kornia.color.rgb_to_ycbcr(image.movedim(-1, 1)).movedim(1, -1)
    for i, t in enumerate((y, u, v)):
        close(t, ycc[..., i:i + 1].expand_as(image), 0)
    r, g, b = image.unbind(-1)
    luma = 0.299 * r + 0.587 * g + 0.114 * b  # BT.601, full range, chroma centred on 0.5
    close(y[..., 0], luma, 1e-5)
    close(u[..., 0], (b - luma) * 0.564 + 0.5, 1e-3)
    close(v[..., 0], (r - luma) * 0.713 + 0.5, 1e-3)
    (back,) = run("ImageYUVToRGB", Y=y, U=u, V=v)
    close(back, kornia.color.ycbcr_to_rgb(torch.cat([y[..., :1], u[..., :1], v[..., :1]], -1).movedim(-1, 1))
          .movedim(1, -1), 1e-6)
    close(back, image, 1e-4)


def test_yuv_to_rgb_averages_the_channels():
    y, u, v = rand(1, 4, 4, 3, seed=1), rand(1, 4, 4, 4, seed=2), rand(1, 4, 4, 1, seed=3)
    (out,) = run("ImageYUVToRGB", Y=y, U=u, V=v)
    yuv = torch.cat([y.mean(-1, keepdim=True), u.mean(-1, keepdim=True), v], -1)
    close(out, kornia.color.ycbcr_to_rgb(yuv.movedim(-1, 1)).movedim(1, -1), 1e-6)


# ---- compositing ------------------------------------------------------------------------------------------
# ComfyUI's operators on premultiplied colours (s, d) and alphas (sa, da): (alpha, colour)
PD = {
    "ADD": lambda s, sa, d, da: (np.clip(sa + da, 0, 1), np.clip(s + d, 0, 1)),
    "CLEAR": lambda s, sa, d, da: (0 * da, 0 * d),
    "DARKEN": lambda s, sa, d, da: (sa + da - sa * da, (1 - da) * s + (1 - sa) * d + np.minimum(s, d)),
    "DST": lambda s, sa, d, da: (da, d),
    "DST_ATOP": lambda s, sa, d, da: (sa, sa * d + (1 - da) * s),
    "DST_IN": lambda s, sa, d, da: (sa * da, d * sa),
    "DST_OUT": lambda s, sa, d, da: ((1 - sa) * da, (1 - sa) * d),
    "DST_OVER": lambda s, sa, d, da: (da + (1 - da) * sa, d + (1 - da) * s),
    "LIGHTEN": lambda s, sa, d, da: (sa + da - sa * da, (1 - da) * s + (1 - sa) * d + np.maximum(s, d)),
    "MULTIPLY": lambda s, sa, d, da: (sa * da, s * d),
    "OVERLAY": lambda s, sa, d, da: (sa + da - sa * da,
                                     np.where(2 * d < da, 2 * s * d, sa * da - 2 * (da - s) * (sa - d))),
    "SCREEN": lambda s, sa, d, da: (sa + da - sa * da, s + d - s * d),
    "SRC": lambda s, sa, d, da: (sa, s),
    "SRC_ATOP": lambda s, sa, d, da: (da, da * s + (1 - sa) * d),
    "SRC_IN": lambda s, sa, d, da: (sa * da, s * da),
    "SRC_OUT": lambda s, sa, d, da: ((1 - da) * sa, (1 - da) * s),
    "SRC_OVER": lambda s, sa, d, da: (sa + (1 - sa) * da, s + (1 - sa) * d),
    "XOR": lambda s, sa, d, da: ((1 - da) * sa + (1 - sa) * da, (1 - da) * s + (1 - sa) * d),
}


def ref_porter_duff(src, src_mask, dst, dst_mask, mode):
    """Per item, as ComfyUI's loop: masks -> alpha, premultiply, operator, un-premultiply, alpha -> mask."""
    images, masks = [], []
    for i in range(min(len(src), len(src_mask), len(dst), len(dst_mask))):
        sa, da = 1 - src_mask[i].numpy()[..., None], 1 - dst_mask[i].numpy()[..., None]
        s, d = src[i].numpy() * sa, dst[i].numpy() * da
        a, img = PD[mode](s, sa, d, da)
        with np.errstate(divide="ignore", invalid="ignore"):
            img = np.clip(np.where(a > 1e-5, img / a, 0), 0, 1)
        images.append(img)
        masks.append(1 - a[..., 0])
    return np.stack(images), np.stack(masks)


@pytest.mark.parametrize("mode", sorted(PD))
def test_porter_duff(mode):
    src, dst = rand(3, 6, 7, 3, seed=1), rand(2, 6, 7, 3, seed=2)
    src_mask, dst_mask = rand(2, 6, 7, seed=3), rand(3, 6, 7, seed=4)
    src_mask[0, 0, :3] = 1.0  # fully transparent source pixels
    dst_mask[0, 0, :2] = 1.0
    image, mask = run("PorterDuffImageComposite", source=src, source_alpha=src_mask, destination=dst,
                      destination_alpha=dst_mask, mode=mode)
    ref_image, ref_mask = ref_porter_duff(src, src_mask, dst, dst_mask, mode)
    close(image, ref_image, 1e-5)
    close(mask, ref_mask, 1e-6)


def test_porter_duff_resizes_to_destination():
    """Different sizes: destination_alpha and source brought to the destination (bicubic, centre crop) first."""
    src, src_mask = rand(1, 4, 10, 3, seed=1), rand(1, 4, 10, seed=2)
    dst, dst_mask = rand(1, 8, 8, 3, seed=3), rand(1, 5, 5, seed=4)
    image, mask = run("PorterDuffImageComposite", source=src, source_alpha=src_mask, destination=dst,
                      destination_alpha=dst_mask, mode="SRC_OVER")

    def bicubic_center(x, w, h):  # [B, C, H, W]: comfy.utils.common_upscale(..., "bicubic", "center")
        oh, ow = x.shape[-2:]
        oa, na = ow / oh, w / h
        cx = round((ow - ow * (na / oa)) / 2) if oa > na else 0
        cy = round((oh - oh * (oa / na)) / 2) if oa < na else 0
        x = x[..., cy:oh - cy, cx:ow - cx]
        return F.interpolate(x, size=(h, w), mode="bicubic")

    src_r = bicubic_center(src.movedim(-1, 1), 8, 8).movedim(1, -1)
    dst_mask_r = bicubic_center(dst_mask[:, None], 8, 8)[:, 0]
    src_mask_r = bicubic_center(src_mask[:, None], 8, 8)[:, 0]
    ref_image, ref_mask = ref_porter_duff(src_r, src_mask_r, dst, dst_mask_r, "SRC_OVER")
    close(image, ref_image, 1e-5)
    close(mask, ref_mask, 1e-6)


def test_split_and_join_alpha():
    rgba, rgb = rand(2, 5, 6, 4), rand(2, 5, 6, 3, seed=1)
    image, mask = run("SplitImageWithAlpha", image=rgba)
    close(image, rgba[..., :3], 0)
    close(mask, 1 - rgba[..., 3], 0)
    image, mask = run("SplitImageWithAlpha", image=rgb)
    close(image, rgb, 0)
    close(mask, torch.zeros(2, 5, 6), 0)

    alpha = rand(1, 3, 4, seed=2)  # one mask for two images, at another size: bilinear to the image
    (joined,) = run("JoinImageWithAlpha", image=rgba, alpha=alpha)
    resized = F.interpolate(alpha.reshape(-1, 1, 3, 4), size=(5, 6), mode="bilinear").squeeze(1)
    close(joined, torch.cat([rgba[..., :3], (1 - resized).repeat(2, 1, 1)[..., None]], -1), 1e-6)
    (joined,) = run("JoinImageWithAlpha", image=rgb[:1], alpha=rand(3, 5, 6, seed=3))  # the image repeated
    assert joined.shape == (3, 5, 6, 4)
    close(joined[..., :3], rgb[:1].repeat(3, 1, 1, 1), 0)
    close(joined[..., 3], 1 - rand(3, 5, 6, seed=3), 1e-6)
    round_trip = run("JoinImageWithAlpha", image=image, alpha=mask)[0]
    close(round_trip, torch.cat([rgb, torch.ones(2, 5, 6, 1)], -1), 1e-6)


# ---- ImageStitch ------------------------------------------------------------------------------------------
def pil_lanczos(x, w, h):
    out = []
    for img in x:
        arr = np.clip(255.0 * img.numpy(), 0, 255).astype(np.uint8)
        res = np.array(Image.fromarray(arr).resize((w, h), resample=Image.Resampling.LANCZOS)).astype(np.float32)
        out.append(torch.from_numpy(res / 255.0))
    return torch.stack(out)


def test_stitch_right_matched_with_spacing():
    a, b = rand(2, 6, 5, 3, seed=1), rand(1, 3, 4, 3, seed=2)
    (out,) = run("ImageStitch", image1=a, image2=b, direction="right", match_image_size=True, spacing_width=3,
                 spacing_color="red")
    b2 = pil_lanczos(b, 8, 6).repeat(2, 1, 1, 1)  # height 6, width int(6 * 4 / 3); last image repeated
    bar = torch.zeros(2, 6, 4, 3)  # 3 made even
    bar[..., 0] = 1.0
    close(out, torch.cat([a, bar, b2], dim=2), 0)


def test_stitch_up_matched_rgba():
    a, b = rand(1, 4, 6, 4, seed=1), rand(1, 5, 3, 3, seed=2)
    (out,) = run("ImageStitch", image1=a, image2=b, direction="up", match_image_size=True, spacing_width=2,
                 spacing_color="white")
    b2 = pil_lanczos(b, 6, int(6 / (3 / 5)))
    b2 = torch.cat([b2, torch.ones(*b2.shape[:-1], 1)], -1)  # opaque alpha added
    close(out, torch.cat([b2, torch.ones(1, 2, 6, 4), a], dim=1), 0)


@pytest.mark.parametrize("direction", ["left", "down"])
def test_stitch_unmatched_pads(direction):
    a, b = rand(1, 3, 4, 3, seed=1), rand(1, 6, 7, 1, seed=2)
    (out,) = run("ImageStitch", image1=a, image2=b, direction=direction, match_image_size=False, spacing_width=0,
                 spacing_color="black")
    b3 = torch.cat([b, torch.ones(1, 6, 7, 2)], -1)
    if direction == "left":  # heights 3 and 6: image1 padded 1 above, 2 below, with black (0)
        a_pad = F.pad(a, (0, 0, 0, 0, 1, 2), value=0.0)
        close(out, torch.cat([b3, a_pad], dim=2), 0)
    else:  # widths 4 and 7: image1 padded 1 left, 2 right
        a_pad = F.pad(a, (0, 0, 1, 2), value=0.0)
        close(out, torch.cat([a_pad, b3], dim=1), 0)


def test_stitch_without_image2_and_canvas_bound():
    a = rand(1, 4, 4, 3)
    assert run("ImageStitch", image1=a, direction="right", match_image_size=True, spacing_width=0,
               spacing_color="white")[0] is a
    wide = torch.zeros(1, 1, 16384, 3)
    tall = torch.zeros(1, 8192, 1, 3)
    with pytest.raises(InputError, match="ImageStitch: .*pixels"):  # matched: 8192 x int(8192 * 16384) wide
        run("ImageStitch", image1=tall, image2=wide, direction="right", match_image_size=True, spacing_width=0,
            spacing_color="white")
    with pytest.raises(InputError, match="ImageStitch: .*would be"):  # matched height int(1 / 16384) = 0
        run("ImageStitch", image1=wide[:, :, :1], image2=wide, direction="down", match_image_size=True,
            spacing_width=0, spacing_color="white")
    big = torch.zeros(1, 1, 1, 3).expand(MAX_CANVAS_PIXELS // 8192, 8192, 1, 3)
    with pytest.raises(InputError, match="ImageStitch: .*pixels"):  # 2 px wide: twice the bound
        run("ImageStitch", image1=big, image2=big, direction="right", match_image_size=False, spacing_width=0,
            spacing_color="white")


# ---- RebatchLatents / RebatchImages -----------------------------------------------------------------------
def ref_rebatch_latents(latents, batch_size):
    """ComfyUI's LatentRebatch, transcribed (its no-op mask interpolate left out)."""
    def get_batch(lat, offset):
        s = lat["samples"]
        mask = lat.get("noise_mask", torch.ones((s.shape[0], 1, s.shape[2] * 8, s.shape[3] * 8)))
        if mask.shape[0] < s.shape[0]:
            mask = mask.repeat((s.shape[0] - 1) // mask.shape[0] + 1, 1, 1, 1)[:s.shape[0]]
        inds = lat["batch_index"] if "batch_index" in lat else [x + offset for x in range(s.shape[0])]
        return s, mask, inds

    def slices(x, num):
        sl = [x[i * batch_size:(i + 1) * batch_size] for i in range(num)]
        return sl, (x[num * batch_size:] if num * batch_size < len(x) else None)

    def slice_batch(batch, num):
        return list(zip(*[slices(x, num) for x in batch]))

    out, cur, processed = [], (None, None, None), 0
    for lat in latents:
        nxt = get_batch(lat, processed)
        processed += len(nxt[2])
        if cur[0] is None:
            cur = nxt
        elif nxt[0].shape[-2:] != cur[0].shape[-2:]:
            sl, _ = slice_batch(cur, 1)
            out.append({"samples": sl[0][0], "noise_mask": sl[1][0], "batch_index": sl[2][0]})
            cur = nxt
        else:
            cur = [torch.cat((a, b)) if torch.is_tensor(a) else a + b for a, b in zip(cur, nxt)]
        if cur[0].shape[0] > batch_size:
            num = cur[0].shape[0] // batch_size
            sl, rem = slice_batch(cur, num)
            for i in range(num):
                out.append({"samples": sl[0][i], "noise_mask": sl[1][i], "batch_index": sl[2][i]})
            cur = rem
    if cur[0] is not None:
        sl, _ = slice_batch(cur, 1)
        out.append({"samples": sl[0][0], "noise_mask": sl[1][0], "batch_index": sl[2][0]})
    for s in out:
        if s["noise_mask"].mean() == 1.0:
            del s["noise_mask"]
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 3, 5])
def test_rebatch_latents(batch_size):
    latents = [
        {"samples": rand(3, 16, 4, 4, seed=1)},
        {"samples": rand(2, 16, 4, 4, seed=2), "noise_mask": rand(1, 1, 32, 32, seed=3)},
        {"samples": rand(1, 16, 4, 4, seed=4), "batch_index": [7]},
        {"samples": rand(4, 16, 2, 3, seed=5)},  # another size: a new batch
    ]
    (got,) = run("RebatchLatents", latents=latents, batch_size=[batch_size])
    ref = ref_rebatch_latents(latents, batch_size)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert sorted(g) == sorted(r)
        close(g["samples"], r["samples"], 0)
        assert list(g["batch_index"]) == list(r["batch_index"])
        if "noise_mask" in r:
            close(g["noise_mask"], r["noise_mask"], 0)
    # the executor passes a single value: one latent, batch_size as a number
    (single,) = run("RebatchLatents", latents=latents[0], batch_size=2)
    assert [tuple(x["samples"].shape) for x in single] == [(2, 16, 4, 4), (1, 16, 4, 4)]
    assert [x["batch_index"] for x in single] == [[0, 1], [2]]


@pytest.mark.parametrize("batch_size", [1, 2, 4, 10])
def test_rebatch_images(batch_size):
    images = [rand(3, 4, 5, 3, seed=1), rand(2, 4, 5, 3, seed=2)]
    (got,) = run("RebatchImages", images=images, batch_size=[batch_size])
    frames = [img[i:i + 1] for img in images for i in range(img.shape[0])]
    ref = [torch.cat(frames[i:i + batch_size]) for i in range(0, len(frames), batch_size)]
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        close(g, r, 0)


# ---- bad inputs -------------------------------------------------------------------------------------------
IMG = rand(1, 8, 8, 3)
MASK = rand(1, 8, 8)
BAD = [
    ("ImageSharpen", {"image": IMG, "sharpen_radius": 8, "sigma": 1.0, "alpha": 1.0}, "sharpen_radius 8 needs"),
    ("ImageSharpen", {"image": IMG, "sharpen_radius": 0, "sigma": 1.0, "alpha": 1.0}, "sharpen_radius 0 is outside"),
    ("ImageSharpen", {"image": IMG, "sharpen_radius": 1, "sigma": float("nan"), "alpha": 1.0}, "sigma must be a finite"),
    ("ImageSharpen", {"image": torch.zeros(1, 0, 8, 3), "sharpen_radius": 1, "sigma": 1.0, "alpha": 1.0}, "image is empty"),
    ("ImageSharpen", {"image": MASK, "sharpen_radius": 1, "sigma": 1.0, "alpha": 1.0}, "must be an IMAGE"),
    ("ImageQuantize", {"image": rand(1, 8, 8, 4), "colors": 4, "dither": "none"}, "3 channels"),
    ("ImageQuantize", {"image": IMG, "colors": 0, "dither": "none"}, "colors 0 is outside"),
    ("ImageQuantize", {"image": IMG, "colors": 4, "dither": "bayer-3"}, "dither 'bayer-3' is not one of"),
    ("ImageQuantize", {"image": torch.zeros(0, 8, 8, 3), "colors": 4, "dither": "none"}, "image is empty"),
    ("Morphology", {"image": IMG, "operation": "smooth", "kernel_size": 3}, "operation 'smooth'"),
    ("Morphology", {"image": IMG, "operation": "erode", "kernel_size": 1000}, "kernel_size 1000 is outside"),
    ("Morphology", {"image": IMG.to(torch.uint8), "operation": "erode", "kernel_size": 3}, "float IMAGE"),
    ("ImageRGBToYUV", {"image": rand(1, 8, 8, 4)}, "3 channels"),
    ("ImageYUVToRGB", {"Y": IMG, "U": IMG, "V": rand(2, 8, 8, 3)}, "same batch and size"),
    ("ImageYUVToRGB", {"Y": IMG, "U": "x", "V": IMG}, "U must be an IMAGE"),
    ("PorterDuffImageComposite", {"source": IMG, "source_alpha": MASK, "destination": rand(1, 8, 8, 4),
                                      "destination_alpha": MASK, "mode": "SRC"}, "3 channels, destination 4"),
    ("PorterDuffImageComposite", {"source": IMG, "source_alpha": IMG, "destination": IMG, "destination_alpha": MASK,
                                      "mode": "SRC"}, "source_alpha must be a MASK"),
    ("PorterDuffImageComposite", {"source": IMG, "source_alpha": MASK, "destination": IMG, "destination_alpha": MASK,
                                      "mode": "src"}, "mode 'src' is not one of"),
    ("PorterDuffImageComposite", {"source": IMG, "source_alpha": torch.zeros(1, 0, 8), "destination": IMG,
                                      "destination_alpha": MASK, "mode": "SRC"}, "source_alpha is empty"),
    ("SplitImageWithAlpha", {"image": None}, "must be an IMAGE"),
    ("JoinImageWithAlpha", {"image": IMG, "alpha": rand(1, 1, 8, 8)}, "alpha must be a MASK"),
    ("JoinImageWithAlpha", {"image": torch.zeros(1, 1, 1, 3).expand(1, 8192, 8192, 3), "alpha": rand(2, 2, 2)},
     "more than"),
    ("ImageStitch", {"image1": IMG, "image2": IMG, "direction": "sideways", "match_image_size": True, "spacing_width": 0,
                         "spacing_color": "white"}, "direction 'sideways'"),
    ("ImageStitch", {"image1": IMG, "image2": IMG, "direction": "right", "match_image_size": "yes", "spacing_width": 0,
                         "spacing_color": "white"}, "match_image_size must be a BOOLEAN"),
    ("ImageStitch", {"image1": IMG, "image2": IMG, "direction": "right", "match_image_size": True, "spacing_width": 2000,
                         "spacing_color": "white"}, "spacing_width 2000 is outside"),
    ("ImageStitch", {"image1": IMG, "image2": rand(1, 8, 8, 5), "direction": "right", "match_image_size": True,
                         "spacing_width": 0, "spacing_color": "white"}, "1 to 4 channels"),
    ("RebatchLatents", {"latents": [{"samples": rand(1, 16, 4, 4)}], "batch_size": [0]}, "batch_size 0 is outside"),
    ("RebatchLatents", {"latents": [{"samples": rand(1, 16, 4)}], "batch_size": [1]}, "samples \\[B, C, h, w\\]"),
    ("RebatchLatents", {"latents": [{"samples": rand(1, 16, 4, 4)}, {"samples": rand(1, 4, 4, 4)}],
                            "batch_size": [2]}, "16 and 4 channels"),
    ("RebatchLatents", {"latents": [{"samples": rand(1, 16, 4, 4), "noise_mask": rand(1, 1, 8, 8)},
                                     {"samples": rand(1, 16, 4, 4)}], "batch_size": [2]}, "noise masks of"),
    ("RebatchImages", {"images": [rand(1, 4, 4, 3), rand(1, 5, 4, 3)], "batch_size": [2]}, "different sizes"),
    ("RebatchImages", {"images": ["x"], "batch_size": [2]}, "must be an IMAGE"),
]


@pytest.mark.parametrize("name,kwargs,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_are_input_errors(name, kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        run(name, **kwargs)
    assert name in str(info.value)
