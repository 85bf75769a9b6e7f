"""MMDiT / MMDiT-X: the diffusion transformer of SD3.5 Large, Large Turbo and Medium.

Parameter names are exactly the original checkpoint keys (without `model.diffusion_model.`),
so a state dict streams in with `load_state_dict(assign=True)` onto a module built on the
meta device. Every linear layer is a plain `nn.Linear` so the FP8 pass can swap it.
The math follows Stability-AI/sd3.5 `mmditx.py` (checked against ComfyUI's `mmdit.py` and
diffusers' `transformer_sd3.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sd35fp8.errors import CheckpointError, InputError

HEAD_DIM = 64  # the reference fixes heads of 64: hidden = 64 * depth, heads = depth
MLP_RATIO = 4
NORM_EPS = 1e-6
TIMESTEP_DIM = 256
LATENT_DOWNSCALE = 8  # VAE: pixels per latent cell


@dataclass(frozen=True, kw_only=True)
class MMDiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    pos_embed_max_size: int
    context_dim: int  # context_embedder in-features (4096 for T5-XXL width)
    pooled_dim: int  # y_embedder in-features (768 + 1280 = 2048)
    qk_norm: bool
    x_block_self_attn_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        bad = [i for i in self.x_block_self_attn_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"x_block_self_attn_layers {bad} outside 0..{self.depth - 1}")
        object.__setattr__(self, "x_block_self_attn_layers", tuple(sorted(set(self.x_block_self_attn_layers))))

    # ---- named presets (random-weight benchmarks) -------------------------------------------
    @classmethod
    def large(cls) -> MMDiTConfig:
        """SD3.5 Large / Large Turbo: MMDiT, 38 blocks, 8.06 B parameters."""
        return cls(depth=38, hidden_size=38 * HEAD_DIM, num_heads=38, pos_embed_max_size=192,
                   context_dim=4096, pooled_dim=2048, qk_norm=True)

    @classmethod
    def medium(cls) -> MMDiTConfig:
        """SD3.5 Medium: MMDiT-X, 24 blocks, x_block self-attention in blocks 0-12."""
        return cls(depth=24, hidden_size=24 * HEAD_DIM, num_heads=24, pos_embed_max_size=384,
                   context_dim=4096, pooled_dim=2048, qk_norm=True,
                   x_block_self_attn_layers=tuple(range(13)))

    @classmethod
    def tiny(cls) -> MMDiTConfig:
        """A 2-block MMDiT-X for CPU smoke tests (hidden 128, context 64, pooled 32)."""
        return cls(depth=2, hidden_size=2 * HEAD_DIM, num_heads=2, pos_embed_max_size=16,
                   context_dim=64, pooled_dim=32, qk_norm=True, x_block_self_attn_layers=(0,))

    # ---- inference from checkpoint shapes ------------------------------------------------------
    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]], name: str = "mmdit") -> MMDiTConfig:
        """Infer the config from key -> shape of the MMDiT (keys without `model.diffusion_model.`)."""

        def shape(key: str) -> tuple[int, ...]:
            if key not in shapes:
                raise CheckpointError(f"missing key {key} in {name}: not an SD3 MMDiT state dict", name, [key])
            return tuple(int(s) for s in shapes[key])

        proj = shape("x_embedder.proj.weight")  # [hidden, in_ch, p, p]
        hidden, in_channels, patch = proj[0], proj[1], proj[2]
        if hidden % HEAD_DIM:
            raise CheckpointError(f"x_embedder.proj.weight width {hidden} in {name} is not a multiple of 64",
                                  name, ["x_embedder.proj.weight"])
        depth = hidden // HEAD_DIM
        blocks = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")})
        if blocks != list(range(depth)):
            raise CheckpointError(f"{name}: hidden size {hidden} implies {depth} joint blocks, the keys hold "
                                  f"{len(blocks)} (indices {blocks[:3]}...{blocks[-3:]})", name)
        pos = shape("pos_embed")  # [1, max*max, hidden]
        pos_max = math.isqrt(pos[1])
        if pos_max * pos_max != pos[1]:
            raise CheckpointError(f"pos_embed in {name} has {pos[1]} positions, not a square grid", name, ["pos_embed"])
        final = shape("final_layer.linear.weight")  # [p*p*out, hidden]
        attn2 = sorted({int(k.split(".")[1]) for k in shapes
                        if k.startswith("joint_blocks.") and ".x_block.attn2." in k})
        return cls(
            depth=depth,
            hidden_size=hidden,
            num_heads=depth,
            patch_size=patch,
            in_channels=in_channels,
            out_channels=final[0] // (patch * patch),
            pos_embed_max_size=pos_max,
            context_dim=shape("context_embedder.weight")[1],
            pooled_dim=shape("y_embedder.mlp.0.weight")[1],
            qk_norm="joint_blocks.0.context_block.attn.ln_k.weight" in shapes,
            x_block_self_attn_layers=tuple(attn2),
        )

    @property
    def max_pixels(self) -> int:
        """Largest image side in pixels that the position table covers."""
        return self.pos_embed_max_size * self.patch_size * LATENT_DOWNSCALE

    def num_params(self, include_pos_embed: bool = True) -> int:
        """Parameter count; the published sizes (8.06 B, 2.24 B) leave out the fixed pos_embed table."""
        h, p = self.hidden_size, self.patch_size
        lin = lambda i, o: i * o + o  # noqa: E731
        attn = lin(h, 3 * h) + lin(h, h) + (2 * HEAD_DIM if self.qk_norm else 0)
        mlp = lin(h, MLP_RATIO * h) + lin(MLP_RATIO * h, h)
        n = (self.pos_embed_max_size ** 2 * h if include_pos_embed else 0) + self.in_channels * p * p * h + h
        n += lin(TIMESTEP_DIM, h) + lin(h, h) + lin(self.pooled_dim, h) + lin(h, h) + lin(self.context_dim, h)
        for i in range(self.depth):
            x_mods = 9 if i in self.x_block_self_attn_layers else 6
            n += lin(h, x_mods * h) + attn + mlp + (attn if i in self.x_block_self_attn_layers else 0)
            if i == self.depth - 1:  # pre-only context block: adaLN (shift, scale), qkv, norms
                n += lin(h, 2 * h) + lin(h, 3 * h) + (2 * HEAD_DIM if self.qk_norm else 0)
            else:
                n += lin(h, 6 * h) + attn + mlp
        return n + lin(h, 2 * h) + lin(h, p * p * self.out_channels)

    def describe(self) -> str:
        kind = "MMDiT-X" if self.x_block_self_attn_layers else "MMDiT"
        layers = self.x_block_self_attn_layers
        if not layers:
            attn2 = ""
        elif layers == tuple(range(layers[0], layers[-1] + 1)):
            attn2 = f", attn2 in blocks {layers[0]}-{layers[-1]}"
        else:
            attn2 = f", attn2 in blocks {list(layers)}"
        n = self.num_params(include_pos_embed=False)
        size = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
        return (f"{kind}: depth {self.depth}, hidden {self.hidden_size}, {self.num_heads} heads x "
                f"{self.hidden_size // self.num_heads}, patch {self.patch_size}, pos max {self.pos_embed_max_size} "
                f"(<= {self.max_pixels} px), context {self.context_dim}, pooled {self.pooled_dim}, "
                f"qk-norm {'rms' if self.qk_norm else 'none'}{attn2}, {size} params")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # x * (1 + scale) + shift


def per_row(fn: Callable[..., torch.Tensor], *vs: torch.Tensor) -> torch.Tensor:
    """fn(*vs) for conditioning batches vs [B, ...] whose rows are independent, computed so that a row's
    result does not depend on B: GEMMs with few rows (M = B) pick their kernel by M and round
    differently for another M (MKL on the CPU: M = 2 and M = 8 differ; M = 1 takes a GEMV whose
    rounding even depends on the weight's alignment), so a prompt sampled in a cross-prompt batch
    would not equal the same prompt sampled alone. The rows go through fn in pairs, always M = 2 (the
    shape of one CFG call; an odd last row is paired with a copy of itself), each pair a fresh
    contiguous copy: with one shape and one kernel a row's result does not depend on its partner.
    A CFG call (B = 2) is then one call, so the fused adaLN's weight (2.7 GB in FP8 at Large) is read
    once a step, not once per row. These are the vector paths only (timestep/pooled embedders,
    adaLN); the per-token GEMMs (M = B x tokens) are measured batch-invariant
    (tests/test_server_load.py, tests/test_engine.py)."""
    B = vs[0].shape[0]
    outs = []
    for i in range(0, B, 2):
        n = min(2, B - i)
        pair = [(v[i:i + 2].clone() if n == 2 else v[i:i + 1].repeat(2, *[1] * (v.ndim - 1))) for v in vs]
        outs.append(fn(*pair)[:n])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def per_image(fn: Callable[..., torch.Tensor], *vs: torch.Tensor) -> torch.Tensor:
    """fn(*vs) one batch entry at a time (each call sees batch 1): the patch-embedding conv, whose
    GEMM has M = batch x tokens and rounds differently for another batch (oneDNN on the CPU picks its
    blocking from it). Unlike per_row no duplicate is needed: M is the image's token count."""
    return torch.cat([fn(*(v[i : i + 1] for v in vs)) for i in range(vs[0].shape[0])])


def batched(fn: Callable[..., torch.Tensor], *vs: torch.Tensor) -> torch.Tensor:
    """fn(*vs) in one call (MMDiT.batch_invariant = False: training, large offline batches)."""
    return fn(*vs)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] x3 -> [B, L, H*D]."""
    B, L, H, D = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, L, D]
    return out.transpose(1, 2).reshape(B, L, H * D)


class Mlp(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, MLP_RATIO * hidden)
        self.fc2 = nn.Linear(MLP_RATIO * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = None if pre_only else nn.Linear(hidden, hidden)
        self.ln_q = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if qk_norm else None
        self.ln_k = nn.RMSNorm(self.head_dim, eps=NORM_EPS) if qk_norm else None

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, C] -> q, k, v each [B, L, H, D] (q, k RMS-normed per head)."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim).unbind(2)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


class DismantledBlock(nn.Module):
    """One stream (context or x) of a joint block: adaLN, attention projections, MLP."""

    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, pre_only: bool = False,
                 self_attn: bool = False):
        super().__init__()
        self.pre_only = pre_only
        self.n_mods = 2 if pre_only else (9 if self_attn else 6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.n_mods * hidden))
        self.attn = SelfAttention(hidden, num_heads, qk_norm, pre_only=pre_only)
        self.attn2 = SelfAttention(hidden, num_heads, qk_norm) if self_attn else None
        self.mlp = None if pre_only else Mlp(hidden)


class JointBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, pre_only: bool, x_self_attn: bool):
        super().__init__()
        self.context_block = DismantledBlock(hidden, num_heads, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(hidden, num_heads, qk_norm, self_attn=x_self_attn)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor,
                vec: Callable[..., torch.Tensor] = per_row) -> tuple[torch.Tensor, torch.Tensor]:
        """`vec` computes the adaLN modulations from c (per_row: batch-invariant; batched)."""
        cb, xb = self.context_block, self.x_block
        # context stream: adaLN chunks (shift, scale, gate)_msa, (shift, scale, gate)_mlp | pre-only: shift, scale
        c_mods = vec(cb.adaLN_modulation, c).chunk(cb.n_mods, dim=1)  # each [B, C]
        qc, kc, vc = cb.attn.qkv_heads(modulate(layer_norm(context), c_mods[0], c_mods[1]))  # [B, Lc, H, D]
        # x stream; MMDiT-X adds (shift, scale, gate)_msa2 for a self-attention on the same normed x
        x_mods = vec(xb.adaLN_modulation, c).chunk(xb.n_mods, dim=1)
        x_norm = layer_norm(x)
        qx, kx, vx = xb.attn.qkv_heads(modulate(x_norm, x_mods[0], x_mods[1]))  # [B, Lx, H, D]

        # joint attention over [context ; x]
        n_ctx = context.shape[1]
        attn = attention(torch.cat([qc, qx], 1), torch.cat([kc, kx], 1), torch.cat([vc, vx], 1))  # [B, Lc+Lx, C]
        # contiguous: nn.Linear fuses the bias into the GEMM (addmm) only for a contiguous 3-d input; the
        # slices are contiguous at batch 1 only, so a batch would round the bias add apart (bf16)
        c_attn, x_attn = attn[:, :n_ctx].contiguous(), attn[:, n_ctx:].contiguous()

        if not cb.pre_only:
            shift_mlp, scale_mlp = c_mods[3], c_mods[4]
            context = torch.addcmul(context, c_mods[2].unsqueeze(1), cb.attn.proj(c_attn))
            context = torch.addcmul(context, c_mods[5].unsqueeze(1),
                                    cb.mlp(modulate(layer_norm(context), shift_mlp, scale_mlp)))

        x = torch.addcmul(x, x_mods[2].unsqueeze(1), xb.attn.proj(x_attn))
        if xb.attn2 is not None:
            x_attn2 = attention(*xb.attn2.qkv_heads(modulate(x_norm, x_mods[6], x_mods[7])))  # [B, Lx, C]
            x = torch.addcmul(x, x_mods[8].unsqueeze(1), xb.attn2.proj(x_attn2))
        x = torch.addcmul(x, x_mods[5].unsqueeze(1), xb.mlp(modulate(layer_norm(x), x_mods[3], x_mods[4])))
        return context, x


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, hp, wp] -> [B, hp*wp, C]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIMESTEP_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = TIMESTEP_DIM // 2
        freqs = torch.exp(-math.log(10000.0) / half * torch.arange(half, dtype=torch.float32, device=t.device))
        args = t.float()[:, None] * freqs[None]  # [B, 128]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))


class VectorEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch * patch * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor, vec: Callable[..., torch.Tensor] = per_row) -> torch.Tensor:
        shift, scale = vec(self.adaLN_modulation, c).chunk(2, dim=1)  # original layout: [shift; scale]
        return self.linear(modulate(layer_norm(x), shift, scale))


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = config
        # conditioning vectors row by row (per_row), so a prompt's result does not depend on what else
        # is in the batch; False computes them in one GEMM (training, large offline batches)
        self.batch_invariant = True
        h = config.hidden_size
        self.register_buffer("pos_embed", torch.zeros(1, config.pos_embed_max_size ** 2, h))
        self.x_embedder = PatchEmbed(config.in_channels, h, config.patch_size)
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = VectorEmbedder(config.pooled_dim, h)
        self.context_embedder = nn.Linear(config.context_dim, h)
        self.joint_blocks = nn.ModuleList(
            JointBlock(h, config.num_heads, config.qk_norm, pre_only=i == config.depth - 1,
                       x_self_attn=i in config.x_block_self_attn_layers)
            for i in range(config.depth)
        )
        self.final_layer = FinalLayer(h, config.patch_size, config.out_channels)

    def cropped_pos_embed(self, hp: int, wp: int) -> torch.Tensor:
        m = self.config.pos_embed_max_size
        top, left = (m - hp) // 2, (m - wp) // 2
        grid = self.pos_embed.view(1, m, m, -1)[:, top:top + hp, left:left + wp, :]  # [1, hp, wp, C]
        return grid.reshape(1, hp * wp, -1)

    def check_inputs(self, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                     skip_layers: Sequence[int], control: Sequence[torch.Tensor | None] | None = None) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise InputError(f"MMDiT expects latents [B, {cfg.in_channels}, H/8, W/8], got {tuple(x.shape)}")
        p, (h, w) = cfg.patch_size, x.shape[-2:]
        px = LATENT_DOWNSCALE
        if h % p or w % p:
            raise InputError(f"image size {w * px}x{h * px} px must be a multiple of {p * px} px")
        if h // p > cfg.pos_embed_max_size or w // p > cfg.pos_embed_max_size:
            raise InputError(f"image size {w * px}x{h * px} px is too large: this model's position table "
                             f"covers at most {cfg.max_pixels}x{cfg.max_pixels} px")
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim or context.shape[0] != x.shape[0]:
            raise InputError(f"context must be [{x.shape[0]}, L, {cfg.context_dim}], got {tuple(context.shape)}")
        if pooled.shape != (x.shape[0], cfg.pooled_dim):
            raise InputError(f"pooled must be [{x.shape[0]}, {cfg.pooled_dim}], got {tuple(pooled.shape)}")
        bad = [i for i in skip_layers if not 0 <= i < cfg.depth]
        if bad:
            raise InputError(f"skip_layers {bad} outside 0..{cfg.depth - 1}")
        if control is not None:
            if len(control) != cfg.depth:
                raise InputError(f"control must hold one residual (or None) per joint block ({cfg.depth}), "
                                 f"got {len(control)}")
            tokens = (h // p) * (w // p)
            bad = [i for i, r in enumerate(control)
                   if r is not None and tuple(r.shape) != (x.shape[0], tokens, cfg.hidden_size)]
            if bad:
                raise InputError(f"control residuals {bad[:5]} must be [{x.shape[0]}, {tokens}, {cfg.hidden_size}], "
                                 f"got {tuple(control[bad[0]].shape)}")

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: Sequence[int] = (), control: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """x [B, 16, H/8, W/8], sigma [B] in [0, 1], context [B, L, C], pooled [B, P] -> velocity like x.

        Inputs are cast to the model's compute dtype (that of the patch-embedding conv) and the
        velocity is returned in x's dtype. `skip_layers` skips whole joint blocks (skip-layer guidance).
        `control` (ControlNets, models/controlnet.py): per joint block a residual [B, hp*wp, C] or None,
        added to the x stream after that block (a skipped block adds nothing, as Stability's mmditx).
        """
        self.check_inputs(x, context, pooled, skip_layers, control)
        B, _, h, w = x.shape
        p = self.config.patch_size
        hp, wp = h // p, w // p
        dtype = self.x_embedder.proj.weight.dtype

        t = (sigma.reshape(-1) * 1000).expand(B)  # timestep = sigma * 1000
        vec, img = (per_row, per_image) if self.batch_invariant else (batched, batched)
        tokens = img(self.x_embedder, x.to(dtype)) + self.cropped_pos_embed(hp, wp).to(dtype)  # [B, hp*wp, C]
        c = vec(lambda ti, yi: self.t_embedder(ti, dtype) + self.y_embedder(yi.to(dtype)), t, pooled)  # [B, C]
        ctx = self.context_embedder(context.to(dtype))  # [B, L, C]

        skip = frozenset(skip_layers)
        for i, block in enumerate(self.joint_blocks):
            if i not in skip:
                ctx, tokens = block(ctx, tokens, c, vec)
                if control is not None and control[i] is not None:
                    tokens = tokens + control[i].to(dtype)

        out = self.final_layer(tokens, c, vec)  # [B, hp*wp, p*p*out]
        out = out.view(B, hp, wp, p, p, self.config.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(B, self.config.out_channels, hp * p, wp * p)
        return out.to(x.dtype)


@torch.no_grad()
def init_random_(model: MMDiT, generator: torch.Generator | None = None) -> MMDiT:
    """Fill every parameter in place with random values shaped like a trained net's (tests, benchmarks).

    Linear/conv weights ~ N(0, 1/fan_in) keep activations O(1); adaLN gets a small but visible
    modulation (shift/scale/gate ~ +-0.3) so every block matters; RMSNorm weights ~ 1. Works on any device: build
    on meta, `model.to_empty(device=...)`, then call this (the generator must be on that device).
    """
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "pos_embed":
            std, mean = 0.5, 0.0
        elif name.endswith(("ln_q.weight", "ln_k.weight")):
            std, mean = 0.1, 1.0
        elif name.endswith(".bias"):
            std, mean = (0.1 if "adaLN_modulation" in name else 0.02), 0.0
        else:  # [out, in] or [out, in, kh, kw]
            fan_in = p[0].numel()
            std, mean = (0.25 if "adaLN_modulation" in name else 1.0) / math.sqrt(fan_in), 0.0
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        p.copy_(noise.mul_(std).add_(mean))
    return model
