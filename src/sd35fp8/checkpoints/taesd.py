"""TAESD decoder files (models/vae_approx/taesd3_decoder.*, madebyollin's releases) -> models.taesd.TAESDDecoder."""

from __future__ import annotations

from pathlib import Path

import torch

from sd35fp8.errors import CheckpointError
from sd35fp8.models.taesd import TAESDDecoder


def load_taesd_decoder(path: str | Path) -> TAESDDecoder:
    """A released decoder file: .safetensors, or a .pth / .pt state dict (read with weights_only); CheckpointError
    naming the file (and the keys) when it is unreadable or not a TAESD decoder."""
    path = Path(path)
    try:
        if path.suffix in (".safetensors", ".sft"):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: one clear error naming it
        raise CheckpointError(f"cannot read the TAESD decoder {path}: {e}", str(path)) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not a state dict", str(path))
    return TAESDDecoder.from_state_dict(sd, str(path))
