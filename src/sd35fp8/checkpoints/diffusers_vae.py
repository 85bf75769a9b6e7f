"""diffusers AutoencoderKL key names -> original LDM VAE key names (the layout of models/vae.py).

The plan maps each original key to the diffusers source keys and an op:
  "copy"                    the tensor as is
  "reshape_linear_to_conv"  diffusers stores the mid attention q/k/v/out as Linear [C, C];
                            LDM uses 1x1 convs [C, C, 1, 1]
diffusers numbers decoder up blocks from the lowest resolution (up_blocks.0 = LDM up.{n-1});
this inverts what diffusers' convert_ldm_vae_checkpoint does. Unknown keys are errors, by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

from sd35fp8.errors import CheckpointError

OPS = ("copy", "reshape_linear_to_conv")

Plan = dict[str, tuple[tuple[str, ...], str]]

_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "conv_shortcut": "nin_shortcut"}
# Current diffusers names and the older (pre-0.14) ones.
_ATTN_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
               "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}

_RE_DOWN_RES = re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)")
_RE_DOWN_SAMPLE = re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)")
_RE_UP_RES = re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)")
_RE_UP_SAMPLE = re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)")
_RE_MID_RES = re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)")
_RE_MID_ATTN = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)")
_RE_TOP = re.compile(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)")


def _original_key(key: str, num_up: int) -> tuple[str, str] | None:
    """One diffusers key -> (original key, op), or None when the key is not part of the LDM layout."""
    if m := _RE_TOP.fullmatch(key):
        return f"{m[1]}.{_TOP[m[2]]}.{m[3]}", "copy"
    if (m := _RE_DOWN_RES.fullmatch(key)) and m[3] in _RESNET_PARTS:
        return f"encoder.down.{m[1]}.block.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}", "copy"
    if m := _RE_DOWN_SAMPLE.fullmatch(key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}", "copy"
    if (m := _RE_UP_RES.fullmatch(key)) and m[3] in _RESNET_PARTS:
        return f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.{_RESNET_PARTS[m[3]]}.{m[4]}", "copy"
    if m := _RE_UP_SAMPLE.fullmatch(key):
        return f"decoder.up.{num_up - 1 - int(m[1])}.upsample.conv.{m[2]}", "copy"
    if (m := _RE_MID_RES.fullmatch(key)) and m[3] in _RESNET_PARTS and m[2] in ("0", "1"):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET_PARTS[m[3]]}.{m[4]}", "copy"
    if (m := _RE_MID_ATTN.fullmatch(key)) and m[2] in _ATTN_PARTS:
        part = _ATTN_PARTS[m[2]]
        op = "reshape_linear_to_conv" if part != "norm" and m[3] == "weight" else "copy"
        return f"{m[1]}.mid.attn_1.{part}.{m[3]}", op
    return None


def vae_plan_from_diffusers(diffusers_keys: Iterable[str], source: str | None = None) -> Plan:
    """Plan original_key -> ((diffusers_key,), op) for a diffusers AutoencoderKL state dict.

    `source` names the file or folder for errors. Raises CheckpointError listing every key that has no
    place in the SD3 VAE (e.g. quant_conv, which SD3 does not have).
    """
    keys = list(diffusers_keys)
    up_ids = {int(m[1]) for k in keys if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    num_up = max(up_ids) + 1 if up_ids else 0
    plan: Plan = {}
    unknown: list[str] = []
    for key in keys:
        mapped = _original_key(key, num_up)
        if mapped is None:
            unknown.append(key)
            continue
        orig, op = mapped
        if orig in plan:
            raise CheckpointError(f"diffusers VAE keys {plan[orig][0][0]} and {key} both map to {orig}",
                                  path=source, keys=[plan[orig][0][0], key])
        plan[orig] = ((key,), op)
    if unknown:
        shown = ", ".join(sorted(unknown)[:20])
        more = f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""
        raise CheckpointError(f"unknown diffusers VAE keys: {shown}{more}", path=source, keys=sorted(unknown))
    return plan


def apply_op(op: str, tensors: Sequence[torch.Tensor], key: str = "?") -> torch.Tensor:
    """Build one original tensor from its source tensors. `key` names the target in errors."""
    if op not in OPS:
        raise CheckpointError(f"unknown conversion op {op!r} for {key}", keys=[key])
    if len(tensors) != 1:
        raise CheckpointError(f"op {op} for {key} takes 1 tensor, got {len(tensors)}", keys=[key])
    (t,) = tensors
    if op == "copy":
        return t
    if t.ndim == 4 and t.shape[2:] == (1, 1):  # already a 1x1 conv (older diffusers exports)
        return t
    if t.ndim != 2:
        raise CheckpointError(f"{key}: expected a Linear weight [C, C], got shape {tuple(t.shape)}", keys=[key])
    return t[:, :, None, None]  # [C, C] -> [C, C, 1, 1]
