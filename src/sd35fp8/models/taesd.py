"""TAESD's decoder (madebyollin's Tiny AutoEncoder), for live previews: models/vae_approx/taesd3_decoder.*.

The layout is the released files' own (an nn.Sequential; ComfyUI comfy/taesd/taesd.py builds the same), so their
state dicts load unchanged: "1.weight" is the first conv (its input channels are the latent channels: 16 for SD3),
Blocks "3.conv.0.weight" ..., upsampling convs without bias, "19.weight" the RGB conv. Input: a latent in model
space (SD3: (z - 0.0609) * 1.5305, what the sampler denoises), output [B, 3, 8h, 8w] in about [0, 1].

    dec = TAESDDecoder.from_state_dict(state_dict)   # checkpoints/taesd.py reads the file
    rgb = dec(x0)  # [B, 3, 8h, 8w]
"""

from __future__ import annotations

import torch
from torch import nn

from sd35fp8.errors import CheckpointError

WIDTH = 64  # TAESD's channels


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.skip = nn.Identity()  # n_in == n_out everywhere in the decoder
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TAESDDecoder(nn.Sequential):
    """latent [B, C, h, w] (model space) -> RGB [B, 3, 8h, 8w] in about [0, 1]."""

    def __init__(self, latent_channels: int = 16):
        def stage() -> list[nn.Module]:  # three blocks, then x2 upsampling and a bias-free conv
            return [*(_Block(WIDTH) for _ in range(3)), nn.Upsample(scale_factor=2), _conv(WIDTH, WIDTH, bias=False)]

        super().__init__(_Clamp(), _conv(latent_channels, WIDTH), nn.ReLU(), *stage(), *stage(), *stage(),
                         _Block(WIDTH), _conv(WIDTH, 3))
        self.latent_channels = latent_channels

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], where: str = "TAESD decoder") -> TAESDDecoder:
        """The decoder whose latent channels are the first conv's inputs ("1.weight" [64, C, 3, 3])."""
        first = sd.get("1.weight")
        if first is None or first.ndim != 4:
            raise CheckpointError(f"{where}: no TAESD decoder (key 1.weight [64, C, 3, 3] missing)", where, ["1.weight"])
        dec = cls(int(first.shape[1]))
        want = dec.state_dict()
        missing = sorted(set(want) - set(sd))
        extra = sorted(set(sd) - set(want))
        if missing or extra:
            raise CheckpointError(f"{where}: not a TAESD decoder: missing keys {missing[:5]}, unexpected {extra[:5]}",
                                  where, missing[:5] + extra[:5])
        bad = [k for k in want if tuple(sd[k].shape) != tuple(want[k].shape)]
        if bad:
            raise CheckpointError(f"{where}: key {bad[0]} has shape {tuple(sd[bad[0]].shape)}, a TAESD decoder's is "
                                  f"{tuple(want[bad[0]].shape)}", where, bad[:5])
        dec.load_state_dict({k: v.float() for k, v in sd.items()})
        return dec.eval().requires_grad_(False)
