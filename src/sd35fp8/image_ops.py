"""Image operations of ComfyUI's image nodes (comfy.utils.common_upscale, Canny, ImageBlur, scale sizes).

Tensors are [B, C, H, W] float in 0..1 unless a function says IMAGE ([B, H, W, C], ComfyUI's).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sd35fp8.errors import InputError

UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
CROP_METHODS = ["disabled", "center"]


def center_crop_to(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy.utils.common_upscale's crop="center": cut the longer side to the target aspect ratio."""
    old_h, old_w = samples.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    x = y = 0
    if old_aspect > new_aspect:
        x = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        y = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    if old_h - 2 * y < 1 or old_w - 2 * x < 1:
        raise InputError(f"a center crop of {old_w}x{old_h} to the aspect ratio of {width}x{height} leaves nothing; "
                         "use crop 'disabled'")
    return samples.narrow(-2, y, old_h - y * 2).narrow(-1, x, old_w - x * 2)


def lanczos(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy.utils.lanczos: each image through PIL's LANCZOS resize (8-bit, as ComfyUI)."""
    out = []
    for img in samples:  # [C, H, W]
        arr = np.clip(255.0 * img.movedim(0, -1).float().cpu().numpy(), 0, 255).astype(np.uint8)
        pil = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr)
        res = np.array(pil.resize((width, height), resample=Image.Resampling.LANCZOS)).astype(np.float32) / 255.0
        res = torch.from_numpy(res)
        out.append(res.unsqueeze(0) if res.ndim == 2 else res.movedim(-1, 0))
    return torch.stack(out).to(samples.device, samples.dtype)


def _slerp_rows(b1: torch.Tensor, b2: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """bislerp's blend of rows b1, b2 [N, C] at ratios r [N, 1]: the unit directions slerped (a zero row's direction
    is zeros), the norms lerped; rows within 1e-5 of parallel keep b1, rows within 1e-5 of opposite are lerped.
    Written as comfy.utils.bislerp's slerp computes it, so the float32 rounding is the same."""
    c = b1.shape[-1]
    n1 = torch.norm(b1, dim=-1, keepdim=True)
    n2 = torch.norm(b2, dim=-1, keepdim=True)
    u1 = b1 / n1
    u2 = b2 / n2
    u1[n1.expand(-1, c) == 0.0] = 0.0
    u2[n2.expand(-1, c) == 0.0] = 0.0
    dot = (u1 * u2).sum(1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    out = ((torch.sin((1.0 - r.squeeze(1)) * omega) / so).unsqueeze(1) * u1
           + (torch.sin(r.squeeze(1) * omega) / so).unsqueeze(1) * u2)
    out *= (n1 * (1.0 - r) + n2 * r).expand(-1, c)
    parallel, opposite = dot > 1 - 1e-5, dot < 1e-5 - 1
    out[parallel] = b1[parallel]
    out[opposite] = (b1 * (1.0 - r) + b2 * r)[opposite]
    return out


def _linear_taps(old: int, new: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For resampling `old` positions to `new`: (ratios, left index, right index), each [1, 1, 1, new] (indices int64,
    the right one clamped at the last position), from a bilinear resize of the positions themselves."""
    left = F.interpolate(torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1), size=(1, new),
                         mode="bilinear")
    ratios = left - left.floor()
    right = torch.arange(old, dtype=torch.float32, device=device).reshape(1, 1, 1, -1) + 1
    right[:, :, :, -1] -= 1
    right = F.interpolate(right, size=(1, new), mode="bilinear")
    return ratios, left.to(torch.int64), right.to(torch.int64)


def bislerp(samples: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """comfy.utils.bislerp: [B, C, H, W] -> [B, C, height, width], each pixel's channel vector slerped between its two
    neighbours (_slerp_rows), along the width and then along the height; computed in float32, back in the input's
    dtype."""
    dtype = samples.dtype
    samples = samples.float()
    n, c, h, w = samples.shape
    ratios, left, right = _linear_taps(w, width, samples.device)
    left, right = left.expand(n, c, h, -1), right.expand(n, c, h, -1)
    ratios = ratios.expand(n, 1, h, -1).movedim(1, -1).reshape(-1, 1)
    rows = _slerp_rows(samples.gather(-1, left).movedim(1, -1).reshape(-1, c),
                       samples.gather(-1, right).movedim(1, -1).reshape(-1, c), ratios)
    across = rows.reshape(n, h, width, c).movedim(-1, 1)  # [B, C, H, width]
    ratios, top, bottom = _linear_taps(h, height, samples.device)
    top = top.reshape(1, 1, -1, 1).expand(n, c, -1, width)
    bottom = bottom.reshape(1, 1, -1, 1).expand(n, c, -1, width)
    ratios = ratios.reshape(1, 1, -1, 1).expand(n, 1, -1, width).movedim(1, -1).reshape(-1, 1)
    rows = _slerp_rows(across.gather(-2, top).movedim(1, -1).reshape(-1, c),
                       across.gather(-2, bottom).movedim(1, -1).reshape(-1, c), ratios)
    return rows.reshape(n, height, width, c).movedim(-1, 1).to(dtype)


def common_upscale(samples: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, height, width] (comfy.utils.common_upscale). "bislerp" (not an image node's method:
    ComfyUI offers it for latents) resamples with bislerp."""
    if method not in UPSCALE_METHODS and method != "bislerp":
        raise InputError(f"upscale_method {method!r}: expected one of {UPSCALE_METHODS}")
    if crop not in CROP_METHODS:
        raise InputError(f"crop {crop!r}: expected one of {CROP_METHODS}")
    if width < 1 or height < 1:
        raise InputError(f"cannot scale an image to {width}x{height}")
    s = center_crop_to(samples, width, height) if crop == "center" else samples
    if method == "lanczos":
        return lanczos(s, width, height)
    if method == "bislerp":
        return bislerp(s, width, height)
    return F.interpolate(s, size=(height, width), mode=method)


def scale_size(w: int, h: int, width: int, height: int) -> tuple[int, int]:
    """ImageScale: a 0 side keeps the aspect ratio; both 0 keeps the size."""
    if width == 0 and height == 0:
        return w, h
    if width == 0:
        width = max(1, round(w * height / h))
    elif height == 0:
        height = max(1, round(h * width / w))
    return width, height


def total_pixels_size(w: int, h: int, megapixels: float, resolution_steps: int = 1) -> tuple[int, int]:
    """ImageScaleToTotalPixels: the aspect ratio kept, megapixels * 1024^2 pixels, sides rounded to steps."""
    scale_by = math.sqrt(int(megapixels * 1024 * 1024) / (w * h))
    return (max(1, round(w * scale_by / resolution_steps) * resolution_steps),
            max(1, round(h * scale_by / resolution_steps) * resolution_steps))


def canny(image: torch.Tensor, low_threshold: float, high_threshold: float) -> torch.Tensor:
    """Canny node: IMAGE [B, H, W, C] -> edges IMAGE [B, H, W, 3] (kornia.filters.canny, as ComfyUI)."""
    from kornia.filters import canny as kornia_canny

    if low_threshold > high_threshold:
        raise InputError(f"Canny: low_threshold {low_threshold} is above high_threshold {high_threshold}")
    if image.shape[-1] == 4:  # RGBA (ImageBatch of an RGBA image, ...): its colour
        image = image[..., :3]
    if image.shape[-1] not in (1, 3):
        raise InputError(f"Canny: needs an RGB or grey image, got {image.shape[-1]} channels")
    _magnitude, edges = kornia_canny(image.movedim(-1, 1).float(), low_threshold, high_threshold)  # [B, 1, H, W]
    return edges.repeat(1, 3, 1, 1).movedim(1, -1)


def gaussian_kernel(kernel_size: int, sigma: float, device=None) -> torch.Tensor:
    """ComfyUI's gaussian_kernel (comfy_extras/nodes_post_processing.py): exp(-d^2 / 2 sigma^2) over a
    linspace(-1, 1) grid, summing to 1 [k, k]; d square-rooted then squared, as written there (float32 rounding)."""
    axis = torch.linspace(-1, 1, kernel_size, device=device)
    x, y = torch.meshgrid(axis, axis, indexing="ij")
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return g / g.sum()


def blur(image: torch.Tensor, blur_radius: int, sigma: float) -> torch.Tensor:
    """ImageBlur: ComfyUI's Gaussian (kernel over linspace(-1, 1), reflect padding); IMAGE in and out."""
    if blur_radius == 0:
        return image
    if blur_radius >= min(image.shape[1], image.shape[2]):
        raise InputError(f"ImageBlur: blur_radius {blur_radius} needs an image larger than {blur_radius} px each way, "
                         f"got {image.shape[2]}x{image.shape[1]}")
    channels = image.shape[-1]
    k = blur_radius * 2 + 1
    kernel = gaussian_kernel(k, sigma).repeat(channels, 1, 1).unsqueeze(1).to(image.device, image.dtype)  # [C,1,k,k]
    img = F.pad(image.movedim(-1, 1), (blur_radius,) * 4, "reflect")
    out = F.conv2d(img, kernel, padding=k // 2, groups=channels)  # [B, C, H + 2r, W + 2r]
    return out[:, :, blur_radius:-blur_radius, blur_radius:-blur_radius].movedim(1, -1)


def repeat_to_batch_size(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """comfy.utils.repeat_to_batch_size: dim 0 cut, or cycled, to batch_size."""
    if t.shape[0] > batch_size:
        return t[:batch_size]
    if t.shape[0] < batch_size:
        return t.repeat([-(-batch_size // t.shape[0])] + [1] * (t.ndim - 1))[:batch_size]
    return t


MAX_CANVAS_PIXELS = 1 << 26  # what an image node may build (64 Mpx: 0.8 GB of float32 RGB)

def pad_for_outpaint(image: torch.Tensor, left: int, top: int, right: int, bottom: int,
                     feathering: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ImagePadForOutpaint: IMAGE [B, H, W, C] on a grey (0.5) canvas grown by the margins, and the MASK
    [1, H', W'] (1 = paint: the margins; inside, a quadratic ramp ((f - d) / f)^2 over the `feathering` pixels
    next to each padded side, d the distance to it; no ramp unless 2 * feathering < H and < W)."""
    b, h, w, c = image.shape
    if (h + top + bottom) * (w + left + right) * b > MAX_CANVAS_PIXELS:
        raise InputError(f"ImagePadForOutpaint: a {w + left + right}x{h + top + bottom} canvas (x{b}) is more than "
                         f"{MAX_CANVAS_PIXELS} pixels")
    canvas = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=torch.float32)
    canvas[:, top:top + h, left:left + w, :] = image
    mask = torch.ones((h + top + bottom, w + left + right), dtype=torch.float32)
    inner = torch.zeros((h, w), dtype=torch.float32)
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        i = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
        j = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
        big_h, big_w = torch.full((h, w), float(h)), torch.full((h, w), float(w))
        d = torch.stack([i if top else big_h, h - i if bottom else big_h,
                         j if left else big_w, w - j if right else big_w]).amin(0)
        v = (feathering - d) / feathering
        inner = torch.where(d < feathering, v * v, inner)
    mask[top:top + h, left:left + w] = inner
    return canvas, mask.unsqueeze(0)
