"""ESRGAN / Real-ESRGAN (RRDBNet): the image upscalers most ComfyUI workflows load with UpscaleModelLoader
(4x-UltraSharp, RealESRGAN_x4plus / x2plus, Remacri, NMKD, AnimeSharp, ...). Real-ESRGAN's key names
(conv_first, body.N.rdbK.convJ, conv_body, conv_upK, conv_hr, conv_last); checkpoints/upscale.py maps the older
ESRGAN layout (model.0, model.1.sub.N.RDBK.convJ.0, ...) onto them and infers this config from the weights.

    x [B, in_ch, H, W] in [0, 1] -> [B, out_ch, H * scale, W * scale]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RRDBConfig:
    in_channels: int = 3
    out_channels: int = 3
    features: int = 64  # nf
    blocks: int = 23  # nb: RRDB blocks
    growth: int = 32  # gc: channels each dense conv adds
    upsamples: int = 2  # nearest x2 + conv, this many times
    unshuffle: int = 1  # Real-ESRGAN x2 / x1: pixel_unshuffle by this factor first (in_channels * unshuffle^2)

    @property
    def scale(self) -> int:
        return 2 ** self.upsamples // self.unshuffle

    def describe(self) -> str:
        return (f"RRDBNet x{self.scale} ({self.blocks} blocks, {self.features} features"
                + (f", pixel-unshuffle {self.unshuffle}" if self.unshuffle > 1 else "") + ")")


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


class ResidualDenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = _lrelu(self.conv1(x))
        x2 = _lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = _lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = _lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        return self.conv5(torch.cat((x, x1, x2, x3, x4), 1)) * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    def __init__(self, config: RRDBConfig):
        super().__init__()
        c, nf = config, config.features
        self.config = config
        self.conv_first = nn.Conv2d(c.in_channels * c.unshuffle ** 2, nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(nf, c.growth) for _ in range(c.blocks)])
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        for k in range(1, c.upsamples + 1):
            setattr(self, f"conv_up{k}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, c.out_channels, 3, 1, 1)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.unshuffle > 1:
            h, w = x.shape[-2:]  # pixel_unshuffle needs multiples of the factor: pad by reflection, crop after
            ph, pw = (-h) % c.unshuffle, (-w) % c.unshuffle
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="reflect")
            feat = self.conv_first(F.pixel_unshuffle(x, c.unshuffle))
        else:
            h, w = x.shape[-2:]
            feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for k in range(1, c.upsamples + 1):
            feat = _lrelu(getattr(self, f"conv_up{k}")(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(_lrelu(self.conv_hr(feat)))
        return out[..., :h * c.scale, :w * c.scale]


@dataclass(frozen=True)
class CompactConfig:
    """Real-ESRGAN's SRVGGNetCompact (realesr-general-x4v3, realesr-animevideov3): convs + PReLU at low
    resolution, then pixel_shuffle, plus the nearest-upscaled input."""

    in_channels: int = 3
    out_channels: int = 3
    features: int = 64
    convs: int = 32  # body convs between the first and the last
    scale: int = 4

    def describe(self) -> str:
        return f"SRVGGNetCompact x{self.scale} ({self.convs} convs, {self.features} features)"


class SRVGGNetCompact(nn.Module):
    def __init__(self, config: CompactConfig):
        super().__init__()
        c = config
        self.config = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.features, 3, 1, 1), nn.PReLU(c.features)]
        for _ in range(c.convs):
            layers += [nn.Conv2d(c.features, c.features, 3, 1, 1), nn.PReLU(c.features)]
        layers.append(nn.Conv2d(c.features, c.out_channels * c.scale ** 2, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.config.scale)
        return out + F.interpolate(x, scale_factor=self.config.scale, mode="nearest")
