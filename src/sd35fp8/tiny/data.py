"""Training data of the tiny model: a SentencePiece T5 vocabulary trained on the caption corpus, and
a pre-rendered, pre-tokenized dataset of (image, caption) pairs from the procedural world.

Rendering runs in worker processes. Chunk i of the dataset is drawn from
`np.random.default_rng([seed, i])`, so the dataset depends on the seed only, never on the number
of workers. Captions are tokenized with the pipeline's own `SD3Tokenizer` (CLIP BPE + the trained
`spiece.model`), so training sees exactly the ids inference produces.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from ..errors import InputError
from ..text.clip_tokenizer import CLIPBPE
from ..text.t5_tokenizer import T5Tokenizer
from ..text.tokenizer import CLIP_LENGTH, SD3Tokenizer
from . import world

SPIECE_NAME = "spiece.model"
CHUNK = 500  # images per worker task
T5_LENGTH = 77  # SD3Tokenizer's t5_min_length (ComfyUI): every caption of this world fits in it


def train_spiece(out_dir: str | Path, vocab_size: int, seed: int, n_captions: int = 20000) -> Path:
    """Train a T5-convention SentencePiece unigram model (pad 0, eos 1, unk 2, no bos) on
    `world.caption_corpus`; returns the path of `spiece.model`. Single-threaded: deterministic."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = world.caption_corpus(n_captions, seed)
    prefix = out_dir / "spiece"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, num_threads=1,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        shuffle_input_sentence=False, minloglevel=2)
    vocab_file = prefix.with_suffix(".vocab")
    if vocab_file.exists():
        vocab_file.unlink()
    return prefix.with_suffix(".model")


def make_tokenizer(spiece_path: str | Path) -> SD3Tokenizer:
    """The tokenizer the pipeline builds for this model (CLIP BPE + spiece.model, T5 min length 77)."""
    return SD3Tokenizer(CLIPBPE.default(), T5Tokenizer(spiece_path), t5_min_length=T5_LENGTH)


def token_rows(tokenizer: SD3Tokenizer, caption: str) -> tuple[list[int], list[int], list[int]]:
    """(CLIP-L 77 ids, CLIP-G 77 ids, T5 77 ids) of one caption; raises if it needs more than one chunk."""
    tok = tokenizer.tokenize(caption)
    if len(tok["l"]) != 1 or len(tok["t5"]) != T5_LENGTH:
        raise InputError(f"caption {caption!r} is too long for the tiny model's single 77-token chunk")
    return tok["l"][0], tok["g"][0], tok["t5"]


@dataclass
class Dataset:
    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]
    kinds: list[str]
    l_ids: np.ndarray  # int32 [N, 77]
    g_ids: np.ndarray  # int32 [N, 77]
    t5_ids: np.ndarray  # int32 [N, 77]

    def __len__(self) -> int:
        return len(self.captions)


_TOKENIZER: dict[str, SD3Tokenizer] = {}


def _render_chunk(args: tuple[int, int, int, int, str, dict | None, float]) -> tuple:
    seed, index, n, size, spiece, mix, relation_said = args
    tokenizer = _TOKENIZER.get(spiece)
    if tokenizer is None:
        tokenizer = _TOKENIZER[spiece] = make_tokenizer(spiece)
    rng = np.random.default_rng([seed, index])
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    rows = np.empty((3, n, CLIP_LENGTH), dtype=np.int32)
    captions, kinds = [], []
    for i in range(n):
        scene = world.sample_scene(rng, "train", mix)
        images[i] = world.render(scene, size)
        text = world.caption(scene, rng, relation_said)
        rows[0, i], rows[1, i], rows[2, i] = token_rows(tokenizer, text)
        captions.append(text)
        kinds.append(scene.kind)
    return images, rows, captions, kinds


def render_dataset(n: int, seed: int, size: int, spiece: str | Path, workers: int | None = None,
                   mix: dict[str, float] | None = None, relation_said: float = world.RELATION_SAID) -> Dataset:
    """n rendered and tokenized training pairs (deterministic in seed; workers only change speed).

    mix / relation_said: the scene-kind weights and the fraction of "two" captions stating their
    relation (defaults: `world.KIND_WEIGHTS`, `world.RELATION_SAID`).
    """
    if mix is not None:
        mix = world.check_mix(mix)
    if not 0.0 <= relation_said <= 1.0:
        raise InputError(f"relation_said must be in [0, 1], got {relation_said}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workers = workers or os.cpu_count() or 1
    tasks, start = [], 0
    for index in range((n + CHUNK - 1) // CHUNK):
        tasks.append((seed, index, min(CHUNK, n - start), size, str(spiece), mix, relation_said))
        start += CHUNK
    if workers <= 1:
        parts = [_render_chunk(t) for t in tasks]
    else:
        ctx = mp.get_context("fork")  # callers render before any CUDA work (see train.py)
        with ctx.Pool(workers) as pool:
            parts = pool.map(_render_chunk, tasks, chunksize=1)
    images = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts], axis=1)
    return Dataset(images, [c for p in parts for c in p[2]], [k for p in parts for k in p[3]],
                   rows[0], rows[1], rows[2])
