"""Device names -> checked torch.device (the pipeline, the CLI and diffusers' .to() share them)."""

from __future__ import annotations

import torch

from .errors import InputError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A device name -> torch.device, checked: InputError for a name torch does not know or a CUDA
    device this machine does not have (None: `default_device()`)."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} asked for, but this torch build or machine has no CUDA")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise InputError(f"device {device!r}: sd35fp8 runs on cpu or cuda")
    return dev
