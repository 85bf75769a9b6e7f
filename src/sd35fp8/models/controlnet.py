"""SD3 / SD3.5 ControlNets: a side network whose per-block outputs are added to the MMDiT's x stream.

Two architectures, told apart by their keys (parameter names here follow the original MMDiT's):

- "sd35": Stability's SD3.5 Large ControlNets (`sd3.5_large_controlnet_{blur,canny,depth}`;
  Stability-AI/sd3.5 `dit_embedder.ControlNetEmbedder` with `using_8b_controlnet`, ComfyUI
  `cldm/dit_embedder.py`). Single-stream blocks (`transformer_blocks.{i}`: adaLN, self-attention
  without qk-norm, MLP) run on the *base model's* embedded latent (its x_embedder + cropped
  pos_embed) plus `pos_embed_input(hint)`; c = own t_embedder(sigma*1000) + own y_embedder(pooled).
  Block outputs are chained; controlnet_blocks[i](out_i) is the residual, and base block j gets
  residual j // ceil(depth / layers) (every block, the last included, as the reference).
- "joint": the diffusers / InstantX layout (`SD3ControlNetModel` with joint blocks): own
  x_embedder + pos_embed, context_embedder, joint blocks (none pre-only), pooled forced to zeros
  (diffusers `force_zeros_for_pooled_projection`, ComfyUI `cldm/mmdit.py`). Base block j gets
  residual int(j * layers / depth), the last (pre-only) block none (diffusers SD3Transformer2DModel).

The hint is the VAE latent of the control image (see `preprocess_image` / `hint_latent`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.models.mmdit import (HEAD_DIM, DismantledBlock, JointBlock, MMDiT, PatchEmbed, TimestepEmbedder,
                                  VectorEmbedder, attention, batched, layer_norm, modulate, per_image,
                                  per_row)
from sd35fp8.models.vae import LATENT_SCALE, LATENT_SHIFT

KINDS = ("sd35", "joint")
CONTROL_TYPES = {0: "blur", 1: "canny", 2: "depth"}  # Stability's `control_type` tensor


@dataclass(frozen=True, kw_only=True)
class ControlNetConfig:
    kind: str
    num_layers: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2
    hint_channels: int = 16  # pos_embed_input in-channels (17: inpainting ControlNets, latent + mask)
    in_channels: int = 16  # joint: own x_embedder in-channels
    pooled_dim: int
    context_dim: int | None = None  # joint only
    pos_embed_max_size: int | None = None  # joint only
    qk_norm: bool = False
    x_block_self_attn_layers: tuple[int, ...] = ()
    control_type: int | None = None  # sd35 files: 0 blur, 1 canny, 2 depth

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ControlNet kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "joint" and (self.context_dim is None or self.pos_embed_max_size is None):
            raise ValueError("a joint ControlNet needs context_dim and pos_embed_max_size")

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]], name: str = "controlnet",
                        control_type: int | None = None) -> ControlNetConfig:
        """Infer the config from key -> shape in this module's naming (checkpoints/controlnet.py converts)."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"missing key {key} in {name}: not an SD3 ControlNet", name, [key])
            return tuple(int(s) for s in shapes[key])

        hidden = shape("controlnet_blocks.0.weight")[0]
        if hidden % HEAD_DIM:
            raise CheckpointError(f"{name}: width {hidden} is not a multiple of {HEAD_DIM}", name,
                                  ["controlnet_blocks.0.weight"])
        layers = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("controlnet_blocks.")})
        if layers != list(range(len(layers))):
            raise CheckpointError(f"{name}: controlnet_blocks indices {layers} are not 0..n-1", name)
        hint = shape("pos_embed_input.proj.weight")  # [hidden, hint_ch, p, p]
        pooled = shape("y_embedder.mlp.0.weight")[1]
        kind = "joint" if any(k.startswith("joint_blocks.") for k in shapes) else "sd35"
        common = dict(num_layers=len(layers), hidden_size=hidden, num_heads=hidden // HEAD_DIM, patch_size=hint[2],
                      hint_channels=hint[1], pooled_dim=pooled)
        if kind == "sd35":
            if pooled == hidden:
                raise CheckpointError(f"{name}: a y_embedder of width {hidden} -> {hidden} is Stability's 2B "
                                      "(SD3.5 Medium) ControlNet form, which needs the base model's y_embedder; "
                                      "only the SD3.5 Large (8B) form and the diffusers/InstantX layout are "
                                      "supported", name, ["y_embedder.mlp.0.weight"])
            return cls(kind=kind, control_type=control_type, **common)
        pos = shape("pos_embed")[1]
        attn2 = sorted({int(k.split(".")[1]) for k in shapes
                        if k.startswith("joint_blocks.") and ".x_block.attn2." in k})
        return cls(kind=kind, in_channels=shape("x_embedder.proj.weight")[1],
                   context_dim=shape("context_embedder.weight")[1],
                   pos_embed_max_size=math.isqrt(pos), qk_norm="joint_blocks.0.x_block.attn.ln_q.weight" in shapes,
                   x_block_self_attn_layers=tuple(attn2), control_type=control_type, **common)

    @property
    def control_name(self) -> str:
        return CONTROL_TYPES.get(self.control_type, "unknown") if self.control_type is not None else "none"

    def block_map(self, depth: int) -> list[int | None]:
        """For each of the base model's `depth` joint blocks: the ControlNet layer whose output it gets."""
        n = self.num_layers
        if self.kind == "sd35":  # ComfyUI dit_embedder: each output repeated ceil(depth / n) times
            rep = math.ceil(depth / n)
            return [j // rep if j // rep < n else None for j in range(depth)]
        return [int(j / (depth / n)) if j < depth - 1 else None for j in range(depth)]  # diffusers

    def describe(self) -> str:
        extra = f", control type {self.control_type} ({self.control_name})" if self.control_type is not None else ""
        return (f"SD3 ControlNet ({self.kind}): {self.num_layers} layers, hidden {self.hidden_size}, "
                f"{self.num_heads} heads, hint channels {self.hint_channels}, pooled {self.pooled_dim}{extra}")


class SingleBlock(DismantledBlock):
    """Self-attention block of the SD3.5 ControlNets (Stability DismantledBlock.forward(x, c), no context)."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__(hidden, num_heads, qk_norm=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor, vec=per_row) -> torch.Tensor:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = vec(self.adaLN_modulation, c).chunk(6, dim=1)  # [B, C]
        q, k, v = self.attn.qkv_heads(modulate(layer_norm(x), shift, scale))  # [B, L, H, D]
        x = torch.addcmul(x, gate.unsqueeze(1), self.attn.proj(attention(q, k, v)))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp)))


class ControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        self.batch_invariant = True  # as MMDiT: adaLN / embedders row by row
        h = config.hidden_size
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = VectorEmbedder(config.pooled_dim, h)
        self.pos_embed_input = PatchEmbed(config.hint_channels, h, config.patch_size)
        if config.kind == "sd35":
            self.transformer_blocks = nn.ModuleList(SingleBlock(h, config.num_heads) for _ in range(config.num_layers))
        else:
            self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size ** 2, h))
            self.x_embedder = PatchEmbed(config.in_channels, h, config.patch_size)
            self.context_embedder = nn.Linear(config.context_dim, h)
            self.joint_blocks = nn.ModuleList(
                JointBlock(h, config.num_heads, config.qk_norm, pre_only=False,
                           x_self_attn=i in config.x_block_self_attn_layers) for i in range(config.num_layers))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(h, h) for _ in range(config.num_layers))

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed_input.proj.weight.dtype

    def check_base(self, base: MMDiT) -> None:
        bc = base.config
        if bc.hidden_size != self.config.hidden_size or bc.patch_size != self.config.patch_size:
            raise InputError(f"this ControlNet (hidden {self.config.hidden_size}, patch {self.config.patch_size}) does "
                             f"not fit the model (hidden {bc.hidden_size}, patch {bc.patch_size}): SD3.5 Large "
                             "ControlNets need SD3.5 Large, a Medium ControlNet needs Medium")

    def embed(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
              hint: torch.Tensor, base: MMDiT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The blocks' inputs: (tokens [B, h*w/p^2, C] row-major, c [B, C], ctx [B, L, C] or None (sd35)).
        Shared by layer_outputs and the engine (fast/controlnet.py)."""
        cfg, dtype = self.config, self.dtype
        B, _, h, w = x.shape
        if hint.shape[-2:] != (h, w) or hint.shape[1] != cfg.hint_channels:
            raise InputError(f"ControlNet hint must be [B, {cfg.hint_channels}, {h}, {w}] (the latent's size), "
                             f"got {tuple(hint.shape)}")
        if hint.shape[0] not in (1, B):
            raise InputError(f"ControlNet hint batch {hint.shape[0]}: expected 1 or {B}")
        p = cfg.patch_size
        vec, img = (per_row, per_image) if self.batch_invariant else (batched, batched)
        t = (sigma.reshape(-1) * 1000).expand(B)
        if cfg.kind == "sd35":
            self.check_base(base)
            bdtype = base.x_embedder.proj.weight.dtype  # the base model's embedding of x (Stability 8B form)
            tokens = (img(base.x_embedder, x.to(bdtype)) + base.cropped_pos_embed(h // p, w // p).to(bdtype)).to(dtype)
            c = vec(lambda ti, yi: self.t_embedder(ti, dtype) + self.y_embedder(yi.to(dtype)), t, pooled)  # [B, C]
            tokens = (tokens + self._hint_tokens(hint.to(dtype), img)).contiguous()  # [B, h*w/p^2, C] row-major
            return tokens, c, None
        tokens = img(self.x_embedder, x.to(dtype)) + self.cropped_pos_embed(h // p, w // p).to(dtype)
        zeros = torch.zeros_like(pooled, dtype=dtype)  # force_zeros_for_pooled_projection
        c = vec(lambda ti, yi: self.t_embedder(ti, dtype) + self.y_embedder(yi), t, zeros)
        ctx = self.context_embedder(context.to(dtype))
        tokens = (tokens + self._hint_tokens(hint.to(dtype), img)).contiguous()  # row-major (PatchEmbed: not)
        return tokens, c, ctx

    def _hint_tokens(self, hint: torch.Tensor, img) -> torch.Tensor:
        """pos_embed_input(hint) [B or 1, h*w/p^2, C]. One hint for the batch is embedded once and broadcast:
        an expanded batch (stride 0) would take another conv path than the hint alone and round apart (up to
        2e-4 in float32 on the CPU for a channels-last VAE latent), so a CFG pair would not equal its rows."""
        return img(self.pos_embed_input, hint)

    def layer_outputs(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                      hint: torch.Tensor, base: MMDiT) -> list[torch.Tensor]:
        """x [B, 16, h, w], sigma [B], context [B, L, Cctx], pooled [B, P], hint [B or 1, hint_ch, h, w] ->
        one residual [B, h*w/p^2, C] per ControlNet layer (diffusers' controlnet_block_samples)."""
        tokens, c, ctx = self.embed(x, sigma, context, pooled, hint, base)
        vec = per_row if self.batch_invariant else batched
        outs: list[torch.Tensor] = []
        if self.config.kind == "sd35":
            for block, proj in zip(self.transformer_blocks, self.controlnet_blocks):
                tokens = block(tokens, c, vec)
                outs.append(proj(tokens))
            return outs
        for block, proj in zip(self.joint_blocks, self.controlnet_blocks):
            ctx, tokens = block(ctx, tokens, c, vec)
            outs.append(proj(tokens))
        return outs

    def cropped_pos_embed(self, hp: int, wp: int) -> torch.Tensor:
        m = self.config.pos_embed_max_size
        if hp > m or wp > m:
            raise InputError(f"latent {hp}x{wp} patches is larger than this ControlNet's position table ({m}x{m})")
        top, left = (m - hp) // 2, (m - wp) // 2
        return self.pos_embed.view(1, m, m, -1)[:, top:top + hp, left:left + wp, :].reshape(1, hp * wp, -1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                hint: torch.Tensor, base: MMDiT, strength: float = 1.0) -> list[torch.Tensor | None]:
        """Residuals per base joint block (None: nothing added), scaled by `strength`; MMDiT's `control`."""
        return self.per_block(self.layer_outputs(x, sigma, context, pooled, hint, base), base.config.depth, strength)

    def per_block(self, outs: list[torch.Tensor], depth: int, strength: float) -> list[torch.Tensor | None]:
        """Layer outputs -> residual per base joint block (block_map), each layer's scaled once: a layer
        feeding two blocks gives both the same tensor (the engine's CUDA graph copies it in once)."""
        scaled = [o * strength for o in outs]
        return [scaled[i] if i is not None else None for i in self.config.block_map(depth)]


# ---- control image -> hint latent ----------------------------------------------------------------------------
def preprocess_image(image: torch.Tensor, config: ControlNetConfig) -> torch.Tensor:
    """Control image [B, 3, H, W] in [0, 1] -> the VAE's input, as ComfyUI feeds these ControlNets.

    ComfyUI (comfy/controlnet.py load_controlnet_sd35) transforms the [0, 1] image and then its VAE
    maps it to 2*a - 1: canny (control_type 1) a*255*0.5 + 0.5 -> VAE input a*255; depth (2) 1 - a;
    blur and the diffusers layout unchanged. (Stability's sd3_infer.py feeds canny as a*127.5 + 0.5
    straight to the VAE and depth as 2a - 1 uninverted; the templates are built for ComfyUI's.)
    """
    a = image
    if config.kind == "sd35" and config.control_type == 1:
        a = a * 255 * 0.5 + 0.5
    elif config.kind == "sd35" and config.control_type == 2:
        a = 1.0 - a
    return 2.0 * a - 1.0


def latent_from_vae(raw: torch.Tensor, config: ControlNetConfig) -> torch.Tensor:
    """Raw VAE latent -> the hint: SD3 latent format; the diffusers layout without the shift (ComfyUI)."""
    shift = LATENT_SHIFT if config.kind == "sd35" else 0.0
    return (raw - shift) * LATENT_SCALE


@torch.no_grad()
def hint_latent(image: torch.Tensor, vae: nn.Module, config: ControlNetConfig) -> torch.Tensor:
    """Control image [B, 3, H, W] in [0, 1] (already at the latent's pixel size) -> hint [B, 16, H/8, W/8]."""
    if config.hint_channels != 16:
        raise InputError(f"ControlNet with {config.hint_channels} hint channels (inpainting ControlNet) is not "
                         "supported: it needs a mask channel")
    return latent_from_vae(vae.encode(preprocess_image(image, config)).float(), config)
