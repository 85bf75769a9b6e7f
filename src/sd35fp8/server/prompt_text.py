"""Prompt texts cut to what the text encoders use (issue 27 item 1): bounded tokenize/encode work.

    budget = TextBudget(max_tokens=512, folders=folders)
    warnings = budget.apply(prompt)   # after validate_prompt: literal texts cut in place

Two limits bound a prompt text. `--max-text-chars` is the hard cap: a longer STRING is refused
(400 value_too_long, workflow.validate). Below it, `--max-prompt-tokens` is the token budget per
text and per encoder: CLIP-L/G content tokens (the 77-token windows hold 75 each, so 512 tokens are
at most 8 windows) and T5-XXL tokens (512, twice SD3.5's training length of 256). A text over the
budget is cut to its longest prefix within it, and the /prompt answer (and the history entry's
extra_data) carries a warning that names the node, the input and the counts, so a client sees what
was dropped. A text that reaches an encoder through a link (a primitive or string node, a
concatenation: known only at run time) is cut the same way by the encoder node itself, which calls
`limit` (the executor's `text_limit`, NodeContext.limit_text) and logs a warning naming the node.
The worker then never tokenizes or encodes more than the budget, whatever the text and wherever it
comes from: the MMDiT's context (CLIP windows x 77 + T5 tokens) is bounded too.

Tokens are counted as the encoders' tokenizer counts them (text.tokenizer.SD3Tokenizer's grouping
and ComfyUI prompt weighting): CLIP with the packaged BPE vocabulary, T5 with the SentencePiece
model found beside the models (text_encoders/, clip/, checkpoints/, then the HF cache, as the
loaders look). Without one, T5 tokens are bounded by characters (a T5 piece covers at least one
character in practice), which the log says once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sd35fp8.errors import InputError
from sd35fp8.text.tokenizer import SD3Tokenizer, _groups

log = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_TOKENS = 512
T5_NEAR_FOLDERS = ("text_encoders", "clip", "checkpoints")

# node class -> {text input: the encoders that read it}
TEXT_INPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "CLIPTextEncode": {"text": ("clip", "t5")},
    "CLIPTextEncodeSD3": {"clip_l": ("clip",), "clip_g": ("clip",), "t5xxl": ("t5",)},
}
# nodes whose STRING output is their literal `value` (workflow/nodes_primitive.py): a text linked from
# one is cut at its source by `apply`, with a warning in the /prompt answer
STRING_SOURCES = ("PrimitiveString", "PrimitiveStringMultiline")


class TextBudget:
    """Counts tokens per encoder and cuts texts to `max_tokens` (thread-safe; tokenizers loaded once)."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, folders: Any = None,
                 t5_tokenizer: Any = None, max_chars: int | None = None):
        """max_chars: the hard cap on a text (--max-text-chars); a linked text built at run time is first
        cut to it, so `limit` never tokenizes more than a literal text could hold."""
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self.folders = folders
        self._t5 = t5_tokenizer
        self._t5_searched = t5_tokenizer is not None
        self._lock = threading.Lock()
        self._clip = SD3Tokenizer(t5=None)

    # ---- counting -------------------------------------------------------------------------------
    def _t5_encode(self) -> Callable[[str], list[int]] | None:
        with self._lock:
            if not self._t5_searched:
                self._t5_searched = True
                self._t5 = self._find_t5()
        return self._t5.encode if self._t5 is not None else None

    def _find_t5(self) -> Any:
        from sd35fp8.text.t5_tokenizer import load_t5_tokenizer

        near: list[Path] = []
        if self.folders is not None:
            for kind in T5_NEAR_FOLDERS:
                if kind in self.folders.kinds:
                    near += [Path(p) for p in self.folders.folders(kind)]
        try:
            return load_t5_tokenizer(near=near)
        except InputError:
            log.warning("no T5 tokenizer beside the models: prompt texts are bounded at %d characters for "
                        "T5 instead of %d tokens (--max-prompt-tokens)", self.max_tokens, self.max_tokens)
            return None

    def count(self, text: str, encoders: Iterable[str]) -> dict[str, int]:
        """Content tokens of `text` per encoder ('clip': CLIP-L/G BPE, 't5': T5 pieces or characters)."""
        segments = self._clip._segments(text)
        out = {}
        for name in encoders:
            if name == "clip":
                encode = self._clip.clip.encode
            else:
                encode = self._t5_encode()
                if encode is None:
                    out[name] = len(text)
                    continue
            out[name] = sum(len(g) for g in _groups(segments, encode))
        return out

    def fits(self, text: str, encoders: Iterable[str]) -> bool:
        return all(n <= self.max_tokens for n in self.count(text, encoders).values())

    def fit(self, text: str, encoders: tuple[str, ...]) -> tuple[str, dict[str, int] | None]:
        """(text, None) when it fits; else (the longest prefix that fits, the full text's counts).
        Binary search over prefix lengths: O(log n) tokenizations of at most the hard cap."""
        counts = self.count(text, encoders)
        if all(n <= self.max_tokens for n in counts.values()):
            return text, None
        lo, hi = 0, len(text)  # fits(text[:lo]); not fits(text[:hi])
        if "clip" in counts:  # a token covers at least one character, so this prefix is within the budget
            lo = min(self.max_tokens, len(text) - 1)
            if not self.fits(text[:lo], encoders):
                lo = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.fits(text[:mid], encoders):
                lo = mid
            else:
                hi = mid
        return text[:lo], counts

    def limit(self, class_type: str, input_name: str, text: str, node_id: str = "?") -> str:
        """The run-time bound: `text` as an encoder node receives it (a literal already cut by
        `apply`, or a linked text) cut to the budget; a cut is logged with the node and the counts."""
        encoders = TEXT_INPUTS.get(class_type, {}).get(input_name)
        if encoders is None:
            raise KeyError(f"node {node_id} ({class_type}): input {input_name!r} is not a text the encoders read")
        if not isinstance(text, str):
            raise InputError(f"node {node_id} ({class_type}) input '{input_name}': expected a text, got "
                             f"{type(text).__name__}")
        given = len(text)
        if self.max_chars is not None and given > self.max_chars:
            text = text[:self.max_chars]
        cut, counts = self.fit(text, encoders)
        if counts is None and len(text) < given:
            counts = {"chars": given}
        if counts is not None:
            tokens = ", ".join(f"{k.upper()} {v}" for k, v in counts.items())
            log.warning("text reaching node %s (%s) input '%s' is longer than the text encoders use: %s tokens, "
                        "the server's budget is %d (--max-prompt-tokens); cut from %d to %d characters",
                        node_id, class_type, input_name, tokens, self.max_tokens, given, len(cut))
        return cut

    # ---- a whole prompt -------------------------------------------------------------------------
    def apply(self, prompt: Mapping[str, dict]) -> list[dict]:
        """Cut every literal prompt text over the budget, in place, and the literal of a string
        primitive linked into an encoder's text (STRING_SOURCES); one warning per cut text. Texts that
        other nodes build at run time are cut by the encoder node (`limit`)."""
        warnings = []
        for node_id, node in prompt.items():
            inputs_read = TEXT_INPUTS.get(node.get("class_type"))
            if not inputs_read:
                continue
            for name, encoders in inputs_read.items():
                inputs, key, text = node.get("inputs", {}), name, node.get("inputs", {}).get(name)
                source_id = str(text[0]) if isinstance(text, list) and text else None
                source = prompt.get(source_id) if source_id is not None else None
                if isinstance(source, dict) and source.get("class_type") in STRING_SOURCES:
                    inputs, key = source.get("inputs", {}), "value"
                    text = inputs.get(key)
                if not isinstance(text, str):  # linked from another node: cut at run time (`limit`)
                    continue
                cut, counts = self.fit(text, encoders)
                if counts is None:
                    continue
                inputs[key] = cut
                tokens = ", ".join(f"{k.upper()} {v}" for k, v in counts.items())
                warnings.append({
                    "type": "prompt_text_cut",
                    "message": f"Text of node {node_id} ({node.get('class_type')}) input '{name}' is longer than "
                               f"the text encoders use: {tokens} tokens, the server's budget is {self.max_tokens} "
                               f"(--max-prompt-tokens); cut from {len(text)} to {len(cut)} characters",
                    "node_id": node_id, "class_type": node.get("class_type"), "input_name": name,
                    "chars_given": len(text), "chars_kept": len(cut), "tokens_given": counts,
                    "max_tokens": self.max_tokens,
                })
                if key == "value":  # the literal cut was the linked string primitive's
                    warnings[-1]["source_node_id"] = source_id
                    warnings[-1]["message"] += f" (the text of node {source_id}, {source['class_type']}, linked in)"
        return warnings
