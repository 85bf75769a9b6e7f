"""Tiny synthetic checkpoints for tests/test_checkpoints.py (random weights, every SD3 layout)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_
from sd35fp8.models.vae import SD3VAE, VAEConfig

TINY_MMDIT = MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=8, context_dim=64,
                         pooled_dim=32, qk_norm=True, x_block_self_attn_layers=(0,))
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, latent_channels=16)
T5_LINEARS = (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight", ".wo.weight")


def ckpt_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 state dict (contiguous clones; tied tensors become separate copies)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in module.state_dict().items()}


def ckpt_mmdit() -> dict[str, torch.Tensor]:
    return {k: v.contiguous().clone() for k, v in init_random_(MMDiT(TINY_MMDIT)).state_dict().items()}


def ckpt_vae() -> dict[str, torch.Tensor]:
    return ckpt_state(SD3VAE(TINY_VAE), 2)


def ckpt_clip_config(hidden: int, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def ckpt_t5_config() -> T5Config:
    return T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                    feed_forward_proj="gated-gelu", decoder_start_token_id=0)


def ckpt_clip(hidden: int = 32, layers: int = 1, seed: int = 3) -> dict[str, torch.Tensor]:
    sd = ckpt_state(CLIPTextModelWithProjection(ckpt_clip_config(hidden, layers)), seed)
    sd.pop("text_model.embeddings.position_ids", None)
    return sd


def ckpt_t5(seed: int = 5) -> dict[str, torch.Tensor]:
    sd = ckpt_state(T5EncoderModel(ckpt_t5_config()), seed)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()  # tied in the model, both stored
    return sd


def ckpt_scaled_fp8(sd: dict[str, torch.Tensor], linears: tuple[str, ...] = T5_LINEARS
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI scaled fp8: (file tensors, expected dequantised float32 tensors)."""
    out: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    expected: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith(linears):
            scale = v.abs().amax().float() / 448.0
            q = (v / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[k] = q
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            out[k[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
            expected[k] = q.float() * scale
        else:
            out[k] = v.to(torch.float16)
            expected[k] = v.to(torch.float16).float()
    return out, expected


def ckpt_plain_fp8(sd: dict[str, torch.Tensor], linears: tuple[str, ...] = T5_LINEARS
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    out = {k: v.to(torch.float8_e4m3fn) if k.endswith(linears) else v for k, v in sd.items()}
    return out, {k: v.float() for k, v in out.items()}


def ckpt_save(sd: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def ckpt_all_in_one(path: Path, text: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    parts = {"mmdit": ckpt_mmdit(), "vae": ckpt_vae()}
    flat = {f"model.diffusion_model.{k}": v for k, v in parts["mmdit"].items()}
    flat.update({f"first_stage_model.{k}": v for k, v in parts["vae"].items()})
    if text:
        parts.update(clip_l=ckpt_clip(32, 1, 3), clip_g=ckpt_clip(48, 2, 4), t5xxl=ckpt_t5())
        for name in ("clip_l", "clip_g", "t5xxl"):
            flat.update({f"text_encoders.{name}.transformer.{k}": v for k, v in parts[name].items()})
        flat["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6)
    ckpt_save(flat, path)
    return parts


def ckpt_text_encoders_folder(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The official repos' text_encoders/: clip_l, clip_g, t5xxl_fp16 and t5xxl_fp8_e4m3fn."""
    parts = {"clip_l": ckpt_clip(32, 1, 3), "clip_g": ckpt_clip(48, 2, 4), "t5xxl": ckpt_t5()}
    ckpt_save({k: v.half() for k, v in parts["clip_l"].items()}, folder / "clip_l.safetensors")
    ckpt_save({k: v.half() for k, v in parts["clip_g"].items()}, folder / "clip_g.safetensors")
    ckpt_save({k: v.half() for k, v in parts["t5xxl"].items()}, folder / "t5xxl_fp16.safetensors")
    ckpt_save(ckpt_plain_fp8(parts["t5xxl"])[0], folder / "t5xxl_fp8_e4m3fn.safetensors")
    return parts


def ckpt_diffusers_folder(folder: Path) -> dict[str, object]:
    """A diffusers SD3 folder written by diffusers/transformers save_pretrained (tiny)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    cfg = TINY_MMDIT
    transformer = SD3Transformer2DModel(
        sample_size=cfg.pos_embed_max_size, patch_size=2, in_channels=16, num_layers=cfg.depth,
        attention_head_dim=64, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.pooled_dim, out_channels=16,
        pos_embed_max_size=cfg.pos_embed_max_size, dual_attention_layers=cfg.x_block_self_attn_layers,
        qk_norm="rms_norm")
    n = len(TINY_VAE.ch_mult)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=tuple(TINY_VAE.ch * m for m in TINY_VAE.ch_mult),
                        layers_per_block=TINY_VAE.num_res_blocks, latent_channels=16, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(0)
    for p in list(transformer.parameters()) + list(vae.parameters()):
        p.data.normal_(0, 0.1)
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    clip_l = CLIPTextModelWithProjection(ckpt_clip_config(32, 1))
    clip_g = CLIPTextModelWithProjection(ckpt_clip_config(48, 2))
    t5 = T5EncoderModel(ckpt_t5_config())
    clip_l.save_pretrained(folder / "text_encoder")
    clip_g.save_pretrained(folder / "text_encoder_2")
    t5.save_pretrained(folder / "text_encoder_3", max_shard_size="20KB")  # sharded, with an index
    (folder / "tokenizer_3").mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return {"transformer": transformer, "vae": vae, "clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5}
