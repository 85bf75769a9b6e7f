"""What a generation returns, and how it is written to PNG (parameters as tEXt metadata)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .errors import InputError


def png_info(params: dict, extra: dict[str, str] | None = None) -> PngImagePlugin.PngInfo:
    """tEXt chunks: `parameters` (A1111-style one-liner, read by most viewers) and
    `sd35fp8` (the same as JSON), plus any extra chunks (ComfyUI's `prompt`/`workflow`)."""
    info = PngImagePlugin.PngInfo()
    line = f"{params.get('prompt', '')}\nNegative prompt: {params.get('negative_prompt', '')}\n" + ", ".join(
        f"{k}: {v}" for k, v in params.items() if k not in ("prompt", "negative_prompt")
    )
    info.add_text("parameters", line)
    info.add_text("sd35fp8", json.dumps(params))
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    return info


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    latents: torch.Tensor  # [B, 16, H/8, W/8] raw VAE-space latents
    params: list[dict] = field(default_factory=list)  # one dict per image

    def save(self, path: str | Path) -> list[Path]:
        """Save every image (PNG with the parameters as text chunks; the suffix picks the format), each
        written to a temporary name, then renamed into place. With several images `out.png` becomes
        `out_0.png`, `out_1.png`... A path without a suffix gets `.png`."""
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".png")
        paths = [path] if len(self.images) == 1 else [
            path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(len(self.images))
        ]
        fmt = Image.registered_extensions().get(path.suffix.lower())
        if fmt is None:
            raise InputError(f"cannot save images as {path.suffix!r} files: use .png")
        for image, params, target in zip(self.images, self.params, paths):
            tmp = target.with_name(f".{target.name}.partial")
            try:  # written whole or not at all: an interrupted save never leaves a broken file
                image.save(tmp, format=fmt, pnginfo=png_info(params))
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)
        return paths
