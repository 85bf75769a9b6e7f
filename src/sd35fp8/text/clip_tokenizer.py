"""CLIP byte-level BPE tokenizer built from the packaged OpenAI merges file (no download).

The vocabulary is derived exactly as OpenAI CLIP / open_clip's ``SimpleTokenizer`` do it from
``bpe_simple_vocab_16e6.txt.gz``: the 256 byte characters, the same with ``</w>``, one entry per
merge (48 894 merges), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49 408 ids.

The tokenizer itself is a ``tokenizers`` BPE with the normaliser and pre-tokeniser of
transformers' ``CLIPTokenizer`` (NFC, runs of whitespace -> one space, lower case; CLIP's split
regex; byte-level mapping). open_clip additionally runs ``ftfy.fix_text`` and ``html.unescape``;
the ids differ only for mojibake or HTML entities such as ``&amp;``.
"""

from __future__ import annotations

import functools
import gzip
from importlib import resources

from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2  # as in OpenAI CLIP: the file holds more merges than the vocab uses
_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_PACKAGED_FILE = "bpe_simple_vocab_16e6.txt.gz"


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map of the 256 byte values onto printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def load_merges(data: bytes | None = None) -> list[tuple[str, str]]:
    """The BPE merges of CLIP, from the gzip file bytes (default: the packaged file)."""
    if data is None:
        data = resources.files("sd35fp8.data").joinpath(_PACKAGED_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    bad = [m for m in merges if len(m) != 2]
    if bad or len(merges) != _NUM_MERGES:
        raise ValueError(
            f"{_PACKAGED_FILE}: expected {_NUM_MERGES} merge lines of two symbols, "
            f"got {len(merges)} lines ({len(bad)} malformed)"
        )
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """token -> id in OpenAI CLIP's order: bytes, bytes+</w>, merges, BOS, EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[BOS_TOKEN] != BOS_ID or vocab[EOS_TOKEN] != EOS_ID:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab


class CLIPBPE:
    """CLIP tokenizer: ``encode(text)`` gives the ids of the text without BOS/EOS."""

    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    vocab_size: int = VOCAB_SIZE

    def __init__(self, merges: list[tuple[str, str]] | None = None):
        self.merges = merges if merges is not None else load_merges()
        self.vocab = build_vocab(self.merges)
        tok = Tokenizer(
            BPE(
                vocab=self.vocab,
                merges=self.merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=EOS_TOKEN,
            )
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # Typed special tokens keep their ids (as in open_clip, whose cache maps them directly).
        tok.add_special_tokens(
            [AddedToken(BOS_TOKEN, special=True), AddedToken(EOS_TOKEN, special=True)]
        )
        self._tok = tok

    @classmethod
    @functools.lru_cache(maxsize=1)
    def default(cls) -> CLIPBPE:
        """The shared instance built from the packaged merges file (built once per process)."""
        return cls()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS, no truncation)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        inv = {i: t for t, i in self.vocab.items()}
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        text = "".join(inv[i] for i in ids if i not in (BOS_ID, EOS_ID))
        raw = bytearray(byte_of[c] for c in text)  # "</w>" is made of printable byte chars
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()
