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


def device_slug(device: torch.device | str | None = None) -> str:
    """"nvidia-h100-80gb-hbm3", "nvidia-h200", "cpu": the device's name in lower case, runs of other characters
    as one '-'. None: the current CUDA device."""
    device = torch.device("cuda") if device is None else torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
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
    path = Path(out)
    if path.suffix != ".json":
        path = path / f"{stem}_{device_slug(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name(torch.device(device or "cuda")) if device_slug(device) != "cpu" else "cpu"
    path.write_text(json.dumps({"device": dev, "date": now(), "versions": versions(), **payload}, indent=1))
    print("wrote", path)
    return path
