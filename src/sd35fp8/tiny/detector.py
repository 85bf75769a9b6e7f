"""A deterministic, learning-free object detector for the tiny world, and GenEval-style scoring.

detect(image):
1. background = per-channel median of the 2-px border; 3x3 box filter against noise;
2. coarse foreground = RGB distance to the background > FG_THRESHOLD; 8-connected components
   (run-length union-find, no scipy); blobs under MIN_AREA px are dropped;
3. per blob: colour = median of its most saturated pixels; the shape mask is refined by projecting
   each pixel on the background->colour line in RGB (blur and anti-aliasing mix linearly in RGB,
   so t > 0.5 is the true edge whatever the blur); colour named by nearest palette entry in CIELAB;
4. shape from geometry of the mask: holes (ring), solidity = area / convex-hull area (star, cross,
   heart), bounding-box fill ratio (square vs circle vs triangle/diamond) and the vertical centroid
   (triangle: mass low; diamond: centred).

score(image, item) follows GenEval: relation via box centres with a 0.1*(dims) dead zone and a
dominant-axis test; "correct" = all required objects present with the right shape and colour, the
relation (two_relation) and, for the count category only, the exact number of objects.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InputError
from .captions import ObjectSpec, parse_caption
from .world import CATEGORIES, COLOUR_RGB, EvalItem, Scene

FG_THRESHOLD = 35.0  # RGB distance (0-255) from the background that marks a foreground pixel
MIN_AREA = 60  # px at 128x128; scaled with the image area
POSITION_THRESHOLD = 0.1  # GenEval's dead zone, fraction of the two boxes' summed dimensions
MAX_DETECTIONS = 12


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    centre: tuple[float, float]  # (x, y) of the bounding box centre, px
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive end, px
    area: int  # px of the refined mask (holes excluded)
    features: tuple[tuple[str, float], ...] = ()  # geometry used for the shape decision
    rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the blob's measured colour (0-255)


# ---------------------------------------------------------------- colour
def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] sRGB in 0-255 -> CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_PALETTE_NAMES = tuple(COLOUR_RGB)
_PALETTE_LAB = _srgb_to_lab(np.array([COLOUR_RGB[c] for c in _PALETTE_NAMES]))  # [8, 3]


def name_colour(rgb: Sequence[float], extra: dict[str, tuple[int, int, int]] | None = None) -> str:
    """The palette colour nearest (CIELAB) to an RGB triple in 0-255; `extra` adds colours (a LoRA's
    new colour, tiny/concept.py)."""
    names, lab = _PALETTE_NAMES, _PALETTE_LAB
    if extra:
        names = names + tuple(extra)
        lab = np.concatenate([lab, _srgb_to_lab(np.array(list(extra.values()), dtype=np.float64))])
    d = np.linalg.norm(lab - _srgb_to_lab(np.asarray(rgb))[None], axis=1)
    return names[int(d.argmin())]


# ---------------------------------------------------------------- connected components
def label(mask: np.ndarray, eight: bool = True) -> tuple[np.ndarray, int]:
    """Connected components of a bool [H, W] mask -> (int32 labels, 0 = none; count)."""
    h, w = mask.shape
    d = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # same row order as starts; exclusive ends
    n = len(rows)
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    slack = 1 if eight else 0
    row_first = np.searchsorted(rows, np.arange(h + 1))  # first run index of each row
    rl, sl, el = rows.tolist(), starts.tolist(), ends.tolist()
    for y in range(1, h):
        i, i_end = row_first[y], row_first[y + 1]
        j, j_end = row_first[y - 1], row_first[y]
        while i < i_end and j < j_end:  # two pointers over the runs of rows y and y-1
            if sl[i] < el[j] + slack and sl[j] < el[i] + slack:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
            if el[i] < el[j]:
                i += 1
            else:
                j += 1
    labels = np.zeros((h, w), dtype=np.int32)
    roots: dict[int, int] = {}
    for k in range(n):
        lab = roots.setdefault(find(k), len(roots) + 1)
        labels[rl[k], sl[k]:el[k]] = lab
    return labels, len(roots)


# ---------------------------------------------------------------- shape
def _hull_area(pts: np.ndarray) -> float:
    """Area of the convex hull of [N, 2] points (monotone chain + shoelace)."""
    p = sorted(set(map(tuple, pts.tolist())))
    if len(p) < 3:
        return 0.0

    def half(seq: list) -> list:
        out: list = []
        for q in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (q[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (q[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(q)
        return out

    hull = np.array(half(p)[:-1] + half(p[::-1])[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def shape_features(mask: np.ndarray) -> dict[str, float]:
    """Geometry of one object's bool mask (cropped or not)."""
    holes_lab, n_holes = label(~np.pad(mask, 1), eight=False)
    border = set(np.unique(np.concatenate([holes_lab[0], holes_lab[-1], holes_lab[:, 0], holes_lab[:, -1]])).tolist())
    inner = holes_lab[1:-1, 1:-1]
    area = int(mask.sum())
    hole_sizes = np.bincount(inner.ravel(), minlength=n_holes + 1)
    hole_area = sum(int(hole_sizes[k]) for k in range(1, n_holes + 1)
                    if k not in border and hole_sizes[k] >= max(4, 0.02 * area))
    filled = mask | ((inner > 0) & ~np.isin(inner, list(border)))
    ys, xs = np.nonzero(filled)  # row-major: ys ascending
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    bw, bh = x1 - x0, y1 - y0
    a_f = len(ys)
    # hull of pixel squares: the extreme corners of every row
    uy, first = np.unique(ys, return_index=True)
    xmin = np.minimum.reduceat(xs, first)
    xmax = np.maximum.reduceat(xs, first)
    corners = np.concatenate([np.stack([xmin, uy], 1), np.stack([xmax + 1, uy], 1),
                              np.stack([xmin, uy + 1], 1), np.stack([xmax + 1, uy + 1], 1)])
    hull = _hull_area(corners)
    widths = (xmax + 1 - xmin) / float(bw)  # [rows] horizontal extent of each row, fraction of box

    def width_at(frac: float) -> float:  # mean over the 3 rows around a fraction of the height
        c = int(round(frac * (bh - 1)))
        rows = (uy >= y0 + c - 1) & (uy <= y0 + c + 1)
        return float(widths[rows].mean()) if rows.any() else 0.0

    return {
        "w20": width_at(0.2),
        "w50": width_at(0.5),
        "w80": width_at(0.8),
        "fill": a_f / float(bw * bh),
        "solidity": a_f / hull if hull > 0 else 1.0,
        "hole": hole_area / float(a_f),
        "cy": float(ys.mean() + 0.5 - y0) / bh,  # vertical centroid within the box (0 top, 1 bottom)
        "aspect": float(bw) / float(bh),
    }


def classify_shape(f: dict[str, float]) -> str:
    """Rules on shape_features. Comments give ranges measured on clean and blurred (sigma 1.5) renders.

    The row-width profile (w20, w80: extent of the rows at 20 % / 80 % of the height) survives blur
    better than solidity, which rises towards 1 as small stars and crosses blur into blobs.
    """
    if f["hole"] > 0.08:  # ring 0.26-0.32, others 0
        return "ring"
    if f["aspect"] < 0.88:  # diamond 0.74-0.80, others >= 0.96
        return "diamond"
    if f["w20"] - f["w80"] > 0.3 and f["cy"] < 0.47:  # heart: 0.5-0.65, cy 0.40-0.43
        return "heart"
    if f["w20"] < 0.55:  # narrow top: triangle 0.23-0.36, star 0.19-0.32, cross 0.35-0.39
        # triangle: mass low (cy 0.62-0.66) and narrow middle (w50 0.51-0.63);
        # and convex (solidity 0.92-0.96); star: cy 0.54-0.56, w50 0.73-0.94 (arms), solidity <= 0.78
        if (f["cy"] - 0.57) / 0.03 + (0.68 - f["w50"]) / 0.05 + (f["solidity"] - 0.84) / 0.03 > 0:
            return "triangle"
        # star: tip on top, legs apart below (w80 - w20 >= 0.25); cross: symmetric (~0)
        return "star" if f["w80"] - f["w20"] > 0.12 else "cross"
    if f["fill"] > 0.89:  # square 0.93-1.0, circle 0.76-0.80
        return "square"
    return "circle"  # w20 0.76-0.86, fill 0.76-0.80


# ---------------------------------------------------------------- detection
def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean filter, edge-replicated. [H, W, C] -> [H, W, C]."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or min(img.shape[:2]) < 16:
        raise InputError(f"detector: expected a uint8 [H, W, 3] image of side >= 16, got {img.dtype} {img.shape}")
    return img


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an RGB uint8 [H, W, 3] image, largest first (at most MAX_DETECTIONS)."""
    img = _box3(_check_image(image).astype(np.float32))  # [H, W, 3]
    h, w = img.shape[:2]
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)  # [3]
    diff = img - bg  # [H, W, 3]
    dist = np.sqrt((diff ** 2).sum(-1))  # [H, W]
    labels, n = label(dist > FG_THRESHOLD)
    min_area = MIN_AREA * h * w / (128 * 128)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    out = []
    for k in np.argsort(-sizes[1:])[:MAX_DETECTIONS] + 1:
        if sizes[k] < min_area:
            break
        ys, xs = np.nonzero(labels == k)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        comp = labels[y0:y1, x0:x1] == k
        d_c, diff_c = dist[y0:y1, x0:x1], diff[y0:y1, x0:x1]
        strong = comp & (d_c >= np.percentile(d_c[comp], 50))
        colour = np.median(diff_c[strong], axis=0)  # [3] colour - bg
        t = (diff_c @ colour) / max(float(colour @ colour), 1e-6)  # [h, w] 0 at bg, 1 at colour
        mask = comp & (t > 0.5)
        if mask.sum() < min_area:
            continue
        core = mask & (t > 0.8)
        rgb = bg + np.median(diff_c[core if core.sum() >= 5 else mask], axis=0)
        f = shape_features(mask)
        mys, mxs = np.nonzero(mask)
        bx0, by0, bx1, by1 = x0 + int(mxs.min()), y0 + int(mys.min()), x0 + int(mxs.max()) + 1, y0 + int(mys.max()) + 1
        out.append(Detection(classify_shape(f), name_colour(rgb), ((bx0 + bx1) / 2, (by0 + by1) / 2),
                             (bx0, by0, bx1, by1), int(mask.sum()), tuple(sorted(f.items())),
                             tuple(float(v) for v in rgb)))
    return out


# ---------------------------------------------------------------- scoring
def relations(a: Detection, b: Detection) -> set[str]:
    """GenEval's relative_position: relations of a with respect to b (image y grows downward)."""
    ca, cb = np.array(a.centre), np.array(b.centre)
    dim_a = np.array([a.bbox[2] - a.bbox[0], a.bbox[3] - a.bbox[1]], dtype=np.float64)
    dim_b = np.array([b.bbox[2] - b.bbox[0], b.bbox[3] - b.bbox[1]], dtype=np.float64)
    offset = ca - cb
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def _assignments(req: Sequence[ObjectSpec], dets: Sequence[Detection], use_shape: bool, use_colour: bool):
    """Every injective map required -> detections that agrees on the chosen attributes."""
    for perm in itertools.permutations(range(len(dets)), len(req)):
        if all((not use_shape or dets[j].shape == r.shape) and (not use_colour or dets[j].colour == r.colour)
               for r, j in zip(req, perm)):
            yield perm


def score(image: np.ndarray, item: EvalItem, detections: list[Detection] | None = None) -> dict:
    """GenEval-style booleans for one generated image against one eval item."""
    dets = detect(image) if detections is None else detections
    req = item.objects
    full = list(_assignments(req, dets, True, True))
    result = {
        "category": item.category,
        "shape_ok": next(_assignments(req, dets, True, False), None) is not None,
        "colour_ok": next(_assignments(req, dets, False, True), None) is not None,
        "objects_ok": bool(full),
        "count_ok": len(dets) == len(req),
        "relation_ok": None,
        "n_detected": len(dets),
        "detections": [(d.shape, d.colour) for d in dets],
    }
    correct = result["objects_ok"]
    if item.relation is not None:
        result["relation_ok"] = any(item.relation in relations(dets[p[0]], dets[p[1]]) for p in full)
        correct = correct and result["relation_ok"]
    if item.category == "count":
        correct = correct and result["count_ok"]
    result["correct"] = bool(correct)
    return result


def score_many(images: Sequence[np.ndarray], items: Sequence[EvalItem], workers: int = 1) -> list[dict]:
    """`score` of each (image, item) pair, in `workers` forked processes when > 1 (they never touch
    CUDA, so the parent may hold a CUDA context)."""
    if len(images) != len(items):
        raise InputError(f"score_many: {len(images)} images for {len(items)} items")
    if workers <= 1 or len(images) < 2:
        return [score(im, it) for im, it in zip(images, items)]
    with mp.get_context("fork").Pool(min(workers, len(images))) as pool:
        return pool.starmap(score, list(zip(images, items)), chunksize=8)


def score_caption_image(image: np.ndarray, caption: str) -> dict:
    """score() against a free-text caption of this world (parsed with captions.parse_caption)."""
    parsed = parse_caption(caption)
    item = EvalItem(parsed.category, tuple(ObjectSpec(o.shape, o.colour) for o in parsed.objects),
                    parsed.relation, caption, Scene("none", (), parsed.background or "white"))
    return score(image, item)


def aggregate(scores: Sequence[dict]) -> dict:
    """Accuracies per category, per aspect and overall (GenEval overall = mean over categories)."""
    if not scores:
        raise InputError("detector.aggregate: no scores given")
    out: dict = {"n": len(scores), "per_category": {}, "per_aspect": {}}
    for cat in CATEGORIES:
        sel = [s["correct"] for s in scores if s["category"] == cat]
        if sel:
            out["per_category"][cat] = float(np.mean(sel))
    for aspect in ("shape_ok", "colour_ok", "objects_ok", "count_ok", "relation_ok"):
        sel = [s[aspect] for s in scores if s[aspect] is not None]
        if sel:
            out["per_aspect"][aspect.removesuffix("_ok")] = float(np.mean(sel))
    out["overall"] = float(np.mean(list(out["per_category"].values())))
    out["accuracy"] = float(np.mean([s["correct"] for s in scores]))
    return out
