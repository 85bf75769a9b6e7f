"""SD3.5 text conditioning: tokenizers (CLIP BPE, T5 SentencePiece) and the three text encoders."""

from __future__ import annotations

from sd35fp8.text.clip_tokenizer import CLIPBPE
from sd35fp8.text.encoders import (
    ClipTextEncoder,
    KeyPlan,
    SD3TextEncoder,
    build_clip,
    build_t5,
    clip_config_from_state_dict,
    concat_contexts,
    describe_text_config,
    guess_clip_kind,
    init_meta_buffers,
    plan_text_encoder_keys,
    t5_config_from_state_dict,
    tie_t5_embeddings,
)
from sd35fp8.text.t5_tokenizer import T5Tokenizer, find_t5_tokenizer, load_t5_tokenizer
from sd35fp8.text.tokenizer import SD3Tokenizer, parse_prompt_weights

__all__ = [
    "CLIPBPE",
    "ClipTextEncoder",
    "KeyPlan",
    "SD3TextEncoder",
    "SD3Tokenizer",
    "T5Tokenizer",
    "build_clip",
    "build_t5",
    "clip_config_from_state_dict",
    "concat_contexts",
    "describe_text_config",
    "find_t5_tokenizer",
    "guess_clip_kind",
    "init_meta_buffers",
    "load_t5_tokenizer",
    "parse_prompt_weights",
    "plan_text_encoder_keys",
    "t5_config_from_state_dict",
    "tie_t5_embeddings",
]
