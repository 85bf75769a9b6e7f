"""diffusers `transformer/` (SD3Transformer2DModel naming) -> original MMDiT keys, as a streaming plan.

Loaders read one tensor at a time, so the mapping is a plan: for each original key, the diffusers
keys it is built from and how (`apply_op`). The inverse of diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers`:
- q, k, v are stored split (`to_q/to_k/to_v`, `add_{q,k,v}_proj` for the context stream): cat on dim 0;
- the final layer's and the last (pre-only) context block's adaLN are stored as [scale; shift],
  the original files as [shift; scale]: swap halves.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from sd35fp8.errors import CheckpointError

OPS = ("copy", "cat0", "swap_halves")

Plan = dict[str, tuple[tuple[str, ...], str]]

# whole-model keys: diffusers prefix -> original prefix (suffix .weight/.bias kept)
_GLOBAL = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
}

# per-block copies: diffusers module path -> original module path (inside joint_blocks.{i}.)
_BLOCK_COPY = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",  # swap_halves on the last block
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}

# per-block fused qkv: original module path -> diffusers (q, k, v) module paths
_BLOCK_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}
_QKV_PART = {part: (orig, n) for orig, parts in _BLOCK_QKV.items() for n, part in enumerate(parts)}

_BLOCK_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"(.+)\.(weight|bias)$")


def mmdit_plan_from_diffusers(diffusers_keys: Iterable[str], source: str = "diffusers transformer",
                              last_block_pre_only: bool = True) -> Plan:
    """Map every diffusers key to the original key it builds: {original: ((diffusers keys...), op)}.

    last_block_pre_only: the transformer's last context block is pre-only (its adaLN stored as
    [scale; shift]); False for ControlNets' joint blocks (diffusers SD3ControlNetModel), none pre-only.
    Raises CheckpointError naming any diffusers key that is not part of an SD3 transformer, and any
    q/k/v group with a missing part. Keys of the original model that are absent from the source
    are not reported here: the loader compares the plan's keys with the model's.
    """
    keys = list(diffusers_keys)
    blocks = [int(m.group(1)) for k in keys if (m := _BLOCK_RE.match(k))]
    # the last block's context block is pre-only (diffusers: i == num_layers-1)
    last_block = max(blocks) if blocks and last_block_pre_only else -1

    plan: Plan = {}
    qkv_parts: dict[str, list[str | None]] = {}
    unknown: list[str] = []
    for key in keys:
        if key == "pos_embed.pos_embed":
            plan["pos_embed"] = ((key,), "copy")
            continue
        block = _BLOCK_RE.match(key)
        if block is not None:
            i, module, param = int(block.group(1)), block.group(2), block.group(3)
            prefix = f"joint_blocks.{i}."
            if module in _BLOCK_COPY:
                op = "swap_halves" if module == "norm1_context.linear" and i == last_block else "copy"
                plan[f"{prefix}{_BLOCK_COPY[module]}.{param}"] = ((key,), op)
            elif module in _QKV_PART:
                orig, n = _QKV_PART[module]
                qkv_parts.setdefault(f"{prefix}{orig}.{param}", [None, None, None])[n] = key
            else:
                unknown.append(key)
            continue
        glob = _GLOBAL_RE.match(key)
        if glob is not None and glob.group(1) in _GLOBAL:
            plan[f"{_GLOBAL[glob.group(1)]}.{glob.group(2)}"] = ((key,), "copy")
        elif glob is not None and glob.group(1) == "norm_out.linear":
            plan[f"final_layer.adaLN_modulation.1.{glob.group(2)}"] = ((key,), "swap_halves")
        else:
            unknown.append(key)

    if unknown:
        raise CheckpointError(f"{len(unknown)} unexpected keys in {source}: {', '.join(sorted(unknown)[:10])}"
                              f"{' ...' if len(unknown) > 10 else ''}", source, sorted(unknown))
    incomplete = sorted(orig for orig, parts in qkv_parts.items() if None in parts)
    if incomplete:
        missing = [f"{orig} needs q, k and v; found only {[p for p in qkv_parts[orig] if p]}" for orig in incomplete]
        raise CheckpointError(f"incomplete q/k/v in {source}: {'; '.join(missing[:5])}", source, incomplete)
    for orig, parts in qkv_parts.items():
        plan[orig] = (tuple(p for p in parts if p is not None), "cat0")
    return plan


def apply_op(op: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Build one original tensor from its diffusers sources (see `mmdit_plan_from_diffusers`)."""
    if op == "copy":
        if len(tensors) != 1:
            raise ValueError(f"op copy takes 1 tensor, got {len(tensors)}")
        return tensors[0]
    if op == "cat0":
        return torch.cat(tensors, dim=0)  # [q; k; v]
    if op == "swap_halves":
        if len(tensors) != 1:
            raise ValueError(f"op swap_halves takes 1 tensor, got {len(tensors)}")
        first, second = tensors[0].chunk(2, dim=0)  # diffusers [scale; shift] -> original [shift; scale]
        return torch.cat([second, first], dim=0)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


_MODULE_RE = re.compile(r"transformer_blocks\.(\d+)\.(.+)$")


def original_module(module: str, last_block: int) -> tuple[str, str, int] | None:
    """One diffusers *module* path (no .weight) -> (original module, op, q/k/v part index or 0).

    op is "copy", "swap_halves" (output rows stored [scale; shift]) or "part" (q, k or v rows of the
    fused qkv: part index 0, 1, 2). None when the path is not an SD3 transformer module. Used by
    LoRA files, whose keys name modules rather than tensors (`sd35fp8.lora.keys`).
    """
    block = _MODULE_RE.match(module)
    if block is not None:
        i, rest = int(block.group(1)), block.group(2)
        if rest in _BLOCK_COPY:
            op = "swap_halves" if rest == "norm1_context.linear" and i == last_block else "copy"
            return f"joint_blocks.{i}.{_BLOCK_COPY[rest]}", op, 0
        if rest in _QKV_PART:
            orig, n = _QKV_PART[rest]
            return f"joint_blocks.{i}.{orig}", "part", n
        return None
    if module in _GLOBAL:
        return _GLOBAL[module], "copy", 0
    if module == "norm_out.linear":
        return "final_layer.adaLN_modulation.1", "swap_halves", 0
    return None


def diffusers_module_names(depth: int) -> list[str]:
    """Every diffusers module path of an SD3 transformer with `depth` blocks that a LoRA may target."""
    per_block = [*_BLOCK_COPY, *_QKV_PART]
    return [*_GLOBAL, "norm_out.linear", *(f"transformer_blocks.{i}.{m}" for i in range(depth) for m in per_block)]
