"""Sizes of the shipped tiny model and its module configs, built through the same config inference
the loaders use, so the trained modules are exactly what `checkpoints.load` rebuilds from the file.

`TinySpec.full()` is the shipped model (128 px, ~17 MB in fp16 all together); `TinySpec.smoke()`
is a CPU smoke-test size. `build_*` return freshly initialised (trainable) modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import CLIPTextConfig, T5Config, T5EncoderModel

from ..errors import CheckpointError
from ..models.mmdit import HEAD_DIM, MMDiT, MMDiTConfig
from ..models.vae import SD3VAE, VAEConfig
from ..text.clip_tokenizer import VOCAB_SIZE as CLIP_VOCAB
from ..text.encoders import ClipTextEncoder, clip_config_from_state_dict, t5_config_from_state_dict
from .export import PREFIXES

CLIP_POSITIONS = 77


@dataclass(frozen=True)
class TinySpec:
    image_size: int = 128
    depth: int = 3  # MMDiT: hidden = 64 * depth, heads = depth (the reference's rule)
    patch: int = 2  # MMDiT patch size (latent cells per token side); the loaders infer it from x_embedder
    pos_embed_max_size: int = 16  # 16 patches of 16 px: up to 256 px
    vae_ch: int = 32
    vae_ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    vae_res_blocks: int = 2
    clip_width: int = 32  # CLIP-L and CLIP-G hidden size (1 head: heads = max(1, width // 64))
    clip_layers: int = 2
    t5_width: int = 64  # = MMDiT context_dim
    t5_heads: int = 2
    t5_layers: int = 2
    t5_ff: int = 128
    t5_buckets: int = 32
    t5_vocab: int = 512  # SentencePiece target size (the corpus may give fewer pieces)

    @classmethod
    def full(cls) -> TinySpec:
        return cls()

    @classmethod
    def smoke(cls) -> TinySpec:
        """CPU smoke size: 32 px images, depth-1 MMDiT, 1-layer towers."""
        return cls(image_size=32, depth=1, pos_embed_max_size=4, vae_ch=32, vae_ch_mult=(1, 1, 1, 1),
                   vae_res_blocks=1, clip_layers=1, t5_layers=1, t5_vocab=200)

    @property
    def hidden(self) -> int:
        return HEAD_DIM * self.depth

    @property
    def context_dim(self) -> int:
        return self.t5_width

    @property
    def pooled_dim(self) -> int:
        return 2 * self.clip_width  # CLIP-L pooled (unprojected) + CLIP-G projected (projection = width)

    def with_patch(self, patch: int, pos_embed_max_size: int | None = None) -> TinySpec:
        """Another MMDiT patch size; pos_embed keeps covering the same largest image by default."""
        if pos_embed_max_size is None:
            pos_embed_max_size = self.pos_embed_max_size * self.patch // patch
        return replace(self, patch=patch, pos_embed_max_size=pos_embed_max_size)

    def with_t5_vocab(self, vocab: int) -> TinySpec:
        return replace(self, t5_vocab=vocab)

    def with_vae_of(self, other: TinySpec) -> TinySpec:
        return replace(self, vae_ch=other.vae_ch, vae_ch_mult=other.vae_ch_mult, vae_res_blocks=other.vae_res_blocks)

    @classmethod
    def from_checkpoint(cls, path: str | Path, image_size: int) -> TinySpec:
        """The spec of an all-in-one written by `export.export_checkpoint`, read back from its shapes
        through the loaders' own config inference (image_size is not stored in the weights)."""
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

        def part(name: str) -> dict[str, tuple[int, ...]]:
            pre = PREFIXES[name]
            out = {k[len(pre):]: v for k, v in shapes.items() if k.startswith(pre)}
            if not out:
                raise CheckpointError(f"{path} holds no {name} tensors (prefix {pre})", str(path))
            return out

        mm = MMDiTConfig.from_state_dict(part("mmdit"), str(path))
        vae = VAEConfig.from_state_dict(part("vae"))
        clip = clip_config_from_state_dict(part("clip_l"), "clip_l")
        t5 = t5_config_from_state_dict(part("t5xxl"))
        return cls(image_size=image_size, depth=mm.depth, patch=mm.patch_size, pos_embed_max_size=mm.pos_embed_max_size,
                   vae_ch=vae.ch, vae_ch_mult=tuple(vae.ch_mult), vae_res_blocks=vae.num_res_blocks,
                   clip_width=clip.hidden_size, clip_layers=clip.num_hidden_layers, t5_width=t5.d_model,
                   t5_heads=t5.num_heads, t5_layers=t5.num_layers, t5_ff=t5.d_ff,
                   t5_buckets=t5.relative_attention_num_buckets, t5_vocab=t5.vocab_size)


# ---- configs --------------------------------------------------------------------------------------
def mmdit_config(spec: TinySpec) -> MMDiTConfig:
    return MMDiTConfig(depth=spec.depth, hidden_size=spec.hidden, num_heads=spec.depth, patch_size=spec.patch,
                       pos_embed_max_size=spec.pos_embed_max_size, context_dim=spec.context_dim,
                       pooled_dim=spec.pooled_dim, qk_norm=True)


def vae_config(spec: TinySpec) -> VAEConfig:
    return VAEConfig(ch=spec.vae_ch, ch_mult=spec.vae_ch_mult, num_res_blocks=spec.vae_res_blocks)


def _clip_shapes(spec: TinySpec) -> dict[str, tuple[int, ...]]:
    """The key -> shape table of one CLIP tower (what a file holds); fed to the loaders' inference."""
    w, shapes = spec.clip_width, {}
    shapes["text_model.embeddings.token_embedding.weight"] = (CLIP_VOCAB, w)
    shapes["text_model.embeddings.position_embedding.weight"] = (CLIP_POSITIONS, w)
    for i in range(spec.clip_layers):
        shapes[f"text_model.encoder.layers.{i}.mlp.fc1.weight"] = (4 * w, w)
    shapes["text_projection.weight"] = (w, w)
    return shapes


def clip_config(spec: TinySpec, kind: str) -> CLIPTextConfig:
    """The config `clip_config_from_state_dict` infers from the shipped shapes (quick_gelu / gelu)."""
    return clip_config_from_state_dict(_clip_shapes(spec), kind)


def t5_config(spec: TinySpec) -> T5Config:
    inner = spec.t5_width
    pre = "encoder.block.0.layer."
    shapes = {"shared.weight": (spec.t5_vocab, spec.t5_width),
              pre + "0.SelfAttention.relative_attention_bias.weight": (spec.t5_buckets, spec.t5_heads),
              pre + "0.SelfAttention.q.weight": (inner, spec.t5_width),
              pre + "1.DenseReluDense.wi_0.weight": (spec.t5_ff, spec.t5_width)}
    for i in range(spec.t5_layers):
        shapes[f"encoder.block.{i}.layer.0.SelfAttention.q.weight"] = (inner, spec.t5_width)
    return t5_config_from_state_dict(shapes)


# ---- trainable modules ------------------------------------------------------------------------------
def sincos_pos_embed(hidden: int, grid: int) -> torch.Tensor:
    """2-D sin-cos table [1, grid*grid, hidden] (MAE/SD3 get_2d_sincos_pos_embed, row-major (y, x))."""
    quarter = hidden // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [h/4]
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]  # [N, h/4]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [N, h/2]

    table = torch.cat([emb(xx), emb(yy)], dim=1)  # [N, h]: x half first, as SD3's (w, h) meshgrid order
    return table[None].float()


@torch.no_grad()
def build_mmdit(spec: TinySpec, generator: torch.Generator) -> MMDiT:
    """MMDiT with DiT-style init: xavier linears, zero adaLN and final projection (identity blocks)."""
    model = MMDiT(mmdit_config(spec))
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            fan_in, fan_out = p[0].numel(), p.shape[0]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            p.copy_(torch.rand(p.shape, generator=generator) * 2 * bound - bound)
        elif name.endswith(("ln_q.weight", "ln_k.weight")):
            p.fill_(1.0)
        else:
            p.zero_()
        if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            p.zero_()
        if name.startswith("t_embedder.mlp") and p.ndim == 2:
            p.normal_(0.0, 0.02, generator=generator)
    model.pos_embed.copy_(sincos_pos_embed(spec.hidden, spec.pos_embed_max_size))
    return model


def build_vae(spec: TinySpec) -> SD3VAE:
    return SD3VAE(vae_config(spec))


def build_clip_tower(spec: TinySpec, kind: str) -> ClipTextEncoder:
    """A trainable transformers CLIP tower with projection (CLIP-L's is stored but unused by SD3)."""
    tower = ClipTextEncoder(clip_config(spec, kind), with_projection=True)
    if kind == "clip_l":
        with torch.no_grad():
            tower.text_projection.weight.copy_(torch.eye(spec.clip_width))
    return tower


def build_t5_tower(spec: TinySpec) -> T5EncoderModel:
    return T5EncoderModel(t5_config(spec))


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TextTowers(nn.Module):
    """CLIP-L + CLIP-G + T5 with a differentiable, batched version of `SD3TextEncoder.encode` for
    one-chunk prompts with unit token weights (every caption of this world): context =
    cat(pad(cat(CLIP-L, CLIP-G penultimate), context_dim), T5) along the sequence, pooled =
    cat(CLIP-L pooled, CLIP-G projected pooled). tests/test_tiny_train.py checks it equals
    `SD3TextEncoder.encode` on the same tokens."""

    def __init__(self, spec: TinySpec):
        super().__init__()
        self.clip_l = build_clip_tower(spec, "clip_l")
        self.clip_g = build_clip_tower(spec, "clip_g")
        self.t5 = build_t5_tower(spec)
        self.context_dim = spec.context_dim

    def forward(self, l_ids: torch.Tensor, g_ids: torch.Tensor, t5_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        l_hidden, l_pooled = self.clip_l(l_ids)  # [B, 77, Wl], [B, Wl]
        g_hidden, g_pooled = self.clip_g(g_ids)  # [B, 77, Wg], [B, Wg]
        g_pooled = self.clip_g.text_projection(g_pooled)  # [B, Pg]
        lg = torch.cat([l_hidden, g_hidden], dim=-1)  # [B, 77, Wl+Wg]
        lg = nn.functional.pad(lg, (0, self.context_dim - lg.shape[-1]))  # [B, 77, C]
        t5 = self.t5(input_ids=t5_ids).last_hidden_state  # [B, T, C]
        return torch.cat([lg, t5.to(lg.dtype)], dim=1), torch.cat([l_pooled, g_pooled], dim=-1)
