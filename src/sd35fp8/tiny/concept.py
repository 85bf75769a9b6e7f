"""A colour the shipped model never saw: "brown", taught by the shipped LoRA (tiny/train_lora.py).

The world's palette has 8 colours (world.COLOUR_RGB); brown (130, 75, 30) is >= 48 CIELAB units
from each of them (nearest: orange 48.7, red 49.4) and >= 111 RGB units from every background,
so the detector separates it like any palette colour. Scenes are drawn by the world itself with a
marker colour, and the marker object's pixels are recoloured along the background->colour line
(anti-aliasing and box downsampling mix linearly in RGB, so edges stay exact). Bounding boxes of
a scene's objects never overlap (world.GAP), so the object's box holds only it and background.

Scoring: an item "a brown <shape>" is right when the detector finds a blob of that shape whose
colour, named over the palette + brown (detector.name_colour(..., extra=)), is brown.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import detector, world
from .captions import SHAPES

NEW_COLOUR = "brown"
NEW_RGB = (130, 75, 30)
PALETTE_PLUS = {NEW_COLOUR: NEW_RGB}


def _recolour(image: np.ndarray, scene: world.Scene, index: int, size: int, marker: str,
              coverage: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Recolour object `index` (drawn in `marker`) to NEW_RGB inside its bounding box. coverage: also return
    the object's coverage [size, size] in [0, 1] (0 background .. 1 the object's colour)."""
    obj = scene.objects[index]
    bg = np.array(world.BACKGROUND_RGB[scene.background], dtype=np.float64)
    col = np.array(world.COLOUR_RGB[marker], dtype=np.float64) - bg  # [3]
    r = obj.radius * size + 2
    x0, x1 = max(int(obj.x * size - r), 0), min(int(obj.x * size + r) + 1, size)
    y0, y1 = max(int(obj.y * size - r), 0), min(int(obj.y * size + r) + 1, size)
    patch = image[y0:y1, x0:x1].astype(np.float64) - bg  # [h, w, 3]
    t = np.clip(patch @ col / (col @ col), 0.0, 1.0)[..., None]  # [h, w, 1] 0 bg .. 1 marker
    out = image.copy()
    out[y0:y1, x0:x1] = np.clip(np.rint(bg + t * (np.array(NEW_RGB) - bg)), 0, 255).astype(np.uint8)
    if not coverage:
        return out
    cov = np.zeros(image.shape[:2], dtype=np.float32)
    cov[y0:y1, x0:x1] = t[..., 0]
    return out, cov


def brown_scene(rng: np.random.Generator, size: int = 128, coverage: bool = False):
    """(image uint8 [size, size, 3], caption) of a scene with one brown object: single (60 %) or two
    objects (40 %), the other object from the world's training pool. coverage: (image, caption, the brown
    object's coverage float32 [size, size] in [0, 1]); the same draws from rng either way."""
    mix = {"single": 0.6, "two": 0.4}
    scene = world.sample_scene(rng, "train", mix=mix)
    i = int(rng.integers(len(scene.objects)))
    others = {o.colour for j, o in enumerate(scene.objects) if j != i}
    marker = next(c for c in world.COLOUR_RGB if c not in others)
    drawn = replace(scene, objects=tuple(replace(o, colour=marker) if j == i else o
                                         for j, o in enumerate(scene.objects)))
    said = replace(scene, objects=tuple(replace(o, colour=NEW_COLOUR) if j == i else o
                                        for j, o in enumerate(scene.objects)))
    image, cov = _recolour(world.render(drawn, size), drawn, i, size, marker, coverage=True)
    caption = world.caption(said, rng)
    return (image, caption, cov) if coverage else (image, caption)


def concept_prompts(n: int) -> list[tuple[str, str]]:
    """n evaluation prompts (canonical form) cycling over the 8 shapes: (shape, caption)."""
    return [(SHAPES[i % len(SHAPES)], f"a photo of a {NEW_COLOUR} {SHAPES[i % len(SHAPES)]}") for i in range(n)]


def concept_correct(image: np.ndarray, shape: str) -> bool:
    """A blob of `shape` whose colour (palette + brown) is brown."""
    return any(d.shape == shape and detector.name_colour(d.rgb, extra=PALETTE_PLUS) == NEW_COLOUR
               for d in detector.detect(image))


def colour_hits(image: np.ndarray) -> list[str]:
    """Colour names (palette + brown) of the detected blobs."""
    return [detector.name_colour(d.rgb, extra=PALETTE_PLUS) for d in detector.detect(image)]
