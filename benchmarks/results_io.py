"""What every benchmark writes with its numbers: the device's name as a file-name slug, the library versions,
the date, and the JSON file under benchmarks/results/ (or where --out says)."""

from __future__ import annotations

import datetime
import json
import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device | str | None = None) -> str:
    """The device's name ("NVIDIA H100 80GB HBM3", "cpu"). None: the current CUDA device."""
    device = torch.device("cuda") if device is None else torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(device: torch.device | str | None = None) -> str:
    """"nvidia-h100-80gb-hbm3", "nvidia-h200", "cpu": the device's name in lower case, runs of other characters
    as one '-'. None: the current CUDA device."""
    return _slug(device_name(device))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def write_json(out: str | Path, stem: str, payload: dict, device: torch.device | str | None = None) -> Path:
    """payload (with device, date and versions added in front) -> out if it names a .json file, else
    out / f"{stem}_{device_slug}.json"; returns the path."""
    name = device_name(device)
    path = Path(out)
    if path.suffix != ".json":
        path = path / f"{stem}_{_slug(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": name, "date": now(), "versions": versions(), **payload}, indent=1))
    print("wrote", path)
    return path
