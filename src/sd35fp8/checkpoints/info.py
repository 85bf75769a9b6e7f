"""Describe a checkpoint without loading it: kinds, precisions, fp8 scaling, key counts, sizes, configs.

Everything comes from safetensors headers (no tensor is read). `sd35fp8 info` prints `format_info`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from sd35fp8.checkpoints.sources import (COMFY_INPUT_SCALE, COMFY_WEIGHT_SCALE, FP8_DTYPES, FP8_MARKER,
                                         NATIVE_INPUT_SCALE, NATIVE_WEIGHT_SCALE, Components, TensorSource, clip_width,
                                         fp8_format, fp8_layout, open_components, resolve)
from sd35fp8.checkpoints.stream import model_shapes
from sd35fp8.errors import CheckpointError
from sd35fp8.models.mmdit import MMDiTConfig
from sd35fp8.models.vae import VAEConfig

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
               torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}


def _dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _mmdit_kind(source: TensorSource) -> tuple[str, str]:
    config = MMDiTConfig.from_state_dict(model_shapes(source), source.name)
    if config.x_block_self_attn_layers:
        kind = "SD3.5 Medium (MMDiT-X)" if config.depth == 24 else f"MMDiT-X (depth {config.depth})"
    elif config.depth == 38:
        kind = "SD3.5 Large / Large Turbo (MMDiT)"
    else:
        kind = f"MMDiT (depth {config.depth})"
    return kind, config.describe()


def _vae_kind(source: TensorSource) -> tuple[str, str]:
    config = VAEConfig.from_state_dict(model_shapes(source))
    return f"VAE ({config.latent_channels} latent channels)", config.describe()


def _text_kind(source: TensorSource) -> tuple[str, str]:
    if source.component in ("clip_l", "clip_g"):
        width = clip_width(source)
        layers = len({k.split(".")[3] for k in source.keys() if k.startswith("text_model.encoder.layers.")})
        name = {"clip_l": "CLIP-L", "clip_g": "CLIP-G"}[source.component]
        return name, f"{name}: {layers} layers, hidden {width}"
    emb = next((k for k in ("shared.weight", "encoder.embed_tokens.weight") if k in source), None)
    blocks = len({k.split(".")[2] for k in source.keys() if k.startswith("encoder.block.")})
    d_model = source.shape(emb)[1] if emb else 0
    name = "T5-XXL encoder" if d_model == 4096 else f"T5 encoder (d_model {d_model})"
    return name, f"{name}: {blocks} blocks, d_model {d_model}"


def describe_fp8_layout(source: TensorSource) -> dict:
    """Which layers are fp8, their scale granularity, static input scales (reads those scalars), bytes."""
    keys = source.keys()
    present = set(keys)
    fp8 = [k for k in keys if source.dtype(k) in FP8_DTYPES and k != FP8_MARKER]
    gran = {"tensor": 0, "channel": 0, "none (scale 1)": 0}
    static = 0
    for k in fp8:
        base = k[: -len(".weight")] if k.endswith(".weight") else k
        sk = next((f"{base}.{s}" for s in (COMFY_WEIGHT_SCALE, NATIVE_WEIGHT_SCALE) if f"{base}.{s}" in present), None)
        if sk is None:
            gran["none (scale 1)"] += 1
        else:
            gran["tensor" if source.shape(sk) in ((), (1,)) else "channel"] += 1
        ik = next((f"{base}.{s}" for s in (COMFY_INPUT_SCALE, NATIVE_INPUT_SCALE) if f"{base}.{s}" in present), None)
        # a scalar read per layer; 1.0 is ComfyUI's placeholder, not a calibrated scale (convert_old_quants)
        static += ik is not None and float(source.get(ik, "cpu").float().reshape(-1)[0]) != 1.0
    total = sum(source.nbytes(k) for k in keys)
    fp8_bytes = sum(source.nbytes(k) for k in fp8)
    return {
        "format": fp8_format(source),
        "marker_dtype": str(source.dtype(FP8_MARKER)).replace("torch.", "") if FP8_MARKER in present else None,
        "fp8_tensors": len(fp8),
        "fp8_layers": [k[: -len(".weight")] for k in fp8 if k.endswith(".weight")],
        "scale_granularity": {g: n for g, n in gran.items() if n},
        "static_input_scales": static,
        "bytes_total": total,
        "bytes_fp8": fp8_bytes,
    }


def describe_source(source: TensorSource) -> dict[str, Any]:
    keys = source.keys()
    fp8 = fp8_layout(source)
    dtypes = Counter(_dtype_name(source.dtype(k)) for k in keys if k not in fp8.aux_keys)
    describe = {"mmdit": _mmdit_kind, "vae": _vae_kind}.get(source.component, _text_kind)
    kind, config = describe(source)
    return {
        "kind": kind,
        "source": source.name,
        "layout": source.layout,
        "keys": len(keys),
        "bytes": sum(source.nbytes(k) for k in keys),
        "dtypes": dict(dtypes.most_common()),
        "fp8": {"scaling": fp8.scaling, "fp8_tensors": len(fp8.fp8_keys), "scale_weight": len(fp8.scale_weight),
                "scale_input": len(fp8.scale_input),
                "marker": _dtype_name(fp8.marker_dtype) if fp8.marker_dtype is not None else None},
        "config": config,
    }


def describe_file(path: str | Path | Components, clip_l: str | Path | None = None, clip_g: str | Path | None = None,
                  t5xxl: str | Path | None = None) -> dict[str, Any]:
    """Header-only description of a file, folder or cached repo id (and optional extra text encoder files)."""
    if isinstance(path, Components):
        comps = path
    elif clip_l is None and clip_g is None and t5xxl is None:
        comps = open_components(path)
    else:
        comps = resolve(path, clip_l=clip_l, clip_g=clip_g, t5xxl=t5xxl)
    files: dict[str, int] = {}
    components: dict[str, Any] = {}
    for comp in comps.present():
        source = comps.require(comp)
        try:
            components[comp] = describe_source(source)
            if fp8_format(source) != "none":
                components[comp]["fp8_layout"] = describe_fp8_layout(source)
        except CheckpointError as e:  # a recognised but inconsistent component: report it, keep the rest
            components[comp] = {"kind": "unreadable", "source": source.name, "error": str(e)}
        for f in source.files:
            files[str(f)] = f.stat().st_size
    layouts = sorted({c.get("layout", "?") for c in components.values()})
    return {
        "path": comps.root,
        "layout": ", ".join(layouts),
        "kinds": [c["kind"] for c in components.values()],
        "files": files,
        "file_size": sum(files.values()),
        "components": components,
        "tokenizers": {k: str(v) for k, v in comps.tokenizers.items()},
        "notes": list(comps.notes),
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def format_info(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}", f"  layout: {info['layout']}",
             f"  files: {len(info['files'])}, {_size(info['file_size'])}"]
    for comp, c in info["components"].items():
        if "error" in c:
            lines += [f"  {comp}: {c['source']}", f"    error: {c['error']}"]
            continue
        dtypes = ", ".join(f"{n} {d}" for d, n in c["dtypes"].items())
        fp8 = c["fp8"]
        if fp8["scaling"] == "scaled":
            scaling = (f"scaled ({fp8['scale_weight']} scale_weight, {fp8['scale_input']} scale_input"
                       f"{', marker ' + fp8['marker'] if fp8['marker'] else ''})")
        else:
            scaling = fp8["scaling"]
        lines += [f"  {comp}: {c['kind']}", f"    from: {c['source']}",
                  f"    {c['keys']} keys, {_size(c['bytes'])}; precision: {dtypes}; fp8 scaling: {scaling}",
                  f"    {c['config']}"]
        layout = c.get("fp8_layout")
        if layout:
            gran = ", ".join(f"{n} {g}" for g, n in layout["scale_granularity"].items())
            lines.append(f"    fp8 layout: {layout['format']}, {len(layout['fp8_layers'])} fp8 layers "
                         f"(weight scales: {gran}; static input scales: {layout['static_input_scales']}), "
                         f"{_size(layout['bytes_fp8'])} fp8 of {_size(layout['bytes_total'])}")
    for comp, folder in info["tokenizers"].items():
        lines.append(f"  tokenizer {comp}: {folder}")
    lines += [f"  note: {n}" for n in info["notes"]]
    return "\n".join(lines)
