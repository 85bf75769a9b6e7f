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
