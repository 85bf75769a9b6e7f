"""A contact sheet of an evaluation: one row per item (caption, reference render, one image per mode).

Each generated image gets a green frame when the detector scored it correct, red otherwise; the
reference column is the world's own render of a scene satisfying the item. Pillow's default font.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from .world import EvalItem, render

CELL = 128  # px per image cell (images are resized with NEAREST so pixels stay visible)
PAD = 6
CAPTION_W = 230
HEADER_H = 22
BG = (255, 255, 255)
TEXT = (20, 20, 20)
OK, BAD = (30, 160, 60), (210, 40, 40)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def contact_sheet(items: Sequence[EvalItem], images: Mapping[str, Sequence[np.ndarray]],
                  correct: Mapping[str, Sequence[bool]] | None = None, reference: bool = True,
                  cell: int = CELL) -> Image.Image:
    """Grid image: rows = items, columns = caption | reference | each mode (in `images` order).

    images: {mode: [uint8 [H, W, 3] per item]}; correct: {mode: [bool per item]} for the frames.
    """
    modes = list(images)
    for m in modes:
        if len(images[m]) != len(items):
            raise InputError(f"contact_sheet: {len(images[m])} images for mode {m!r} but {len(items)} items")
        if correct is not None and len(correct.get(m, ())) != len(items):
            raise InputError(f"contact_sheet: correct[{m!r}] must hold one bool per item")
    columns = (["reference"] if reference else []) + modes
    font = ImageFont.load_default()
    step = cell + PAD
    sheet = Image.new("RGB", (CAPTION_W + PAD + step * len(columns), HEADER_H + step * max(1, len(items))), BG)
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        x = CAPTION_W + PAD + j * step
        draw.text((x + 2, 4), name, fill=TEXT, font=font)
    for i, item in enumerate(items):
        y = HEADER_H + i * step
        lines = _wrap(draw, f"{i}. [{item.category}] {item.caption}", font, CAPTION_W - 2 * PAD)
        draw.multiline_text((PAD, y + 4), "\n".join(lines), fill=TEXT, font=font, spacing=3)
        cells = ([render(item.scene, cell)] if reference else []) + [images[m][i] for m in modes]
        for j, arr in enumerate(cells):
            x = CAPTION_W + PAD + j * step
            tile = Image.fromarray(np.asarray(arr, dtype=np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
            sheet.paste(tile, (x, y))
            mode = columns[j]
            if correct is not None and mode in correct:
                colour = OK if correct[mode][i] else BAD
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=colour, width=2)
    return sheet
