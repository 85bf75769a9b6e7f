"""Tiny world: determinism, held-out split, caption round trip, detector accuracy and scoring."""

from __future__ import annotations

import collections
import itertools
import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd35fp8.errors import InputError
from sd35fp8.tiny import captions, detector, world


def _degrade(image: np.ndarray, rng: np.random.Generator, sigma: float = 1.5, noise: float = 8.0) -> np.ndarray:
    """Gaussian blur (PIL, radius = sigma in px) then additive Gaussian noise (0-255 scale)."""
    x = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
    x = x + rng.normal(0.0, noise, x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _ids(scene: world.Scene) -> list[tuple[str, str]]:
    return sorted((o.shape, o.colour) for o in scene.objects)


def _key(specs) -> list[tuple[str, str]]:
    return sorted((o.shape, o.colour) for o in specs)


def _canonical(objects, relation):
    """(A, rel, B) with rel in {left of, above}; B rel' A is the same statement."""
    a, b = [(o.shape, o.colour) for o in objects[:2]]
    if relation in ("right of", "below"):
        return (b, captions.INVERSE[relation], a)
    return (a, relation, b)


def test_determinism():
    def draw(seed):
        rng = np.random.default_rng(seed)
        scenes = [world.sample_scene(rng, split) for split in ("train", "heldout", "train")]
        return scenes, [world.render(s) for s in scenes], [world.caption(s, rng) for s in scenes]

    s1, im1, c1 = draw(7)
    s2, im2, c2 = draw(7)
    s3, im3, _ = draw(8)
    assert s1 == s2 and c1 == c2
    assert all(np.array_equal(a, b) for a, b in zip(im1, im2))
    assert not all(np.array_equal(a, b) for a, b in zip(im1, im3))
    assert im1[0].shape == (128, 128, 3) and im1[0].dtype == np.uint8
    assert world.render(s1[0], size=64).shape == (64, 64, 3)
    assert world.heldout_prompts(10, 3) == world.heldout_prompts(10, 3)
    assert world.caption_corpus(20, 1) == world.caption_corpus(20, 1)


def test_heldout_split_never_in_training():
    assert len(world.HELDOUT_OBJECTS) == 8
    assert {s for s, _ in world.HELDOUT_OBJECTS} == set(world.SHAPES)  # one per shape and colour
    assert {c for _, c in world.HELDOUT_OBJECTS} == set(world.COLOURS)
    rng = np.random.default_rng(0)
    kinds = collections.Counter()
    seen_objects = set()
    for _ in range(2000):
        scene = world.sample_scene(rng, "train")
        kinds[scene.kind] += 1
        ids = {(o.shape, o.colour) for o in scene.objects}
        seen_objects |= ids
        assert not ids & world.HELDOUT_OBJECTS, scene
        for pair in itertools.combinations(ids, 2):
            assert frozenset(pair) not in world.HELDOUT_PAIRS, scene
    assert seen_objects == set(world.SEEN_OBJECTS)  # every training object does appear
    assert set(kinds) == {"single", "two", "count", "three"}
    for _ in range(300):
        assert world.is_heldout(_ids(world.sample_scene(rng, "heldout")))
    held = world.heldout_prompts(100, 0)
    assert collections.Counter(it.category for it in held) == {c: 20 for c in world.CATEGORIES}
    assert all(world.is_heldout([(o.shape, o.colour) for o in it.objects]) for it in held)
    assert any(not set((o.shape, o.colour) for o in it.objects) & world.HELDOUT_OBJECTS for it in held)
    assert not any(world.is_heldout([(o.shape, o.colour) for o in it.objects]) for it in world.eval_items(50, 0, "train"))
    with pytest.raises(InputError):
        world.sample_scene(rng, "test")


def test_training_mix_and_relation_said():
    """sample_scene(mix=) draws kinds by the given weights (normalised); caption(relation_said=) says the
    relation of a two-object scene with that probability; bad mixes are refused by name."""
    rng = np.random.default_rng(3)
    only_two = [world.sample_scene(rng, "train", {"two": 2.0}) for _ in range(200)]
    assert {s.kind for s in only_two} == {"two"}
    for s in only_two:
        parsed = captions.parse_caption(world.caption(s, rng, 1.0))
        assert _canonical(parsed.objects, parsed.relation) == _canonical(s.objects, s.relation)
    assert all(captions.parse_caption(world.caption(s, rng, 0.0)).relation is None for s in only_two)
    kinds = collections.Counter(world.sample_scene(rng, "train", {"single": 1, "three": 3}).kind for _ in range(800))
    assert set(kinds) == {"single", "three"} and 0.65 < kinds["three"] / 800 < 0.85
    assert world.check_mix({"single": 1, "two": 3}) == {"single": 0.25, "two": 0.75, "count": 0.0, "three": 0.0}
    for bad in ({"four": 1.0}, {}, {"single": -1.0}, {"single": 0.0}, {"two": float("nan")}):
        with pytest.raises(InputError, match="mix|kinds"):
            world.check_mix(bad)


def test_layout_is_unambiguous():
    rng = np.random.default_rng(1)
    for _ in range(500):
        scene = world.sample_scene(rng, "train")
        objs = scene.objects
        for o in objs:
            assert world.MARGIN - 1e-9 <= o.x - o.radius and o.x + o.radius <= 1 - world.MARGIN + 1e-9
        for a, b in itertools.combinations(objs, 2):
            assert max(abs(a.x - b.x), abs(a.y - b.y)) - a.radius - b.radius >= world.GAP - 1e-9
        if scene.kind == "two":
            a, b = objs
            along, across = {"left of": (b.x - a.x, b.y - a.y), "right of": (a.x - b.x, b.y - a.y),
                             "above": (b.y - a.y, b.x - a.x), "below": (a.y - b.y, b.x - a.x)}[scene.relation]
            assert along > 0 and abs(across) <= 0.5 * along


def test_captions_parse_back():
    rng = np.random.default_rng(2)
    for i in range(1500):
        scene = world.sample_scene(rng, "train" if i % 3 else "heldout")
        for text in (world.caption(scene, rng), world.caption(scene, None)):
            parsed = captions.parse_caption(text)
            assert sorted((o.shape, o.colour) for o in parsed.objects) == _ids(scene), text
            for o in parsed.objects:  # a size word, when present, is the object's size
                assert o.size is None or o.size in {s.size for s in scene.objects if (s.shape, s.colour) == (o.shape, o.colour)}
            assert parsed.background in (None, scene.background), text
            if parsed.relation is not None:
                assert _canonical(parsed.objects, parsed.relation) == _canonical(scene.objects, scene.relation), text
            expected = {"single": "single", "count": "count", "three": "three"}.get(scene.kind)
            if scene.kind == "two":
                expected = "two_relation" if parsed.relation else "two_object"
            assert parsed.category == expected, text
            if text == world.caption(scene, None) and scene.kind == "two":
                assert parsed.relation is not None
    corpus = world.caption_corpus(200, 0)
    words = set(" ".join(corpus).replace(",", " ").replace(":", " ").split())
    assert set(world.SHAPES) | set(world.COLOURS) | set(world.SIZES) <= words
    with pytest.raises(InputError):
        captions.parse_caption("a photo of a dog")


def test_label_matches_flood_fill():
    def flood(mask):
        lab = np.zeros(mask.shape, int)
        n = 0
        for y0, x0 in zip(*np.nonzero(mask)):
            if lab[y0, x0]:
                continue
            n += 1
            stack = [(y0, x0)]
            lab[y0, x0] = n
            while stack:
                y, x = stack.pop()
                for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                    v, u = y + dy, x + dx
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not lab[v, u]:
                        lab[v, u] = n
                        stack.append((v, u))
        return lab, n

    rng = np.random.default_rng(3)
    for p in (0.2, 0.45, 0.6):
        mask = rng.random((40, 37)) < p
        got, n = detector.label(mask)
        ref, n_ref = flood(mask)
        assert n == n_ref
        pairs = set(zip(got[mask].tolist(), ref[mask].tolist()))  # a bijection between labellings
        assert len(pairs) == n and (got[~mask] == 0).all()


def _accuracy(n: int, seed: int, degrade: bool) -> float:
    rng = np.random.default_rng(seed)
    ok = 0
    for i in range(n):
        scene = world.sample_scene(rng, "train" if i % 2 else "heldout")
        image = world.render(scene)
        if degrade:
            image = _degrade(image, rng)
        ok += sorted((d.shape, d.colour) for d in detector.detect(image)) == _ids(scene)
    return ok / n


def test_detector_clean_renders():
    assert _accuracy(300, 10, degrade=False) == 1.0


def test_detector_blur_and_noise():
    assert _accuracy(300, 11, degrade=True) >= 0.95


def test_score_eval_items_and_rejections():
    rng = np.random.default_rng(4)
    items = world.eval_items(40, 0, "heldout") + world.eval_items(20, 1, "train")
    scores = []
    for it in items:
        image = world.render(it.scene)
        dets = detector.detect(image)
        s = detector.score(image, it, dets)
        assert s["correct"] and s["objects_ok"] and s["count_ok"], (it.caption, s)
        scores.append(s)
        assert detector.score(_degrade(image, rng), it)["correct"] or it.category in ("count", "three")
        # wrong captions are rejected
        if it.relation is not None:
            wrong = world.EvalItem(it.category, it.objects, captions.INVERSE[it.relation], it.caption, it.scene)
            s_wrong = detector.score(image, wrong, dets)
            assert not s_wrong["correct"] and s_wrong["objects_ok"] and s_wrong["relation_ok"] is False
        a, b = it.objects[0], it.objects[-1]
        if len(it.objects) >= 2 and a.colour != b.colour:
            swapped = (captions.ObjectSpec(a.shape, b.colour),) + it.objects[1:-1] + (captions.ObjectSpec(b.shape, a.colour),)
            if _key(swapped) != _key(it.objects):
                s_sw = detector.score(image, world.EvalItem(it.category, swapped, it.relation, "", it.scene), dets)
                assert not s_sw["correct"] and s_sw["colour_ok"] and s_sw["shape_ok"]
        other = next(s for s in world.SHAPES if s != a.shape)
        bad_shape = (captions.ObjectSpec(other, a.colour),) + it.objects[1:]
        if _key(bad_shape) != _key(it.objects):
            assert not detector.score(image, world.EvalItem(it.category, bad_shape, it.relation, "", it.scene), dets)["correct"]
        if it.category == "count":
            more = world.EvalItem("count", it.objects + it.objects[:1], None, "", it.scene)
            assert not detector.score(image, more, dets)["correct"]
    agg = detector.aggregate(scores)
    assert agg["overall"] == 1.0 and set(agg["per_category"]) == set(world.CATEGORIES)
    assert set(agg["per_aspect"]) == {"shape", "colour", "objects", "count", "relation"}


def test_score_caption_image():
    scene = world.Scene("two", (world.SceneObject("star", "red", "medium", 0.25, 0.5),
                                world.SceneObject("ring", "blue", "medium", 0.75, 0.55)), "white", "left of")
    image = world.render(scene)
    assert detector.score_caption_image(image, "a red star left of a blue ring")["correct"]
    assert detector.score_caption_image(image, "a blue ring to the right of a red star")["correct"]
    assert detector.score_caption_image(image, "there is a red star on the left and a blue ring on the right")["correct"]
    assert not detector.score_caption_image(image, "a red star right of a blue ring")["correct"]
    assert not detector.score_caption_image(image, "a blue star left of a red ring")["correct"]
    assert not detector.score_caption_image(image, "a red star above a blue ring")["correct"]
    assert detector.score_caption_image(image, "a red star")["correct"]
    assert not detector.score_caption_image(image, "two red stars")["correct"]
    with pytest.raises(InputError):
        detector.detect(image[..., :2])


def test_detector_speed():
    rng = np.random.default_rng(5)
    images = [world.render(world.sample_scene(rng)) for _ in range(30)]
    detector.detect(images[0])
    t0 = time.perf_counter()
    for im in images:
        detector.detect(im)
    per_image = (time.perf_counter() - t0) / len(images)
    assert per_image < 0.2, f"detect took {per_image * 1000:.1f} ms per 128x128 image"


def test_score_many_equals_serial_scoring():
    items = world.eval_items(12, 3, "heldout")
    rng = np.random.default_rng(6)
    images = [_degrade(world.render(it.scene), rng) for it in items]
    serial = [detector.score(im, it) for im, it in zip(images, items)]
    assert detector.score_many(images, items, workers=2) == serial
    assert detector.score_many(images, items) == serial
    with pytest.raises(InputError, match="11 images for 12 items"):
        detector.score_many(images[:-1], items)
