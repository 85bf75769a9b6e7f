"""A procedural world of coloured shapes for training and evaluating the tiny text-to-image model.

Scenes hold 1-3 flat shapes on a plain background. Positions and radii are fractions of the image
side, so one scene renders at any size (anti-aliased: drawn at 4x, then box-downsampled by Pillow).

Scene kinds (default training mix, KIND_WEIGHTS): "single" 30 %, "two" 40 % (laid out so one
relation holds clearly: the two centres differ at least twice as much on the relation's axis as on
the other, bounding boxes >= 8 px apart at 128 px), "count" 12 % (2-3 identical objects), "three"
18 % (three distinct). Training may ask for another mix (`sample_scene(..., mix=)`).

Held-out split (never produced by `sample_scene(rng, "train")`):
- HELDOUT_OBJECTS: 8 of the 64 (shape, colour) pairs, one per shape and one per colour (12.5 %),
  so every shape and every colour is still seen in training with 7 partners.
- HELDOUT_PAIRS: 12 unordered pairs of *seen* objects that never share an image in training
  (neither in "two" nor in "three" scenes): the model must compose them for any relation.
An eval item of split "heldout" contains a held-out object or a held-out pair.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from ..errors import InputError
from .captions import BACKGROUNDS, COLOURS, RELATIONS, SHAPES, SIZES, ObjectSpec, describe

# Palette: saturated colours whose pairwise CIELAB distance is >= ~40 and >= ~100 (RGB) from every
# background, so a blurry generated image still names them apart.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (140, 60, 200),
    "pink": (245, 130, 200),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
# Half-extent of every shape's bounding box, as a fraction of the image side (14 / 20 / 27 px at 128).
SIZE_RADIUS: dict[str, float] = {"small": 14 / 128, "medium": 20 / 128, "large": 27 / 128}
GAP = 8 / 128  # minimum free space between two objects' bounding boxes
MARGIN = 3 / 128  # minimum free space between an object and the image border
RING_INNER = 0.55  # inner radius / outer radius of a ring

HELDOUT_OBJECTS: frozenset[tuple[str, str]] = frozenset({
    ("circle", "purple"), ("square", "orange"), ("triangle", "cyan"), ("star", "pink"),
    ("ring", "yellow"), ("cross", "blue"), ("heart", "green"), ("diamond", "red"),
})
HELDOUT_PAIRS: frozenset[frozenset[tuple[str, str]]] = frozenset(frozenset(p) for p in (
    (("circle", "red"), ("square", "blue")),
    (("star", "green"), ("triangle", "yellow")),
    (("ring", "orange"), ("cross", "purple")),
    (("heart", "cyan"), ("diamond", "pink")),
    (("star", "blue"), ("ring", "red")),
    (("circle", "yellow"), ("cross", "green")),
    (("square", "pink"), ("star", "cyan")),
    (("heart", "purple"), ("diamond", "orange")),
    (("triangle", "red"), ("circle", "cyan")),
    (("heart", "blue"), ("square", "yellow")),
    (("ring", "green"), ("triangle", "orange")),
    (("cross", "pink"), ("diamond", "blue")),
))
ALL_OBJECTS: tuple[tuple[str, str], ...] = tuple(itertools.product(SHAPES, COLOURS))
SEEN_OBJECTS: tuple[tuple[str, str], ...] = tuple(o for o in ALL_OBJECTS if o not in HELDOUT_OBJECTS)
CATEGORIES: tuple[str, ...] = ("single", "two_object", "two_relation", "count", "three")
KIND_WEIGHTS: dict[str, float] = {"single": 0.30, "two": 0.40, "count": 0.12, "three": 0.18}  # default mix
RELATION_SAID = 0.8  # default fraction of "two" captions that state their relation

assert set(COLOUR_RGB) == set(COLOURS) and set(BACKGROUND_RGB) == set(BACKGROUNDS)
assert all(p <= set(SEEN_OBJECTS) for p in HELDOUT_PAIRS)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. x, y: centre of its bounding box; all lengths are fractions of the side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        return SIZE_RADIUS[self.size]

    @property
    def spec(self) -> ObjectSpec:
        return ObjectSpec(self.shape, self.colour, self.size)


@dataclass(frozen=True)
class Scene:
    kind: str  # "single" | "two" | "count" | "three"
    objects: tuple[SceneObject, ...]
    background: str
    relation: str | None = None  # objects[0] <relation> objects[1]; set for every "two" scene


@dataclass(frozen=True)
class EvalItem:
    """A GenEval-style prompt: the required objects (repeated for counts), relation and caption."""

    category: str  # one of CATEGORIES
    objects: tuple[ObjectSpec, ...]
    relation: str | None
    caption: str
    scene: Scene  # a scene satisfying the item (renders a reference image)


def is_heldout(identities: Iterable[tuple[str, str]]) -> bool:
    """True when a set of (shape, colour) identities in one image touches the held-out split."""
    ids = set(identities)
    if ids & HELDOUT_OBJECTS:
        return True
    return any(frozenset(p) in HELDOUT_PAIRS for p in itertools.combinations(sorted(ids), 2))


# ---------------------------------------------------------------- layout
def _place(rng: np.random.Generator, radii: list[float], relation: str | None) -> list[tuple[float, float]] | None:
    """Centres for objects of the given radii, apart by GAP; for a relation, objects[0] rel objects[1]."""
    for _ in range(200):
        pts = [(float(rng.uniform(r + MARGIN, 1 - r - MARGIN)), float(rng.uniform(r + MARGIN, 1 - r - MARGIN)))
               for r in radii]
        ok = True
        for (i, a), (j, b) in itertools.combinations(enumerate(pts), 2):
            sep = max(abs(a[0] - b[0]), abs(a[1] - b[1])) - radii[i] - radii[j]
            ok = ok and sep >= GAP
        if ok and relation is not None:
            (ax, ay), (bx, by) = pts[0], pts[1]
            along, across = {"left of": (bx - ax, by - ay), "right of": (ax - bx, by - ay),
                             "above": (by - ay, bx - ax), "below": (ay - by, bx - ax)}[relation]
            gap_along = along - radii[0] - radii[1]
            ok = gap_along >= GAP and abs(across) <= 0.5 * along
        if ok:
            return pts
    return None


def _layout(rng: np.random.Generator, kind: str, ids: list[tuple[str, str]], relation: str | None,
            background: str) -> Scene:
    sizes = [SIZES[int(rng.integers(len(SIZES)))] for _ in ids]
    if kind == "count":
        sizes = [sizes[0]] * len(ids)
    while True:
        pts = _place(rng, [SIZE_RADIUS[s] for s in sizes], relation)
        if pts is not None:
            break
        # too crowded: shrink the largest object one step and retry
        k = max(range(len(sizes)), key=lambda i: SIZES.index(sizes[i]))
        if sizes[k] == "small":
            raise RuntimeError("world._layout: cannot place small objects; GAP/MARGIN too large")
        smaller = SIZES[SIZES.index(sizes[k]) - 1]
        sizes = [smaller] * len(sizes) if kind == "count" else sizes[:k] + [smaller] + sizes[k + 1:]
    objs = tuple(SceneObject(s, c, z, x, y) for (s, c), z, (x, y) in zip(ids, sizes, pts))
    return Scene(kind, objs, background, relation)


def _identities(rng: np.random.Generator, kind: str, pool: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    if kind in ("single", "count"):
        one = pool[int(rng.integers(len(pool)))]
        return [one] * (1 if kind == "single" else int(rng.integers(2, 4)))
    n = 2 if kind == "two" else 3
    idx = rng.choice(len(pool), size=n, replace=False)
    return [pool[int(i)] for i in idx]


def check_mix(mix: dict[str, float]) -> dict[str, float]:
    """A scene-kind mix (kind -> weight), normalised to sum 1; raises InputError naming what is wrong."""
    unknown = set(mix) - set(KIND_WEIGHTS)
    if unknown or not mix:
        raise InputError(f"world: unknown scene kinds {sorted(unknown)} in the mix; expected some of "
                         f"{list(KIND_WEIGHTS)}")
    if any(not np.isfinite(w) or w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise InputError(f"world: mix weights must be finite, >= 0 and not all 0, got {mix}")
    total = sum(mix.values())
    return {k: mix.get(k, 0.0) / total for k in KIND_WEIGHTS}


def sample_scene(rng: np.random.Generator, split: str = "train", mix: dict[str, float] | None = None) -> Scene:
    """A random scene. split="train": never touches the held-out split; "heldout": always does.

    mix: scene-kind weights (default KIND_WEIGHTS); any mix draws the same kinds' scenes the same way.
    """
    if split not in ("train", "heldout"):
        raise InputError(f"world.sample_scene: split must be 'train' or 'heldout', got {split!r}")
    weights = KIND_WEIGHTS if mix is None else check_mix(mix)
    kinds = list(weights)
    kind = kinds[int(rng.choice(len(kinds), p=list(weights.values())))]
    while True:  # rejection on identities only (cheap): ~12 % of draws are held out
        ids = _identities(rng, kind, ALL_OBJECTS)
        if is_heldout(ids) == (split == "heldout"):
            break
    relation = RELATIONS[int(rng.integers(4))] if kind == "two" else None
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return _layout(rng, kind, ids, relation, background)


def caption(scene: Scene, rng: np.random.Generator | None, relation_said: float = RELATION_SAID) -> str:
    """A paraphrased caption (rng=None: the canonical "a photo of ..." form, relation always said).

    "two" scenes mention their relation with probability `relation_said` (default 0.8); otherwise "A and B".
    """
    relation = scene.relation
    if rng is not None and scene.kind == "two" and rng.random() < 1 - relation_said:
        relation = None
    return describe(scene.kind, scene.objects, relation, scene.background, rng)


# ---------------------------------------------------------------- rendering
def _star(inner: float = 0.45) -> np.ndarray:
    ang = -np.pi / 2 + np.arange(10) * np.pi / 5
    rad = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


def _heart(n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1)


def _fit(poly: np.ndarray) -> np.ndarray:
    """Scale a polygon so its bounding box is centred at 0 with its larger half-extent 1."""
    lo, hi = poly.min(0), poly.max(0)
    return (poly - (lo + hi) / 2) / ((hi - lo).max() / 2)


_T = 0.36  # half arm thickness of the cross
_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
    "triangle": np.array([[0.0, -0.866], [1.0, 0.866], [-1.0, 0.866]]),
    "diamond": np.array([[0.0, -1.0], [0.75, 0.0], [0.0, 1.0], [-0.75, 0.0]]),
    "star": _fit(_star()),
    "cross": np.array([[-_T, -1], [_T, -1], [_T, -_T], [1, -_T], [1, _T], [_T, _T], [_T, 1], [-_T, 1],
                       [-_T, _T], [-1, _T], [-1, -_T], [-_T, -_T]], dtype=np.float64),
    "heart": _fit(_heart()),
}


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject, side: int, bg: tuple[int, int, int]) -> None:
    cx, cy, r = obj.x * side, obj.y * side, obj.radius * side
    fill = COLOUR_RGB[obj.colour]
    if obj.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        if obj.shape == "ring":
            ri = r * RING_INNER
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=bg)
        return
    pts = _POLYGONS[obj.shape] * r + np.array([cx, cy])
    draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)


def render(scene: Scene, size: int = 128, supersample: int = 4) -> np.ndarray:
    """The scene as uint8 [size, size, 3] RGB."""
    if size < 16:
        raise InputError(f"world.render: size must be >= 16, got {size}")
    side = size * supersample
    bg = BACKGROUND_RGB[scene.background]
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj, side, bg)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.array(img, dtype=np.uint8)  # [size, size, 3]


# ---------------------------------------------------------------- evaluation prompts
def _heldout_ids(rng: np.random.Generator, category: str, i: int) -> list[tuple[str, str]]:
    """Identities for a held-out item; even i uses a held-out object, odd i a held-out pair."""
    held = sorted(HELDOUT_OBJECTS)
    pairs = sorted(tuple(sorted(p)) for p in HELDOUT_PAIRS)
    if category in ("single", "count"):
        one = held[int(rng.integers(len(held)))]
        return [one] * (1 if category == "single" else int(rng.integers(2, 4)))
    if i % 2 == 0:
        ids = [held[int(rng.integers(len(held)))]]
    else:
        ids = list(pairs[int(rng.integers(len(pairs)))])
    n = 3 if category == "three" else 2
    while len(ids) < n:
        cand = ALL_OBJECTS[int(rng.integers(len(ALL_OBJECTS)))]
        if cand not in ids:
            ids.append(cand)
    order = rng.permutation(len(ids))
    return [ids[int(k)] for k in order]


def eval_items(n: int, seed: int = 0, split: str = "heldout",
               categories: tuple[str, ...] = CATEGORIES) -> list[EvalItem]:
    """n deterministic eval items, categories taken round-robin, with canonical captions.

    split="heldout": every item touches the held-out split; "train": every item is in-distribution.
    """
    if split not in ("train", "heldout"):
        raise InputError(f"world.eval_items: split must be 'train' or 'heldout', got {split!r}")
    unknown = set(categories) - set(CATEGORIES)
    if unknown:
        raise InputError(f"world.eval_items: unknown categories {sorted(unknown)}, expected {CATEGORIES}")
    rng = np.random.default_rng(seed)
    kind_of = {"single": "single", "two_object": "two", "two_relation": "two", "count": "count", "three": "three"}
    items = []
    for i in range(n):
        cat = categories[i % len(categories)]
        kind = kind_of[cat]
        if split == "heldout":
            ids = _heldout_ids(rng, cat, i // len(categories))
        else:
            while True:
                ids = _identities(rng, kind, SEEN_OBJECTS)
                if not is_heldout(ids):
                    break
        relation = RELATIONS[int(rng.integers(4))] if kind == "two" else None
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        scene = _layout(rng, kind, ids, relation, background)
        said = relation if cat == "two_relation" else None
        text = describe(kind, scene.objects, said, None, None)
        specs = tuple(ObjectSpec(s, c) for s, c in ids)
        items.append(EvalItem(cat, specs, said, text, scene))
    return items


def heldout_prompts(n: int, seed: int = 0) -> list[EvalItem]:
    """n eval items over CATEGORIES, each composing something never seen together in training."""
    return eval_items(n, seed, "heldout")


def caption_corpus(n: int, seed: int = 0) -> list[str]:
    """n training captions (paraphrases) plus every canonical eval form, for a SentencePiece model."""
    rng = np.random.default_rng(seed)
    out = [caption(sample_scene(rng, "train"), rng) for _ in range(n)]
    out += [it.caption for it in eval_items(len(CATEGORIES) * 4, seed, "train")]
    return out
