"""A random tiny SD3.5-layout checkpoint for tests: all-in-one ComfyUI layout + spiece.model.

Widths follow SD3's rules at small sizes: context = cat(clip_l 64, clip_g 64) = 128 = T5 width,
pooled = clip_l 64 + clip_g projection 64 = 128; MMDiT depth 2 (hidden 128).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, T5Config, T5EncoderModel

from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_
from sd35fp8.models.vae import SD3VAE, VAEConfig
from sd35fp8.text.encoders import ClipTextEncoder

MMDIT = MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=16, context_dim=128,
                    pooled_dim=128, qk_norm=True)
VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
CAPTIONS = [
    "a red circle above a blue square", "a small green triangle", "a yellow star left of a purple ring",
    "two objects: a pink cross and a cyan heart", "a large orange diamond on a white background",
    "a blue ring to the right of a red star", "there is a green square below a yellow circle",
] * 20


def train_spm(path: Path, vocab_size: int = 120) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_writer=buf, vocab_size=vocab_size,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   hard_vocab_limit=False)
    path.write_bytes(buf.getvalue())
    return path


def clip(hidden: int, act: str, seed: int) -> ClipTextEncoder:
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, hidden_act=act,
                         projection_dim=hidden, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return ClipTextEncoder(cfg, with_projection=True).eval()


def t5(vocab: int, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False,
                   use_cache=False)
    return T5EncoderModel(cfg).eval()


def build_modules(vocab: int, seed: int = 0) -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        mmdit = MMDiT(MMDIT)
    mmdit.to_empty(device="cpu")
    init_random_(mmdit, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed + 1)
    vae = SD3VAE(VAE).eval()
    return {"mmdit": mmdit.eval(), "vae": vae, "clip_l": clip(64, "quick_gelu", seed + 2),
            "clip_g": clip(64, "gelu", seed + 3), "t5xxl": t5(vocab, seed + 4)}


def all_in_one_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    prefixes = {"mmdit": "model.diffusion_model.", "vae": "first_stage_model.",
                "clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                "t5xxl": "text_encoders.t5xxl.transformer."}
    out = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            if key in ("encoder.embed_tokens.weight", "text_model.embeddings.position_ids"):
                continue  # tied to shared.weight / a non-persistent buffer
            out[prefixes[name] + key] = value.detach().clone().contiguous()
    return out


def write_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, dict[str, torch.nn.Module]]:
    """Write folder/tiny_random.safetensors (all-in-one, fp32) + folder/spiece.model."""
    folder.mkdir(parents=True, exist_ok=True)
    spm_path = train_spm(folder / "spiece.model")
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(spm_path)).get_piece_size()
    modules = build_modules(vocab, seed)
    path = folder / "tiny_random.safetensors"
    save_file(all_in_one_state(modules), str(path), metadata={"format": "pt"})
    return path, modules
