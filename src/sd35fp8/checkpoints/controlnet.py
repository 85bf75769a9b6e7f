"""SD3 / SD3.5 ControlNet files -> models/controlnet.py's naming, as a streaming plan; the loader.

Layouts (ComfyUI comfy/controlnet.py load_controlnet_state_dict tells them apart the same way):
- Stability SD3.5 Large (`sd3.5_large_controlnet_{blur,canny,depth}.safetensors`): original block
  names (`transformer_blocks.{i}.adaLN_modulation.1`, `.attn.qkv`, `.mlp.fc1`), diffusers names for
  the embedders (`time_text_embed.*`, Stability sd3_infer.CONTROLNET_MAP), a `control_type` scalar
  (0 blur, 1 canny, 2 depth) and possibly `pos_embed.proj` (unused: the base model embeds x).
- diffusers `SD3ControlNetModel`: joint blocks (InstantX SD3 ControlNets) or single blocks (SD3.5
  converted by diffusers' script), split q/k/v, `norm1.linear`, `ff.net.*`.

    load_controlnet(path, device="cpu", dtype=torch.bfloat16, fp8=None) -> ControlNet
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from sd35fp8.checkpoints.diffusers_mmdit import apply_op, mmdit_plan_from_diffusers
from sd35fp8.checkpoints.load import _infer, load_into
from sd35fp8.checkpoints.safetensors_file import SafetensorsFile
from sd35fp8.checkpoints.sources import FileSource, PlannedSource, TensorSource
from sd35fp8.errors import CheckpointError

log = logging.getLogger(__name__)

Plan = dict[str, tuple[tuple[str, ...], str]]

# diffusers embedder names -> ours (Stability sd3_infer.CONTROLNET_MAP, ComfyUI MMDIT_MAP_BASIC)
_EMBEDDERS = {
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}
# diffusers SD3SingleTransformerBlock -> Stability's DismantledBlock names
_SINGLE_COPY = {"norm1.linear": "adaLN_modulation.1", "attn.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
                "ff.net.2": "mlp.fc2"}
_SINGLE_QKV = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2}
_BLOCK_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_OWN_RE = re.compile(r"(controlnet_blocks\.\d+|pos_embed_input\.proj)\.(weight|bias)$")

# keys of the Stability files that are read but not loaded -> why
_BASE_EMBEDS = "the SD3.5 Large ControlNet embeds x with the base model's x_embedder (Stability 8B form)"
IGNORED = {
    "pos_embed.proj.weight": _BASE_EMBEDS,
    "pos_embed.proj.bias": _BASE_EMBEDS,
    "x_embedder.proj.weight": _BASE_EMBEDS,
    "x_embedder.proj.bias": _BASE_EMBEDS,
    "control_type": "read as the config's control_type",
}


def layout_of(keys: set[str], where: str) -> str:
    """"stability" | "diffusers_joint" | "diffusers_single"; CheckpointError for anything else."""
    if "controlnet_blocks.0.weight" not in keys or "pos_embed_input.proj.weight" not in keys:
        raise CheckpointError(f"{where} is not an SD3 ControlNet (no controlnet_blocks.0.weight / "
                              "pos_embed_input.proj.weight)", where)
    if "transformer_blocks.0.adaLN_modulation.1.weight" in keys:
        return "stability"
    if "transformer_blocks.0.attn.add_q_proj.weight" in keys:
        return "diffusers_joint"
    if "transformer_blocks.0.norm1.linear.weight" in keys:
        return "diffusers_single"
    raise CheckpointError(f"{where}: ControlNet blocks in an unknown layout (neither Stability's "
                          "transformer_blocks.*.adaLN_modulation nor diffusers' norm1.linear)", where)


def controlnet_plan(keys: list[str], where: str) -> tuple[str, Plan]:
    """(layout, {our key: ((file keys...), op)}) for every loaded key of a ControlNet file."""
    present = set(keys)
    layout = layout_of(present, where)
    plan: Plan = {}
    rest: list[str] = []
    for key in keys:
        if _OWN_RE.match(key):
            plan[key] = ((key,), "copy")
            continue
        stem, _, param = key.rpartition(".")
        if stem in _EMBEDDERS:
            plan[f"{_EMBEDDERS[stem]}.{param}"] = ((key,), "copy")
        elif layout == "stability":
            if key not in IGNORED:
                plan[key] = ((key,), "copy")  # original names already
        else:
            rest.append(key)
    if layout == "diffusers_joint":
        sub = mmdit_plan_from_diffusers(rest, where, last_block_pre_only=False)
        plan.update(sub)
        return layout, plan
    if layout == "diffusers_single":
        qkv: dict[str, list[str | None]] = {}
        unknown = []
        for key in rest:
            m = _BLOCK_RE.match(key)
            if m is None:
                unknown.append(key)
                continue
            i, module, param = m.groups()
            if module in _SINGLE_COPY:
                plan[f"transformer_blocks.{i}.{_SINGLE_COPY[module]}.{param}"] = ((key,), "copy")
            elif module in _SINGLE_QKV:
                qkv.setdefault(f"transformer_blocks.{i}.attn.qkv.{param}", [None] * 3)[_SINGLE_QKV[module]] = key
            else:
                unknown.append(key)
        if unknown:
            raise CheckpointError(f"{len(unknown)} unexpected keys in ControlNet {where}: {', '.join(unknown[:8])}",
                                  where, unknown)
        for ours, parts in qkv.items():
            if None in parts:
                raise CheckpointError(f"{where}: {ours} needs to_q, to_k and to_v; found {parts}", where, [ours])
            plan[ours] = (tuple(parts), "cat0")
    return layout, plan


def open_controlnet(path: str | Path) -> tuple[TensorSource, int | None, str]:
    """(source in our naming, control_type or None, layout) of a ControlNet file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ControlNet file not found: {path}", str(path))
    file = SafetensorsFile(path)
    base = FileSource(file, "controlnet", {k: k for k in file.keys()}, "controlnet file")
    layout, plan = controlnet_plan(base.keys(), str(path))
    control_type = None
    if "control_type" in base:
        control_type = int(round(float(base.get("control_type").float().reshape(-1)[0])))
    planned = PlannedSource(base, plan, apply_op, "controlnet", layout, f"{layout} ControlNet")
    for key in set(base.keys()) - {k for srcs, _ in plan.values() for k in srcs}:
        log.info("%s: not loading %s (%s)", path.name, key, IGNORED.get(key, "unused"))
    return planned, control_type, layout


def load_controlnet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                    fp8: str | None = None) -> torch.nn.Module:
    """A ControlNet (models/controlnet.py) from a .safetensors file, config inferred from its shapes.

    fp8: None / "none" keeps `dtype`; "weight_only" | "dynamic" | "static" converts the block linears to
    FP8Linear (fp8.quantize_model; embedders and pos_embed_input stay in `dtype`), as the base model.
    """
    from sd35fp8.models.controlnet import ControlNet, ControlNetConfig

    source, control_type, layout = open_controlnet(path)
    config = _infer(source, lambda shapes: ControlNetConfig.from_state_dict(shapes, source.name, control_type))
    with torch.device("meta"):
        model = ControlNet(config)
    model = load_into(model, source, device, dtype).eval()
    model.layout = layout
    if fp8 not in (None, "none"):
        quantize_controlnet(model, fp8)
    return model


def quantize_controlnet(model: torch.nn.Module, mode: str):
    """FP8 (E4M3) for the ControlNet's block and output linears, in place; returns the QuantReport."""
    from sd35fp8.fp8.quantize import DEFAULT_KEEP, Policy, quantize_model

    report = quantize_model(model, mode, Policy(keep=DEFAULT_KEEP))
    log.info("ControlNet: %s", report.describe())
    model.fp8_report = report
    return report
