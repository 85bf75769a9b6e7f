"""SD3 prompt tokenization, following ComfyUI's ``SDTokenizer`` / ``SD3Tokenizer`` rules.

``SD3Tokenizer.tokenize(prompt)`` returns::

    {"l":  [[77 ids], ...],   "l_weights":  [[77 floats], ...],   # CLIP-L, pads with EOS 49407
     "g":  [[77 ids], ...],   "g_weights":  [[77 floats], ...],   # CLIP-G, pads with 0
     "t5": [ids] | None,      "t5_weights": [floats] | None}      # T5: not chunked, EOS 1, pad 0

Rules (ComfyUI ``comfy/sd1_clip.py``):
- Prompt weighting ``(text:1.2)``, ``(text)`` = x1.1 (nested multiplies), ``\\(`` / ``\\)`` for
  literal brackets; disable with ``parse_weights=False``. Brackets are syntax even without a
  weight, as in ComfyUI: ``a (red) cat`` tokenizes as ``a ``, ``red`` (1.1), `` cat``.
- Each weighted segment (further split before ``" embedding:"``, which is otherwise treated as
  text: textual-inversion embeddings are not supported) is tokenized on its own; it forms one
  *group*. A group that does not fit in the current 77-token chunk (BOS + 75 + EOS) moves whole
  to a new chunk, unless it has >= 8 tokens: then it is cut at the chunk boundary.
- Every chunk is BOS ... EOS and padded to 77; the pooled output later comes from the first.
- T5: same grouping with no BOS and no length limit, then EOS, then 0-padding up to
  ``t5_min_length`` (ComfyUI 77; diffusers pads to 256). ``t5_max_length`` (default None = no
  limit, as ComfyUI) truncates longer prompts to ``t5_max_length - 1`` tokens + EOS (diffusers).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from sd35fp8.errors import InputError
from sd35fp8.text.clip_tokenizer import CLIPBPE
from sd35fp8.text.t5_tokenizer import T5Tokenizer

CLIP_LENGTH = 77
MAX_WORD_LENGTH = 8  # ComfyUI: groups this long may be split across chunks
EMBEDDING_IDENTIFIER = "embedding:"
_ESC_CLOSE, _ESC_OPEN = "\0\1", "\0\2"

Group = list[tuple[int, float]]


# --- prompt weighting (ComfyUI syntax) ---------------------------------------------------------


def _split_parentheses(text: str) -> list[str]:
    """Top-level split into plain runs and ``( ... )`` groups (ComfyUI ``parse_parentheses``)."""
    result: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if current:
                    result.append(current)
                current = "("
            else:
                current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                result.append(current + ")")
                current = ""
            else:
                current += ch
        else:
            current += ch
    if current:
        result.append(current)
    return result


def _weighted_segments(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for part in _split_parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            w = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1 :])
                    inner = inner[:colon]
                except ValueError:
                    pass  # "(a:b)" with a non-number: the colon is text, weight x1.1 (ComfyUI)
            out += _weighted_segments(inner, w)
        else:
            out.append((part, weight))
    return out


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """``"a (cat:1.2)"`` -> ``[("a ", 1.0), ("cat", 1.2)]`` exactly as ComfyUI's ``token_weights``."""
    text = text.replace("\\)", _ESC_CLOSE).replace("\\(", _ESC_OPEN)
    return [
        (seg.replace(_ESC_CLOSE, ")").replace(_ESC_OPEN, "("), w)
        for seg, w in _weighted_segments(text, 1.0)
    ]


# --- chunking (ComfyUI SDTokenizer.tokenize_with_weights) -------------------------------------


def _groups(
    segments: list[tuple[str, float]], encode: Callable[[str], list[int]]
) -> list[Group]:
    groups: list[Group] = []
    for segment, weight in segments:
        parts = re.split(f" {EMBEDDING_IDENTIFIER}|\n{EMBEDDING_IDENTIFIER}", segment)
        pieces = [parts[0]] + [EMBEDDING_IDENTIFIER + p for p in parts[1:]]
        for piece in pieces:
            if piece:
                groups.append([(t, weight) for t in encode(piece)])
    return groups


def batch_groups(
    groups: list[Group],
    *,
    max_length: int,
    start: int | None,
    end: int,
    pad: int,
    pad_to_max_length: bool,
    min_length: int | None = None,
) -> list[Group]:
    """Lay token groups out in chunks of ``max_length`` (each ``start ... end``, padded)."""
    chunks: list[Group] = []
    chunk: Group = [(start, 1.0)] if start is not None else []
    chunks.append(chunk)
    for group in groups:
        is_large = len(group) >= MAX_WORD_LENGTH
        while group:
            if len(group) + len(chunk) > max_length - 1:
                remaining = max_length - len(chunk) - 1
                if is_large:  # cut the group at the chunk boundary
                    chunk.extend(group[:remaining])
                    chunk.append((end, 1.0))
                    group = group[remaining:]
                else:  # close this chunk; the whole group goes to the next one
                    chunk.append((end, 1.0))
                    if pad_to_max_length:
                        chunk.extend([(pad, 1.0)] * remaining)
                chunk = [(start, 1.0)] if start is not None else []
                chunks.append(chunk)
            else:
                chunk.extend(group)
                group = []
    chunk.append((end, 1.0))
    if pad_to_max_length and len(chunk) < max_length:
        chunk.extend([(pad, 1.0)] * (max_length - len(chunk)))
    if min_length is not None and len(chunk) < min_length:
        chunk.extend([(pad, 1.0)] * (min_length - len(chunk)))
    return chunks


def _split(chunks: list[Group]) -> tuple[list[list[int]], list[list[float]]]:
    return [[t for t, _ in c] for c in chunks], [[w for _, w in c] for c in chunks]


class EncoderTexts(str):
    """A prompt with its own text for each encoder: diffusers' prompt / prompt_2 / prompt_3,
    ComfyUI's CLIPTextEncodeSD3 clip_l / clip_g / t5xxl. Its string value is the CLIP-L text (what
    metadata shows). t5_length: T5 padded and cut to exactly this many tokens (diffusers'
    max_sequence_length); None = the tokenizer's own rule. Equal texts and no t5_length tokenize
    exactly as the plain string does."""

    clip_g: str
    t5: str
    t5_length: int | None

    def __new__(cls, clip_l: str, clip_g: str | None = None, t5: str | None = None,
                t5_length: int | None = None) -> EncoderTexts:
        for name, text in (("prompt", clip_l), ("prompt_2", clip_g), ("prompt_3", t5)):
            if text is not None and not isinstance(text, str):
                raise InputError(f"{name} must be a str, got {type(text).__name__}")
        if t5_length is not None and (isinstance(t5_length, bool) or not isinstance(t5_length, int)
                                      or t5_length < 2):
            raise InputError(f"max_sequence_length must be an integer >= 2, got {t5_length!r}")
        obj = super().__new__(cls, clip_l)
        obj.clip_g = clip_l if clip_g is None else clip_g
        obj.t5 = clip_l if t5 is None else t5
        obj.t5_length = t5_length
        return obj


class SD3Tokenizer:
    """Prompt -> token dict for CLIP-L, CLIP-G and (when a T5 tokenizer is given) T5-XXL."""

    def __init__(
        self,
        clip: CLIPBPE | None = None,
        t5: T5Tokenizer | None = None,
        t5_min_length: int = 77,
        t5_max_length: int | None = None,
        parse_weights: bool = True,
    ):
        if t5_min_length < 1:
            raise InputError(f"t5_min_length must be >= 1, got {t5_min_length}")
        if t5_max_length is not None and t5_max_length < max(2, t5_min_length):
            raise InputError(
                f"t5_max_length ({t5_max_length}) must be >= t5_min_length ({t5_min_length}) and >= 2"
            )
        self.clip = clip if clip is not None else CLIPBPE.default()
        self.t5 = t5
        self.t5_min_length = t5_min_length
        self.t5_max_length = t5_max_length
        self.parse_weights = parse_weights

    def _segments(self, prompt: str) -> list[tuple[str, float]]:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a str, got {type(prompt).__name__}")
        if self.parse_weights:
            return parse_prompt_weights(prompt)
        return [(prompt, 1.0)]

    def tokenize(self, prompt: str) -> dict:
        if isinstance(prompt, EncoderTexts):
            return self._tokenize_each(prompt)
        return self._tokenize(prompt, self.t5_min_length, self.t5_max_length)

    def _tokenize_each(self, prompt: EncoderTexts) -> dict:
        """CLIP-L, CLIP-G and T5 tokens each from their own text; the CLIP chunk counts evened out
        with empty-prompt chunks (ComfyUI's CLIPTextEncodeSD3)."""
        t5_min = self.t5_min_length if prompt.t5_length is None else prompt.t5_length
        t5_max = self.t5_max_length if prompt.t5_length is None else prompt.t5_length
        out = dict(self._tokenize(str(prompt), t5_min, t5_max))
        g = self._tokenize(prompt.clip_g, t5_min, t5_max)
        out["g"], out["g_weights"] = g["g"], g["g_weights"]
        t5 = self._tokenize(prompt.t5, t5_min, t5_max)
        out["t5"], out["t5_weights"] = t5["t5"], t5["t5_weights"]
        empty = self._tokenize("", t5_min, t5_max)
        for short, long_ in (("l", "g"), ("g", "l")):
            while len(out[short]) < len(out[long_]):
                out[short] = out[short] + empty[short]
                out[f"{short}_weights"] = out[f"{short}_weights"] + empty[f"{short}_weights"]
        return out

    def _tokenize(self, prompt: str, t5_min_length: int, t5_max_length: int | None) -> dict:
        segments = self._segments(prompt)
        clip_groups = _groups(segments, self.clip.encode)
        out: dict = {}
        for key, pad in (("l", self.clip.eos_id), ("g", 0)):
            chunks = batch_groups(
                [list(g) for g in clip_groups],
                max_length=CLIP_LENGTH,
                start=self.clip.bos_id,
                end=self.clip.eos_id,
                pad=pad,
                pad_to_max_length=True,
            )
            out[key], out[f"{key}_weights"] = _split(chunks)
        if self.t5 is None:
            out["t5"], out["t5_weights"] = None, None
            return out
        (t5_chunk,) = batch_groups(
            _groups(segments, self.t5.encode),
            max_length=10**12,
            start=None,
            end=self.t5.eos_id,
            pad=self.t5.pad_id,
            pad_to_max_length=False,
            min_length=t5_min_length,
        )
        if t5_max_length is not None and len(t5_chunk) > t5_max_length:
            # longer than t5_max_length >= t5_min_length, so no padding was added: cut, re-add EOS
            t5_chunk = t5_chunk[: t5_max_length - 1] + [(self.t5.eos_id, 1.0)]
        ids, weights = _split([t5_chunk])
        out["t5"], out["t5_weights"] = ids[0], weights[0]
        return out

    def __call__(self, prompt: str) -> dict:
        return self.tokenize(prompt)
