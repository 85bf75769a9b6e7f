"""`sd35fp8 info LORA.safetensors`: is_lora_file(path) / describe_lora(path) / format_lora(info).
(`generate --lora FILE[:STRENGTH] --lora-merge` is cli/lora.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import guess_base, read_lora
from .keys import split_key


def is_lora_file(path: str | Path) -> bool:
    """A safetensors file whose keys are LoRA factors (header only)."""
    from sd35fp8.checkpoints.safetensors_file import SafetensorsFile

    p = Path(path)
    if not p.is_file() or p.suffix != ".safetensors":
        return False
    keys = SafetensorsFile(p).keys()
    return bool(keys) and sum(split_key(k) is not None for k in keys) >= len(keys) / 2


def describe_lora(path: str | Path) -> dict[str, Any]:
    lora = read_lora(path)
    comps = lora.components()
    kinds = sorted({m.rsplit(".", 1)[-1] if c != "mmdit" else ".".join(m.split(".")[2:]) or m
                    for c, m in lora.terms})
    meta = {k: v for k, v in lora.metadata.items() if len(v) < 400}
    return {"file": str(path), "kind": "LoRA", "format": lora.format, "ranks": lora.ranks,
            "targets": comps, "layer_kinds": kinds, "fits": guess_base(lora), "skipped": lora.skipped,
            "dora": lora.dora, "metadata": meta}


def format_lora(info: dict[str, Any]) -> str:
    targets = ", ".join(f"{c} {n} layers" for c, n in info["targets"].items())
    lines = [f"{info['file']}: LoRA, {info['format']}",
             f"  rank: {', '.join(map(str, info['ranks']))}",
             f"  targets: {targets}",
             f"  layers: {', '.join(info['layer_kinds'])}",
             f"  fits: {info['fits']}"]
    if info["skipped"]:
        lines.append(f"  skipped ({len(info['skipped'])} keys match no SD3.5 layer): {', '.join(info['skipped'][:5])}")
    return "\n".join(lines)
