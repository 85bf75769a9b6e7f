"""ComfyUI's image-node arithmetic: scale sizes, centre crop, Canny through kornia, blur."""

from __future__ import annotations

import pytest
import torch

from sd35fp8.errors import InputError
from sd35fp8.image_ops import blur, canny, center_crop_to, common_upscale, scale_size, total_pixels_size


def test_sizes():
    assert scale_size(640, 480, 0, 240) == (320, 240)
    assert scale_size(640, 480, 320, 0) == (320, 240)
    assert scale_size(640, 480, 0, 0) == (640, 480)
    w, h = total_pixels_size(2048, 1024, 1.0)
    assert (w, h) == (1448, 724)  # sqrt(2^20 / 2^21) = 0.7071: round(2048 * 0.7071), round(1024 * 0.7071)
    assert total_pixels_size(2048, 1024, 1.0, 64) == (1472, 704)


def test_center_crop_and_upscale():
    img = torch.arange(4 * 8, dtype=torch.float32).view(1, 1, 4, 8)
    crop = center_crop_to(img, 4, 4)  # 2:1 -> 1:1 keeps the middle 4 columns
    assert torch.equal(crop, img[..., 2:6])
    assert common_upscale(img, 2, 2, "nearest-exact", "center").shape == (1, 1, 2, 2)
    assert common_upscale(torch.rand(1, 3, 16, 16), 8, 4, "lanczos", "disabled").shape == (1, 3, 4, 8)
    with pytest.raises(InputError, match="upscale_method"):
        common_upscale(img, 2, 2, "bogus", "disabled")


def test_canny_edges_of_a_square():
    img = torch.zeros(1, 32, 32, 3)
    img[:, 8:24, 8:24] = 1.0
    edges = canny(img, 0.4, 0.8)  # IMAGE [B, H, W, 3] of 0/1
    assert edges.shape == (1, 32, 32, 3)
    assert edges[0, 16, 16, 0] == 0 and edges[0, 0, 0, 0] == 0
    assert edges[0, 7:10, 16, 0].max() == 1  # the top side is an edge
    with pytest.raises(InputError, match="above"):
        canny(img, 0.9, 0.2)


def test_blur_keeps_constant_images():
    img = torch.full((1, 16, 16, 3), 0.5)
    assert torch.allclose(blur(img, 3, 1.0), img, atol=1e-6)
    assert blur(img, 0, 1.0) is img


def comfy_pad_for_outpaint(image, left, top, right, bottom, feathering):
    """ComfyUI nodes.py ImagePadForOutpaint.expand_image, loop for loop."""
    d1, d2, d3, d4 = image.size()
    new_image = torch.ones((d1, d2 + top + bottom, d3 + left + right, d4), dtype=torch.float32) * 0.5
    new_image[:, top:top + d2, left:left + d3, :] = image
    mask = torch.ones((d2 + top + bottom, d3 + left + right), dtype=torch.float32)
    t = torch.zeros((d2, d3), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < d2 and feathering * 2 < d3:
        for i in range(d2):
            for j in range(d3):
                dt = i if top != 0 else d2
                db = d2 - i if bottom != 0 else d2
                dl = j if left != 0 else d3
                dr = d3 - j if right != 0 else d3
                d = min(dt, db, dl, dr)
                if d >= feathering:
                    continue
                v = (feathering - d) / feathering
                t[i, j] = v * v
    mask[top:top + d2, left:left + d3] = t
    return new_image, mask.unsqueeze(0)


@pytest.mark.parametrize("sides", [(16, 0, 8, 0), (0, 8, 0, 24), (8, 8, 8, 8), (0, 0, 0, 0)])
@pytest.mark.parametrize("feathering", [0, 5, 12, 40])
def test_pad_for_outpaint_is_comfyuis(sides, feathering):
    from sd35fp8.image_ops import pad_for_outpaint

    image = torch.rand(2, 30, 26, 3, generator=torch.Generator().manual_seed(0))
    got, mask = pad_for_outpaint(image, *sides, feathering)
    ref, ref_mask = comfy_pad_for_outpaint(image, *sides, feathering)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(mask, ref_mask, rtol=0, atol=1e-7)


def test_pad_for_outpaint_is_bounded():
    from sd35fp8.image_ops import pad_for_outpaint

    with pytest.raises(InputError, match="canvas"):
        pad_for_outpaint(torch.zeros(1, 8, 8, 3), 16384, 16384, 16384, 16384, 0)
