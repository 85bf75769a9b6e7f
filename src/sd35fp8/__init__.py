"""sd35fp8: Stable Diffusion 3.5 with FP8 (E4M3) weights and math.

Public API (imported lazily so `import sd35fp8` stays cheap):
    load_mmdit(path, device="cpu", dtype=torch.bfloat16, fp8=None)
    load_vae(path, device="cpu", dtype=torch.bfloat16)
    SD35Pipeline.from_pretrained(...)
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_mmdit": "sd35fp8.checkpoints.load",
    "load_vae": "sd35fp8.checkpoints.load",
    "load_text_encoders": "sd35fp8.checkpoints.load",
    "SD35Pipeline": "sd35fp8.pipeline",
    "StableDiffusion3Pipeline": "sd35fp8.pipeline",  # diffusers' names for SD35Pipeline
    "StableDiffusion3Img2ImgPipeline": "sd35fp8.pipeline",
    "StableDiffusion3InpaintPipeline": "sd35fp8.pipeline",
    "MMDiT": "sd35fp8.models.mmdit",
    "MMDiTConfig": "sd35fp8.models.mmdit",
    "SD3VAE": "sd35fp8.models.vae",
    "VAEConfig": "sd35fp8.models.vae",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sd35fp8' has no attribute {name!r}")
