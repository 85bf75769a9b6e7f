"""The SD3 VAE (16 latent channels) in the original LDM key layout.

Parameter names are the LDM keys without `first_stage_model.` (`encoder.down.0.block.0.conv1.weight`,
`decoder.mid.attn_1.q.weight`, ...), so an original checkpoint loads with `load_state_dict(assign=True)`
onto a module built on the meta device. Math follows Stability-AI/sd3.5 `sd3_impls.py` (VAEEncoder,
VAEDecoder): GroupNorm(32, eps 1e-6), SiLU, single-head mid attention with 1x1 convs, asymmetric-pad
stride-2 downsampling, nearest x2 upsampling, no quant convs. `encode` returns the posterior mean.
"""

from __future__ import annotations


import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.tiles import run_tiled

# SD3 latent format (sd3_impls.SD3LatentFormat, ComfyUI latent_formats.SD3).
LATENT_SCALE = 1.5305
LATENT_SHIFT = 0.0609


def to_model_space(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> MMDiT latent: (z - shift) * scale."""
    return (z - LATENT_SHIFT) * LATENT_SCALE


def to_vae_space(z: torch.Tensor) -> torch.Tensor:
    """MMDiT latent -> raw VAE latent: z / scale + shift."""
    return z / LATENT_SCALE + LATENT_SHIFT


def image_to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    """Decoded images [B, 3, H, W] in [-1, 1] -> list of uint8 [H, W, 3] arrays.

    Exactly ComfyUI: VAEDecode's process_output clamp((x + 1) / 2, 0, 1) in float32, then SaveImage's
    np.clip(255. * i, 0, 255).astype(np.uint8), which truncates (no rounding).
    """
    if x.ndim != 4:
        raise InputError(f"image_to_uint8 expects [B, C, H, W], got shape {tuple(x.shape)}")
    x01 = torch.clamp((x.detach().float() + 1.0) / 2.0, min=0.0, max=1.0)
    arr = x01.permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, C]
    return [np.clip(255.0 * a, 0, 255).astype(np.uint8) for a in arr]


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # encoder; each decoder level has num_res_blocks + 1
    latent_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    num_groups: int = 32

    @classmethod
    def sd3(cls) -> VAEConfig:
        """The SD3 / SD3.5 VAE."""
        return cls()

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]]) -> VAEConfig:
        """Infer the config from key -> shape (keys without `first_stage_model.`)."""
        need = ["encoder.conv_in.weight", "decoder.conv_in.weight", "encoder.conv_out.weight",
                "decoder.conv_out.weight"]
        missing = [k for k in need if k not in shapes]
        if missing:
            raise CheckpointError(f"not an LDM VAE state dict: missing {', '.join(missing)}", keys=missing)
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        latent = shapes["decoder.conv_in.weight"][1]
        out_channels = shapes["decoder.conv_out.weight"][0]
        enc_out = shapes["encoder.conv_out.weight"][0]
        if enc_out != 2 * latent:
            raise CheckpointError(
                f"encoder.conv_out.weight has {enc_out} outputs, expected 2 * {latent} latent channels "
                "(decoder.conv_in.weight)", keys=["encoder.conv_out.weight", "decoder.conv_in.weight"])

        enc_blocks: dict[int, set[int]] = {}
        dec_blocks: dict[int, set[int]] = {}
        for key in shapes:
            if m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.", key):
                enc_blocks.setdefault(int(m[1]), set()).add(int(m[2]))
            elif m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.", key):
                dec_blocks.setdefault(int(m[1]), set()).add(int(m[2]))
        levels = len(enc_blocks)
        if levels == 0 or sorted(enc_blocks) != list(range(levels)) or sorted(dec_blocks) != list(range(levels)):
            raise CheckpointError(
                f"VAE levels do not match: encoder.down.* has {sorted(enc_blocks)}, "
                f"decoder.up.* has {sorted(dec_blocks)}")
        n_res = len(enc_blocks[0])
        for i in range(levels):
            if enc_blocks[i] != set(range(n_res)):
                raise CheckpointError(
                    f"encoder.down.{i}.block has blocks {sorted(enc_blocks[i])}, expected 0..{n_res - 1}")
            if dec_blocks[i] != set(range(n_res + 1)):
                raise CheckpointError(f"decoder.up.{i}.block has blocks {sorted(dec_blocks[i])}, expected 0..{n_res}")

        mult = []
        for i in range(levels):
            key = f"encoder.down.{i}.block.0.conv1.weight"
            if key not in shapes:
                raise CheckpointError(f"missing {key}", keys=[key])
            c = shapes[key][0]
            if c % ch:
                raise CheckpointError(f"{key} has {c} channels, not a multiple of ch={ch}", keys=[key])
            mult.append(c // ch)
        return cls(ch=int(ch), ch_mult=tuple(int(m) for m in mult), num_res_blocks=n_res,
                   latent_channels=int(latent), in_channels=int(in_channels), out_channels=int(out_channels))

    def describe(self) -> str:
        return (f"VAE: ch {self.ch}, mult {self.ch_mult}, {self.num_res_blocks} res blocks (decoder "
                f"{self.num_res_blocks + 1}), {self.latent_channels} latent channels, downscale {self.downscale}")


def _norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.num_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cfg, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cfg, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs (LDM layout)."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, 1, c, hgt * wid).transpose(2, 3) for m in (self.q, self.k, self.v))  # [B, 1, N, C]
        out = F.scaled_dot_product_attention(q, k, v)  # scale C ** -0.5
        out = out.transpose(2, 3).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, m in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cfg, cin, cfg.ch * m))
                cin = cfg.ch * m
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = MidBlock(cfg, cin)
        self.norm_out = _norm(cfg, cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 2*latent, H/8, W/8]


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cin, 3, padding=1)
        self.mid = MidBlock(cfg, cin)
        levels: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cfg, cin, cfg.ch * cfg.ch_mult[i]))
                cin = cfg.ch * cfg.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)  # up.0 is the full-resolution level, run last
        self.norm_out = _norm(cfg, cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, H, W]


class SD3VAE(nn.Module):
    """Pure module: no device moves. Inputs are cast to the parameters' dtype; outputs keep that dtype."""

    # diffusers' AutoencoderKL switches (`pipe.vae.enable_tiling()`), read by SD35Pipeline's decode: always tiled /
    # one image at a time. This module's own decode ignores them.
    use_tiling: bool = False
    use_slicing: bool = False

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def enable_tiling(self, *args, **kwargs) -> None:
        self.use_tiling = True  # diffusers' tile sizes (arguments) are not used: decode_tiled picks its own

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """img [B, 3, H, W] in [-1, 1] -> posterior mean [B, latent, H/8, W/8] (raw, unscaled)."""
        moments = self.encoder(img.to(self.dtype))  # [B, 2*latent, h, w]
        mean, _logvar = moments.chunk(2, dim=1)
        return mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z raw [B, latent, h, w] -> image [B, 3, 8h, 8w], nominally in [-1, 1] (not clamped).
        After `compile_decoder`, through the compiled decoder."""
        return self.__dict__.get("_compiled_decoder", self.decoder)(z.to(self.dtype))

    def compile_decoder(self) -> None:
        """torch.compile the decoder for `decode` (one graph per latent shape; the tiled decode and
        `encode` stay eager). H100, 1024² (benchmarks/vae_decode.py): 98 ms eager, 38 ms compiled with
        channels_last weights and input, ~20 s to compile a shape the first time (Inductor's on-disk cache
        keeps it for later processes). Here the decoder is compiled as loaded (NCHW; Inductor's layout
        optimisation picks the convolutions' layout), so the eager tiled decode keeps its faster NCHW
        weights (channels_last eager: 141 ms). The roads that compile the MMDiT (server, `run`,
        generate --compile) call it for a resident VAE."""
        # kept out of the module tree (a compiled module as an attribute would add its parameters to the
        # state dict a second time): a plain attribute, read by `decode`
        self.__dict__["_compiled_decoder"] = torch.compile(self.decoder.forward, dynamic=False)

    def decode_tiled(self, z: torch.Tensor, tile_latent: int = 64, overlap: int = 16) -> torch.Tensor:
        """Decode in latent tiles of tile_latent^2 blended with linear feathers over `overlap` latents.

        Peak activation memory is that of one tile decode (plus the float32 output); a latent that fits in
        one tile is decoded whole, which equals `decode`. Tiles see only local GroupNorm statistics and
        local mid-attention, so the result is close to, not equal to, the full decode.
        """
        _check_tiles(tile_latent, overlap)
        f = self.config.downscale
        eager = lambda t: self.decoder(t.to(self.dtype))  # noqa: E731  (tile shapes vary: never compiled)
        return run_tiled(eager, z, tile_latent, overlap, self.config.out_channels, f, 1, self.dtype)

    def encode_tiled(self, img: torch.Tensor, tile_latent: int = 64, overlap: int = 16) -> torch.Tensor:
        """Tiled `encode`: image tiles of 8*tile_latent pixels; H and W must be multiples of 8."""
        _check_tiles(tile_latent, overlap)
        f = self.config.downscale
        if img.shape[2] % f or img.shape[3] % f:
            raise InputError(f"encode_tiled needs H and W multiples of {f}, got {tuple(img.shape[2:])}")
        return run_tiled(self.encode, img, tile_latent * f, overlap * f, self.config.latent_channels, 1, f,
                          self.dtype)


def _check_tiles(tile_latent: int, overlap: int) -> None:
    if tile_latent < 1 or overlap < 0 or overlap >= tile_latent:
        raise InputError(f"tile_latent must be >= 1 and 0 <= overlap < tile_latent, got {tile_latent}, {overlap}")
