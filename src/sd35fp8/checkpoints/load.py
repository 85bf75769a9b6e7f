"""Load the SD3.5 models from files: MMDiT, VAE and the text encoders, configs inferred from shapes.

Reading is checkpoints/sources.py, streaming into a meta-built model checkpoints/stream.py, FP8
layers (fp8 files, or 16-bit files quantised as they stream) checkpoints/fp8_load.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sd35fp8.checkpoints.fp8_load import fp8_format, load_mmdit_fp8, load_t5_fp8
from sd35fp8.checkpoints.sources import Components, PlannedSource, TensorSource, open_component, open_components
from sd35fp8.checkpoints.stream import IGNORED_KEYS, PathLike, load_into, model_shapes, source_of, where
from sd35fp8.errors import CheckpointError
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig
from sd35fp8.models.vae import SD3VAE, VAEConfig
from sd35fp8.text.encoders import (build_clip, build_t5, clip_config_from_state_dict, describe_text_config,
                                   init_meta_buffers, plan_text_encoder_keys, t5_config_from_state_dict)

log = logging.getLogger(__name__)

__all__ = ["IGNORED_KEYS", "TextEncoderModels", "load_into", "load_mmdit", "load_text_encoders", "load_vae",
           "model_shapes", "module_keys"]


def _infer(source: TensorSource, infer) -> object:
    try:
        config = infer(model_shapes(source))
    except CheckpointError as e:
        if source.name in str(e):
            raise
        raise CheckpointError(f"{source.name}: {e}", where(source), e.keys) from e
    log.info("%s: %s", source.name, config.describe() if hasattr(config, "describe") else config)
    return config


def load_mmdit(path: PathLike | Components | TensorSource, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.bfloat16, fp8: str | None = None) -> nn.Module:
    """MMDiT from a file, folder, cached repo id, Components or TensorSource; config inferred from shapes.

    fp8: None keeps the file's precision (an fp8 file loads straight into FP8 layers on the device,
    no round trip through 16-bit memory); "none" dequantises to `dtype`; "weight_only" | "dynamic" |
    "static" load or quantise into that FP8 mode (checkpoints/fp8_load.py). The mode used is logged and
    kept as `model.fp8_report`.
    """
    source = source_of(path, "mmdit")
    if fp8 is not None:
        return load_mmdit_fp8(source, device, dtype, fp8)
    if fp8_format(source) != "none":
        return load_mmdit_fp8(source, device, dtype, None)
    config = _infer(source, lambda shapes: MMDiTConfig.from_state_dict(shapes, source.name))
    with torch.device("meta"):
        model = MMDiT(config)
    return load_into(model, source, device, dtype).eval()


def load_vae(path: PathLike | Components | TensorSource, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """SD3 VAE (LDM key layout) from a file, folder, cached repo id, Components or TensorSource."""
    source = source_of(path, "vae")
    config = _infer(source, VAEConfig.from_state_dict)
    with torch.device("meta"):
        model = SD3VAE(config)
    return load_into(model, source, device, dtype).eval()


@dataclass
class TextEncoderModels:
    """Loaded transformers text encoders (t5xxl None when the checkpoint has none) + tokenizer folders."""

    clip_l: nn.Module
    clip_g: nn.Module
    t5xxl: nn.Module | None
    tokenizers: dict[str, Path] = field(default_factory=dict)


def _text_source(source: TensorSource, kind: str, model: nn.Module) -> tuple[TensorSource, dict[str, str]]:
    """Apply the text encoders' key plan: legacy transposed `text_projection`, and the keys SD3 leaves unused."""
    plan = plan_text_encoder_keys(kind, source.keys(), list(module_keys(model)))
    ignore = {k: IGNORED_KEYS.get(k, "unused by SD3 text conditioning (text.encoders.plan_text_encoder_keys)")
              for k in plan.ignored}
    if not plan.transpose:
        return source, ignore
    renamed = {plan.source[k]: k for k in plan.transpose}
    key_plan = {renamed.get(k, k): ((k,), "transpose" if k in renamed else "copy") for k in source.keys()}
    return PlannedSource(source, key_plan, _text_op, source.component, source.layout,
                         "legacy text_projection transposed"), ignore


def _text_op(op: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    (tensor,) = tensors
    return tensor.t().contiguous() if op == "transpose" else tensor  # [hidden, proj] -> [proj, hidden]


def module_keys(model: nn.Module) -> list[str]:
    return list(model.state_dict(keep_vars=True))


def load_text_encoders(components_or_path: PathLike | Components, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.bfloat16, clip_l: PathLike | None = None,
                       clip_g: PathLike | None = None, t5xxl: PathLike | None = None) -> TextEncoderModels:
    """CLIP-L, CLIP-G (required) and T5-XXL (optional) from a file, folder, repo id or Components.

    Explicit clip_l / clip_g / t5xxl paths win over what the checkpoint holds. CLIP modules get a
    `text_projection` exactly when the file has one. Returns transformers-based modules on `device`.
    """
    comps = components_or_path if isinstance(components_or_path, Components) else open_components(components_or_path)
    sources = {slot: open_component(p, slot) if p is not None else comps.get(slot)
               for slot, p in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5xxl))}
    models: dict[str, nn.Module | None] = {}
    for slot, source in sources.items():
        if source is None:
            if slot != "t5xxl":
                comps.require(slot)  # raises, naming what the checkpoint holds
            log.info("no T5-XXL in %s: prompts are encoded with CLIP only", comps.root)
            models[slot] = None
            continue
        if slot == "t5xxl":
            if fp8_format(source) != "none":  # t5xxl_fp8_e4m3fn(_scaled): straight into FP8 layers
                models[slot] = load_t5_fp8(source, device, dtype, None)
                continue
        shapes = model_shapes(source)
        try:
            if slot == "t5xxl":
                config = t5_config_from_state_dict(shapes)
                model = build_t5(config)
            else:
                config = clip_config_from_state_dict(shapes, slot)
                with_projection = "text_projection.weight" in shapes or "text_projection" in shapes
                model = build_clip(config, with_projection=with_projection)
        except CheckpointError as e:
            raise CheckpointError(f"{source.name}: {e}", where(source), e.keys) from e
        log.info("%s: %s", source.name, describe_text_config(config))
        planned, ignore = _text_source(source, slot, model)
        models[slot] = load_into(model, planned, device, dtype, ignore, init_buffers=init_meta_buffers).eval()
        if slot == "clip_g" and models[slot].text_projection is None:  # ComfyUI clip_model.py: eye(embed_dim)
            width = models[slot].width
            proj = torch.nn.Linear(width, width, bias=False, device=device, dtype=dtype).requires_grad_(False)
            with torch.no_grad():
                proj.weight.copy_(torch.eye(width, device=device, dtype=dtype))
            models[slot].text_projection = proj
            log.warning("%s has no text_projection.weight: CLIP-G uses an identity projection, as ComfyUI",
                        source.name)
    return TextEncoderModels(models["clip_l"], models["clip_g"], models["t5xxl"], dict(comps.tokenizers))
