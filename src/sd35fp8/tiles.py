"""Overlapping spatial tiles with feathered blending: the tiled VAE decode / encode (models/vae.py) and the
upscale models (workflow/nodes_upscale.py) apply a function tile by tile to bound their memory.

    run_tiled(fn, x [B, C, H, W], tile, overlap, out_channels, num, den) -> [B, out, H * num / den, W * num / den]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering [0, size); the last tile is pushed back to end exactly at `size`."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def balanced_tile(size: int, tile: int, overlap: int, align: int = 1) -> int:
    """The smallest tile (<= `tile`, a multiple of `align`) that covers `size` with as few tiles as
    `tile` needs, at least `overlap` apart: 128 latents with 64-tiles and overlap 16 take 3 tiles of 54,
    not 3 of 64 (a third less decode work and a lower peak, same overlap)."""
    if size <= tile:
        return size
    n = math.ceil((size - overlap) / (tile - overlap))
    return min(tile, math.ceil(math.ceil((size + (n - 1) * overlap) / n) / align) * align)


def ramp(length: int, feather: int, lead: bool, trail: bool) -> torch.Tensor:
    """1-D blend weights: linear ramps (t + 1) / (feather + 1) on interior sides, 1 elsewhere; never 0."""
    w = torch.ones(length, dtype=torch.float32)
    f = min(feather, length)
    up = torch.arange(1, f + 1, dtype=torch.float32) / (f + 1)
    if lead:
        w[:f] = torch.minimum(w[:f], up)
    if trail:
        w[length - f:] = torch.minimum(w[length - f:], up.flip(0))
    return w


def run_tiled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
              out_channels: int, num: int, den: int, out_dtype: torch.dtype,
              on_tile: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Apply `fn` on overlapping spatial tiles of x and blend: output size = input size * num / den.
    on_tile(done, total) before each tile (progress, interrupts)."""
    b, _, hgt, wid = x.shape
    out = torch.zeros(b, out_channels, hgt * num // den, wid * num // den, dtype=torch.float32, device=x.device)
    weight = torch.zeros(1, 1, out.shape[2], out.shape[3], dtype=torch.float32, device=x.device)
    feather = overlap * num // den
    th, tw = balanced_tile(hgt, tile, overlap, den), balanced_tile(wid, tile, overlap, den)
    ys, xs = tile_starts(hgt, th, overlap), tile_starts(wid, tw, overlap)
    for i, y0 in enumerate(ys):
        wy = ramp(th * num // den, feather, y0 > 0, y0 + th < hgt)
        for j, x0 in enumerate(xs):
            wx = ramp(tw * num // den, feather, x0 > 0, x0 + tw < wid)
            if on_tile is not None:
                on_tile(i * len(xs) + j, len(ys) * len(xs))
            piece = fn(x[:, :, y0:y0 + th, x0:x0 + tw]).float()  # [B, C, th*num/den, tw*num/den]
            mask = (wy[:, None] * wx[None, :]).to(x.device)  # [th', tw']
            oy, ox = y0 * num // den, x0 * num // den
            out[:, :, oy:oy + piece.shape[2], ox:ox + piece.shape[3]] += piece * mask
            weight[:, :, oy:oy + piece.shape[2], ox:ox + piece.shape[3]] += mask
    return (out / weight).to(out_dtype)
