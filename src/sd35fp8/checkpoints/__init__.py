"""Checkpoint files and layouts: validated safetensors, layout detection, streaming loaders, file info.

    resolve(path_or_repo, clip_l=None, clip_g=None, t5xxl=None, vae=None) -> Components
    load_mmdit(path, device="cpu", dtype=torch.bfloat16, fp8=None) -> MMDiT
    load_vae(path, device="cpu", dtype=torch.bfloat16) -> SD3VAE
    load_text_encoders(components_or_path, device, dtype, clip_l=None, clip_g=None, t5xxl=None) -> TextEncoderModels
    load_controlnet(path, device="cpu", dtype=torch.bfloat16, fp8=None) -> ControlNet
    describe_file(path) -> dict; format_info(dict) -> str
"""

from __future__ import annotations

_LAZY = {
    "SafetensorsFile": "sd35fp8.checkpoints.safetensors_file",
    "TensorSource": "sd35fp8.checkpoints.sources",
    "Components": "sd35fp8.checkpoints.sources",
    "resolve": "sd35fp8.checkpoints.sources",
    "load_into": "sd35fp8.checkpoints.load",
    "load_mmdit": "sd35fp8.checkpoints.load",
    "load_vae": "sd35fp8.checkpoints.load",
    "load_text_encoders": "sd35fp8.checkpoints.load",
    "TextEncoderModels": "sd35fp8.checkpoints.load",
    "load_controlnet": "sd35fp8.checkpoints.controlnet",
    "describe_file": "sd35fp8.checkpoints.info",
    "format_info": "sd35fp8.checkpoints.info",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sd35fp8.checkpoints' has no attribute {name!r}")
