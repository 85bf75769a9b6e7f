"""T5 SentencePiece tokenizer from local files only (no download).

Accepted inputs: a ``tokenizer.json`` (HF fast tokenizer, what ComfyUI's ``T5TokenizerFast``
and diffusers' ``tokenizer_3/`` use), a ``spiece.model`` (SentencePiece), or a folder holding
either, directly or under ``tokenizer_3/`` (diffusers layout), or an HF cache repo folder
``models--org--name`` (its ``snapshots/*``). ``tokenizer.json`` wins when both exist, because
that is the file ComfyUI tokenizes with. Ids: pad 0, EOS ``</s>`` 1 (T5 v1.1).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece
from tokenizers import Tokenizer

from sd35fp8.errors import InputError

PAD_ID = 0
EOS_ID = 1
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")

# HF hub repos whose snapshots hold a T5-XXL tokenizer (diffusers layout: tokenizer_3/).
HF_REPOS = (
    "stabilityai/stable-diffusion-3.5-large",
    "stabilityai/stable-diffusion-3.5-large-turbo",
    "stabilityai/stable-diffusion-3.5-medium",
    "stabilityai/stable-diffusion-3-medium-diffusers",
    "google/t5-v1_1-xxl",
)


class T5Tokenizer:
    """``encode(text)`` gives SentencePiece ids without the EOS (the caller appends ``eos_id``)."""

    pad_id: int = PAD_ID
    eos_id: int = EOS_ID

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if self.path.name.endswith(".json"):
            self._fast = Tokenizer.from_file(str(self.path))
            self._sp = None
            eos = self._fast.token_to_id("</s>")
            pad = self._fast.token_to_id("<pad>")
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        else:
            self._fast = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
            eos = self._sp.eos_id()
            pad = self._sp.pad_id()
            self.vocab_size = self._sp.get_piece_size()
        if eos != EOS_ID or pad != PAD_ID:
            raise InputError(
                f"T5 tokenizer {self.path} has </s>={eos} and <pad>={pad}; SD3's T5-XXL needs "
                f"</s>={EOS_ID} and <pad>={PAD_ID} (a T5 v1.1 tokenizer)"
            )

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return list(self._sp.encode(text, out_type=int))

    def __repr__(self) -> str:
        return f"T5Tokenizer({str(self.path)!r}, vocab={self.vocab_size})"


def hf_hub_cache() -> Path:
    """The HF hub cache folder: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _candidates_in(folder: Path) -> list[Path]:
    """Files that would serve as the tokenizer inside ``folder``, in order of preference."""
    out: list[Path] = []
    if folder.name.startswith("models--"):
        snapshots = folder / "snapshots"
        for snap in sorted(snapshots.iterdir()) if snapshots.is_dir() else []:
            out += _candidates_in(snap)
        return out
    for sub in (folder, folder / "tokenizer_3"):
        out += [sub / name for name in TOKENIZER_FILES]
    return out


def _search_list(explicit: Path | None, near: Iterable[Path], use_hf_cache: bool) -> list[Path]:
    paths: list[Path] = []
    if explicit is not None:
        paths += [explicit] if explicit.is_file() else _candidates_in(explicit)
        return paths  # an explicit choice is never second-guessed
    for given in near:
        for p in dict.fromkeys((given, given.resolve())):  # a symlinked file: beside the link and its target
            folder = p.parent if p.is_file() or p.suffix in (".safetensors", ".gguf", ".bin") else p
            paths += _candidates_in(folder)
            # diffusers folder: text_encoder_3/model.safetensors -> ../tokenizer_3/
            paths += [folder.parent / "tokenizer_3" / name for name in TOKENIZER_FILES]
    if use_hf_cache:
        cache = hf_hub_cache()
        for repo in HF_REPOS:
            repo_dir = cache / ("models--" + repo.replace("/", "--"))
            paths += _candidates_in(repo_dir) if repo_dir.is_dir() else [repo_dir]
    seen: set[Path] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def find_t5_tokenizer(
    explicit: str | os.PathLike[str] | None = None,
    near: Sequence[str | os.PathLike[str]] = (),
    use_hf_cache: bool = True,
) -> Path:
    """Locate a T5 tokenizer file; raise ``InputError`` listing every path searched.

    ``explicit``: the user's ``--t5-tokenizer`` (file or folder); when given only it is searched.
    ``near``: T5 weight files or model folders to look beside (and in ``../tokenizer_3``).
    ``use_hf_cache``: also look in the local HF hub cache snapshots of :data:`HF_REPOS`.
    """
    exp = Path(explicit).expanduser() if explicit is not None else None
    searched = _search_list(exp, [Path(p).expanduser() for p in near], use_hf_cache)
    for p in searched:
        if p.is_file() and (p.name.endswith(".json") or p.name.endswith(".model")):
            return p
    if exp is not None and exp.is_file():
        raise InputError(
            f"T5 tokenizer {exp} is neither a tokenizer.json nor a SentencePiece .model file"
        )
    listing = "\n  ".join(str(p) for p in searched) or "(nothing: no path was given)"
    folders = [p if p.is_dir() else p.parent for p in ([exp] if exp is not None else [Path(n).expanduser() for n in near])]
    target = f"{folders[0] / 'spiece.model'}" if folders else "the folder of the checkpoint"
    raise InputError(
        "No T5 tokenizer found (needed to encode prompts for the T5-XXL text encoder).\n"
        f"Searched:\n  {listing}\n"
        f"Fix: put Google's T5 v1.1 tokenizer (32000 pieces; not bundled: no installable package was found shipping it under a "
        f"bundlable license) at {target}: either spiece.model (from stabilityai/stable-diffusion-3.5-"
        "large tokenizer_3/spiece.model or google/t5-v1_1-xxl spiece.model) or tokenizer.json (ComfyUI's "
        "comfy/text_encoders/t5_tokenizer/tokenizer.json), or, with `sd35fp8 generate` / `calibrate`, pass "
        "--t5-tokenizer PATH (a spiece.model, a tokenizer.json, or a folder holding one, e.g. a diffusers "
        "tokenizer_3/ folder)."
    )


def load_t5_tokenizer(
    explicit: str | os.PathLike[str] | None = None,
    near: Sequence[str | os.PathLike[str]] = (),
    use_hf_cache: bool = True,
) -> T5Tokenizer:
    """``T5Tokenizer(find_t5_tokenizer(...))``."""
    return T5Tokenizer(find_t5_tokenizer(explicit, near, use_hf_cache))
