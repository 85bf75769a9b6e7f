"""Area and mask conditioning (ComfyUI's ConditioningSetArea / SetAreaPercentage / SetMask), as comfy/samplers.py
computes it:

- resolve (resolve_areas_and_cond_masks_multidim): a percentage area becomes latent units (h, w, y, x) for this
  latent; a mask is resized bilinearly to the latent; "mask bounds" (set_area_to_bounds) makes the area the
  mask's bounding box (at least 8 x 8);
- pair (create_cond_with_same_area_if_none): every area entry of one side gets an entry on the other side with
  the same area and the text of that side's smallest entry covering it, so CFG compares like with like;
- each step (get_area_and_mult, calc_cond_batch): each active entry's model call sees only its area of x; its
  prediction is weighted by mult = strength x (mask, or ones feathered over min(8, size / 4) latent pixels at
  the edges inside the image) and the weighted sum divided by the summed weights (+1e-37: where nothing
  covers, the prediction is 0).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError

Area = tuple[int, int, int, int]  # (h, w, y, x) in latent pixels
CondEntry = Any  # guidance.CondEntry (guidance imports this module, so not imported back)


def _mask_aabb(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of mask [H, W]'s non-zero pixels; None when all are 0 (get_mask_aabb)."""
    ys, xs = torch.where(mask != 0)
    if ys.numel() == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def resolve(entry: CondEntry, dims: tuple[int, int], device: torch.device) -> CondEntry:
    """The entry with its area in latent pixels of a latent of `dims` (h, w) and its mask [b, h, w] there."""
    if not entry.regional:
        return entry
    h, w = dims
    area, mask = entry.area, entry.mask
    if area is not None and area[0] == "percentage":
        _, ph, pw, py, px = area
        area = (max(1, round(ph * h)), max(1, round(pw * w)), round(py * h), round(px * w))
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.float32)
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape[1:]) != (h, w):
            mask = F.interpolate(mask.unsqueeze(1), size=(h, w), mode="bilinear").squeeze(1)
        if entry.set_area_to_bounds:
            box = _mask_aabb(torch.max(torch.abs(mask), dim=0).values)
            if box is None:  # an all-zero mask: the smallest area (the entry then adds nothing)
                area = (8, 8, 0, 0)
            else:
                x0, y0, x1, y1 = box
                area = (max(8, y1 - y0 + 1), max(8, x1 - x0 + 1), y0, x0)
    if area is not None:
        area = tuple(int(v) for v in area)
        if area[2] >= h or area[3] >= w or area[2] < 0 or area[3] < 0:
            raise InputError(f"conditioning area (y {area[2] * 8}, x {area[3] * 8} px) lies outside the "
                             f"{w * 8}x{h * 8} px image")
    return replace(entry, area=area, mask=mask)


def _covers(a: Area, c: Area) -> bool:
    return c[2] >= a[2] and c[3] >= a[3] and a[0] + a[2] >= c[0] + c[2] and a[1] + a[3] >= c[1] + c[3]


def pair(sides: list[list[CondEntry]]) -> None:
    """ComfyUI's create_cond_with_same_area_if_none, for every entry of each side against the other sides
    (in place, in ComfyUI's order: the entries added to a side take part in the sides after it)."""
    for k, side in enumerate(sides):
        for c in list(side):
            if c.area is None:
                continue
            for kk, other in enumerate(sides):
                if kk == k:
                    continue
                smallest = None
                for x in other:
                    if x.area is not None:
                        if _covers(x.area, c.area) and (
                                smallest is None or smallest.area is None
                                or smallest.area[0] * smallest.area[1] > x.area[0] * x.area[1]):
                            smallest = x
                    elif smallest is None:
                        smallest = x
                if smallest is None or (smallest.area is not None and smallest.area == c.area):
                    continue
                # c's area, mask, strength and range, with the other side's text (ComfyUI copies model_conds)
                text = replace(c.cond, context=smallest.cond.context, pooled=smallest.cond.pooled)
                other.append(replace(c, cond=text))


def crop_and_mult(entry: CondEntry, x: torch.Tensor) -> tuple[torch.Tensor, Area, torch.Tensor]:
    """get_area_and_mult for a resolved entry: (x's crop [B, C, h, w], its area, mult [B, C, h, w])."""
    B, C, H, W = x.shape
    if entry.area is None:
        area = (H, W, 0, 0)
    else:
        h, w, y, x0 = entry.area
        area = (min(H - y, h), min(W - x0, w), y, x0)
    h, w, y, x0 = area
    crop = x[:, :, y:y + h, x0:x0 + w]
    if entry.mask is not None:
        mask = entry.mask[:B, y:y + h, x0:x0 + w] * entry.mask_strength
        if B % mask.shape[0]:
            raise InputError(f"a conditioning mask has {mask.shape[0]} images for a batch of {B} latents")
        mult = mask.unsqueeze(1).repeat(B // mask.shape[0], C, 1, 1) * entry.strength
    else:
        mult = torch.ones_like(crop, dtype=torch.float32) * entry.strength
        if entry.area is not None:
            for dim, (size, start, full) in enumerate(((h, y, H), (w, x0, W))):
                rr = min(8, mult.shape[2 + dim] // 4)
                if start != 0:
                    for t in range(rr):
                        mult.narrow(2 + dim, t, 1).mul_((1.0 / rr) * (t + 1))
                if size + start < full:
                    for t in range(rr):
                        mult.narrow(2 + dim, size - 1 - t, 1).mul_((1.0 / rr) * (t + 1))
    return crop, area, mult
