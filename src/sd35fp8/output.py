"""What a generation returns, and how it is written to PNG (parameters as tEXt metadata)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

from .errors import InputError


def parameters_line(params: dict) -> str:
    """A1111-style text: prompt, `Negative prompt: ...`, then `key: value, ...`."""
    return f"{params.get('prompt', '')}\nNegative prompt: {params.get('negative_prompt', '')}\n" + ", ".join(
        f"{k}: {v}" for k, v in params.items() if k not in ("prompt", "negative_prompt")
    )


def png_info(params: dict, extra: dict[str, str] | None = None) -> PngImagePlugin.PngInfo:
    """tEXt chunks: `parameters` (A1111-style one-liner, read by most viewers) and
    `sd35fp8` (the same as JSON), plus any extra chunks (ComfyUI's `prompt`/`workflow`)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters_line(params))
    info.add_text("sd35fp8", json.dumps(params))
    for key, value in (extra or {}).items():
        info.add_text(key, value)
    return info


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIF_DESCRIPTION, EXIF_SOFTWARE, EXIF_IFD, EXIF_USER_COMMENT = 0x010E, 0x0131, 0x8769, 0x9286


def image_format(path: str | Path) -> str:
    """The Pillow format for an output file name (.png, .jpg/.jpeg, .webp) or InputError."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise InputError(f"cannot save images as {Path(path).suffix or 'files without a suffix'!r}: use "
                         f"{', '.join(IMAGE_FORMATS)}")
    return fmt


def exif_info(params: dict) -> Image.Exif:
    """JPEG / WebP metadata: EXIF ImageDescription = the `parameters` line, UserComment = the JSON."""
    exif = Image.Exif()
    exif[EXIF_DESCRIPTION] = parameters_line(params)
    exif[EXIF_SOFTWARE] = "sd35fp8"
    exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = b"ASCII\0\0\0" + json.dumps(params).encode("ascii")
    return exif


def save_image(image: Image.Image, target: Path, params: dict) -> None:
    """One image with its parameters as metadata (PNG text chunks, JPEG / WebP EXIF), written whole
    to a temporary name and renamed into place."""
    fmt = image_format(target)
    tmp = target.with_name(f".{target.name}.partial")
    extra = {"pnginfo": png_info(params)} if fmt == "PNG" else {"exif": exif_info(params), "quality": 95}
    try:  # written whole or not at all: an interrupted save never leaves a broken file
        image.convert("RGB").save(tmp, format=fmt, **extra)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    latents: torch.Tensor  # [B, 16, H/8, W/8] raw VAE-space latents
    params: list[dict] = field(default_factory=list)  # one dict per image

    def save(self, path: str | Path) -> list[Path]:
        """Save every image (PNG with the parameters as text chunks, JPEG / WebP with them in EXIF; the
        suffix picks the format), each
        written to a temporary name, then renamed into place. With several images `out.png` becomes
        `out_0.png`, `out_1.png`... A path without a suffix gets `.png`."""
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".png")
        paths = [path] if len(self.images) == 1 else [
            path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(len(self.images))
        ]
        image_format(path)
        for image, params, target in zip(self.images, self.params, paths):
            save_image(image, target, params)
        return paths
