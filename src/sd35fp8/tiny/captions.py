"""The language of the tiny world: its vocabulary, paraphrased caption templates and a parser.

This module is the leaf of `tiny/`: it knows words only. `world.py` maps the names defined here
to geometry and RGB; `detector.py` uses `parse_caption` to score an image against free text.

Conventions:
- a relation is always stated as "objects[0] <relation> objects[1]" (e.g. "left of": the first
  object's centre is left of the second's); `INVERSE` turns "B right of A" into "A left of B".
- `parse_caption(caption(scene))` gives back the scene's objects (shape, colour and, when the
  caption says it, size), its relation when the caption states one, and its background when named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ..errors import InputError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SIZES: tuple[str, ...] = ("small", "medium", "large")
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "black")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three"}

# Phrases that state "A <relation> B" (first phrase of each list is the canonical GenEval form).
_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "under", "beneath"),
}
# "A <first> and B <second>" layouts: "a red star on the left and a blue ring on the right".
_LAYOUT_PHRASES: dict[str, tuple[str, str]] = {
    "left of": ("on the left", "on the right"),
    "right of": ("on the right", "on the left"),
    "above": ("at the top", "at the bottom"),
    "below": ("at the bottom", "at the top"),
}


@dataclass(frozen=True)
class ObjectSpec:
    """One requested object: what a caption says about it (size is None when not said)."""

    shape: str
    colour: str
    size: str | None = None


@dataclass(frozen=True)
class ParsedCaption:
    """The structured content of a caption. Count phrases are expanded ("two red stars" -> 2 specs)."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None  # objects[0] <relation> objects[1]
    background: str | None
    category: str  # "single" | "two_object" | "two_relation" | "count" | "three"


class _HasSpec(Protocol):
    shape: str
    colour: str
    size: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(obj: _HasSpec | ObjectSpec, with_size: bool) -> str:
    """'a small red star' / 'an orange ring'."""
    words = [obj.colour, obj.shape]
    if with_size and obj.size is not None:
        words.insert(0, obj.size)
    return f"{_article(words[0])} {' '.join(words)}"


def count_phrase(obj: _HasSpec | ObjectSpec, n: int, with_size: bool) -> str:
    """'two small red stars'."""
    words = [NUMBER_WORDS[n], obj.colour, obj.shape + "s"]
    if with_size and obj.size is not None:
        words.insert(1, obj.size)
    return " ".join(words)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def describe(
    kind: str,
    objects: Sequence[_HasSpec | ObjectSpec],
    relation: str | None,
    background: str | None,
    rng: np.random.Generator | None,
) -> str:
    """A caption for a scene of `kind` ("single" | "two" | "count" | "three").

    rng=None gives the canonical GenEval-like form ("a photo of a red star left of a blue ring");
    otherwise a random paraphrase, optional size words and an optional background phrase.
    """
    canonical = rng is None
    size_words = (not canonical) and bool(rng.random() < 0.4)
    p = [object_phrase(o, size_words) for o in objects]
    if kind == "single":
        text = "a photo of {0}" if canonical else _pick(
            rng, ("{0}", "a photo of {0}", "a picture of {0}", "an image of {0}", "there is {0}", "{0} in the picture"))
        text = text.format(p[0])
    elif kind == "two" and relation is None:
        text = "a photo of {0} and {1}" if canonical else _pick(
            rng, ("{0} and {1}", "a photo of {0} and {1}", "two objects: {0} and {1}", "there is {0} and {1}"))
        text = text.format(p[0], p[1])
    elif kind == "two":
        if relation not in RELATIONS:
            raise InputError(f"captions.describe: unknown relation {relation!r}, expected one of {RELATIONS}")
        if canonical:
            text = f"a photo of {p[0]} {relation} {p[1]}"
        else:
            form = int(rng.integers(4))
            if form == 0:  # A rel B
                text = f"{_pick(rng, ('', 'a photo of ', 'two objects: '))}{p[0]} {_pick(rng, _RELATION_PHRASES[relation])} {p[1]}"
            elif form == 1:  # B inverse-rel A
                inv = INVERSE[relation]
                text = f"{_pick(rng, ('', 'a photo of ', 'two objects: '))}{p[1]} {_pick(rng, _RELATION_PHRASES[inv])} {p[0]}"
            else:  # layout form, in either mention order
                first, second = _LAYOUT_PHRASES[relation]
                a, b = (p[0], p[1]) if form == 2 else (p[1], p[0])
                if form == 3:
                    first, second = second, first
                text = f"{_pick(rng, ('', 'there is '))}{a} {first} and {b} {second}"
    elif kind == "count":
        n = len(objects)
        text = "a photo of {0}" if canonical else _pick(rng, ("{0}", "a photo of {0}", "there are {0}"))
        text = text.format(count_phrase(objects[0], n, size_words))
    elif kind == "three":
        text = "a photo of {0}, {1} and {2}" if canonical else _pick(
            rng, ("{0}, {1} and {2}", "a photo of {0}, {1} and {2}", "three objects: {0}, {1} and {2}"))
        text = text.format(*p)
    else:
        raise InputError(f"captions.describe: unknown scene kind {kind!r}")
    if background is not None and not canonical and rng.random() < 0.3:
        text += f" on {_article(background)} {background} background"
    return text


_COUNT_WORDS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "1": 1, "2": 2, "3": 3}
_OBJECT_RE = re.compile(
    r"\b(?:(a|an|one|two|three|[123])\s+)?(?:(" + "|".join(SIZES) + r")\s+)?("
    + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")(s?)\b"
)
_BACKGROUND_RE = re.compile(r"\bon an? (" + "|".join(BACKGROUNDS) + r") background\b")


def _relation_in(text: str) -> str | None:
    """The relation stated by the words between/after two object phrases (first object's view)."""
    found = []
    for word, rel in (("left", "left of"), ("right", "right of"), ("top", "above"), ("above", "above"),
                      ("over", "above"), ("bottom", "below"), ("below", "below"), ("under", "below"),
                      ("beneath", "below")):
        if re.search(rf"\b{word}\b", text):
            found.append(rel)
    return found[0] if found else None


def parse_caption(text: str) -> ParsedCaption:
    """Parse a caption of this world back into objects, relation and background.

    Raises InputError naming the caption when it has no colour+shape phrase, or more than 3 objects.
    """
    low = " ".join(text.lower().replace(",", " ").replace(":", " ").split())
    bg_match = _BACKGROUND_RE.search(low)
    background = bg_match.group(1) if bg_match else None
    if bg_match:
        low = (low[: bg_match.start()] + low[bg_match.end():]).strip()
    matches = list(_OBJECT_RE.finditer(low))
    if not matches:
        raise InputError(f"captions.parse_caption: no '<colour> <shape>' phrase in {text!r}")
    objects: list[ObjectSpec] = []
    counted = False
    for m in matches:
        n = _COUNT_WORDS.get(m.group(1) or "a", 1)
        if m.group(5) and m.group(1) is None:
            n = 2  # bare plural: "red stars"
        counted = counted or n > 1
        objects.extend([ObjectSpec(m.group(4), m.group(3), m.group(2))] * n)
    if len(objects) > 3:
        raise InputError(f"captions.parse_caption: {len(objects)} objects in {text!r}; this world has at most 3")
    relation = None
    if len(matches) == 2 and not counted:
        between = low[matches[0].end(): matches[1].start()]
        relation = _relation_in(between)
    if counted:
        category = "count" if len(matches) == 1 else "three"
    else:
        category = {1: "single", 2: "two_relation" if relation else "two_object", 3: "three"}[len(objects)]
    return ParsedCaption(tuple(objects), relation, background, category)
