"""LoRA file keys -> (component, our module name, how the rows map).

A LoRA key names a *module* (`<stem>.<suffix>`): the stem says which model and layer, the suffix
which factor (`lora_A.weight` / `lora_down.weight` = down [r, K], `lora_B.weight` / `lora_up.weight`
= up [N, r], `alpha`, DoRA's `dora_scale` / `lora_magnitude_vector`). Stems come in these layouts:

| layout | MMDiT stem | text encoder stems |
|---|---|---|
| diffusers / peft | `transformer.transformer_blocks.3.attn.to_q` (or no `transformer.`) | `text_encoder(_2,_3).text_model...` |
| kohya / sd-scripts / ComfyUI | `lora_unet_joint_blocks_3_x_block_attn_qkv` | `lora_te1_` / `lora_te2_` / `lora_te3_` + underscored name |
| kohya on diffusers names | `lora_transformer_transformer_blocks_3_attn_to_q` | |
| Stability / ComfyUI | `diffusion_model.joint_blocks.3.x_block.attn.qkv` (or `model.` before) | `text_encoders.clip_l.transformer.text_model...` |

Our module names are the original SD3 keys for the MMDiT (`joint_blocks.3.x_block.attn.qkv`,
models/mmdit.py) and transformers' names inside the text encoders (CLIP-L / CLIP-G:
`text_model.encoder.layers.0.self_attn.q_proj`, `text_projection`; T5:
`encoder.block.0.layer.0.SelfAttention.q`). diffusers splits the fused qkv into to_q / to_k / to_v:
each maps onto a third of our qkv's output rows (op "part"); the adaLN layers diffusers stores as
[scale; shift] map with their output rows swapped (op "swap_halves"), as for the base weights
(checkpoints/diffusers_mmdit.py, reused here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sd35fp8.checkpoints.diffusers_mmdit import diffusers_module_names, original_module

COMPONENTS = ("mmdit", "clip_l", "clip_g", "t5xxl")

# suffix -> role of the tensor
SUFFIXES: dict[str, str] = {
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora_down.weight": "down", "lora_up.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_A.default.weight": "down", "lora_B.default.weight": "up",
    "alpha": "alpha",
    "dora_scale": "dora", "lora_magnitude_vector": "dora", "lora_magnitude_vector.weight": "dora",
    "lora_magnitude_vector.default.weight": "dora",
}
# LyCORIS LoHa / LoKr factors: turned into exact low-rank terms at load (files.py lycoris_factors)
LYCORIS: dict[str, str] = {
    "hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a", "hada_w2_b": "hada_w2_b",
    "lokr_w1": "lokr_w1", "lokr_w2": "lokr_w2", "lokr_w1_a": "lokr_w1_a", "lokr_w1_b": "lokr_w1_b",
    "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b",
}
SUFFIXES.update(LYCORIS)
# suffixes of formats we recognise but do not apply -> the format's name (the error names it)
REFUSED: dict[str, str] = {
    "hada_t1": "LyCORIS LoHa with a Tucker core (hada_t1)", "hada_t2": "LyCORIS LoHa with a Tucker core (hada_t2)",
    "lokr_t2": "LyCORIS LoKr with a Tucker core (lokr_t2)",
    "lora_mid.weight": "LyCORIS LoCon with a Tucker core (lora_mid)",
    "on_input": "LyCORIS (IA)^3", "a1.weight": "LyCORIS GLoRA", "b1.weight": "LyCORIS GLoRA",
    "oft_blocks": "LyCORIS OFT", "oft_diag": "LyCORIS OFT", "diff": "full weight difference (diff)",
    "diff_b": "full bias difference (diff_b)", "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm",
}
# stems that belong to other model families
OTHER_MODELS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "FLUX"),
    (re.compile(r"input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block"),
     "a UNet model (SD 1.x / 2.x / SDXL)"),
    (re.compile(r"(^|[._])layers[._]\d+[._](attention|feed_forward)"), "a Lumina / LLM-style transformer"),
)


@dataclass(frozen=True)
class Target:
    """Where one LoRA module lands: our module in one component, and which of its output rows."""

    component: str  # one of COMPONENTS
    module: str  # our module name inside that component
    op: str  # "copy" | "part" (q/k/v third of a fused qkv) | "swap_halves" (adaLN [scale; shift])
    part: int = 0  # q, k, v index for op "part"


_JB = re.compile(r"joint_blocks_(\d+)_(context_block|x_block)_(.+)$")
_JB_LEAF = {"attn_qkv": "attn.qkv", "attn_proj": "attn.proj", "attn2_qkv": "attn2.qkv", "attn2_proj": "attn2.proj",
            "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2", "adaLN_modulation_1": "adaLN_modulation.1"}
_MMDIT_GLOBAL = ("x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
                 "context_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1")
_MMDIT_GLOBAL_US = {m.replace(".", "_"): m for m in _MMDIT_GLOBAL}
_MMDIT_DOTTED = re.compile(r"(joint_blocks\.\d+\.(context_block|x_block)\.(" + "|".join(
    re.escape(v) for v in _JB_LEAF.values()) + r"))$")
_DIFF_BLOCK_US = re.compile(r"transformer_blocks_(\d+)_(.+)$")
_DIFF_PER_BLOCK = {m.split(".", 2)[2].replace(".", "_"): m.split(".", 2)[2]
                   for m in diffusers_module_names(1) if m.startswith("transformer_blocks.")}
_DIFF_GLOBAL_US = {m.replace(".", "_"): m for m in diffusers_module_names(0)}

_CLIP_US = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
_CLIP_DOTTED = re.compile(r"(text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])|text_projection)$")
_T5_US = re.compile(r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)$")
_T5_DOTTED = re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.(q|k|v|o)|DenseReluDense\.(wi_0|wi_1|wi|wo))$")

# prefix -> (component, spelling) in the order tried; "diffusers" stems may need the model's depth
_PREFIXES: tuple[tuple[str, str, str], ...] = (
    ("lora_unet_", "mmdit", "original_us"),
    ("lora_transformer_", "mmdit", "diffusers_us"),
    ("lora_te1_", "clip_l", "us"), ("lora_te2_", "clip_g", "us"), ("lora_te3_", "t5xxl", "us"),
    ("lora_te_", "clip_l", "us"),
    ("base_model.model.", "mmdit", "diffusers"),
    ("transformer.", "mmdit", "diffusers"),
    ("model.diffusion_model.", "mmdit", "original"), ("diffusion_model.", "mmdit", "original"),
    ("text_encoders.clip_l.transformer.", "clip_l", "dotted"), ("text_encoders.clip_g.transformer.", "clip_g", "dotted"),
    ("text_encoders.t5xxl.transformer.", "t5xxl", "dotted"),
    ("text_encoder_2.", "clip_g", "dotted"), ("text_encoder_3.", "t5xxl", "dotted"), ("text_encoder.", "clip_l", "dotted"),
    ("transformer_blocks.", "mmdit", "diffusers_bare"), ("joint_blocks.", "mmdit", "original_bare"),
)


def split_key(key: str) -> tuple[str, str] | None:
    """'a.b.lora_up.weight' -> ('a.b', 'lora_up.weight'); None when no known suffix ends the key."""
    for table in (SUFFIXES, REFUSED):
        for suffix in sorted(table, key=len, reverse=True):
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], suffix
    return None


def _clip(name: str, us: bool) -> str | None:
    if us:
        if name == "text_projection":
            return name
        m = _CLIP_US.match(name)
        if m is None:
            return None
        leaf = {"mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}.get(m.group(2)) or f"self_attn.{m.group(3)}_proj"
        return f"text_model.encoder.layers.{m.group(1)}.{leaf}"
    return name if _CLIP_DOTTED.match(name) else None


def _t5(name: str, us: bool) -> str | None:
    if us:
        m = _T5_US.match(name)
        return None if m is None else f"encoder.block.{m.group(1)}.layer.{m.group(2)}.{m.group(3)}.{m.group(4)}"
    return name if _T5_DOTTED.match(name) else None


def _mmdit_original(name: str, us: bool) -> str | None:
    if us:
        if name in _MMDIT_GLOBAL_US:
            return _MMDIT_GLOBAL_US[name]
        m = _JB.match(name)
        if m is None or m.group(3) not in _JB_LEAF:
            return None
        return f"joint_blocks.{m.group(1)}.{m.group(2)}.{_JB_LEAF[m.group(3)]}"
    return name if name in _MMDIT_GLOBAL or _MMDIT_DOTTED.match(name) else None


def _diffusers_dotted(name: str, us: bool) -> str | None:
    if not us:
        return name
    if name in _DIFF_GLOBAL_US:
        return _DIFF_GLOBAL_US[name]
    m = _DIFF_BLOCK_US.match(name)
    if m is None or m.group(2) not in _DIFF_PER_BLOCK:
        return None
    return f"transformer_blocks.{m.group(1)}.{_DIFF_PER_BLOCK[m.group(2)]}"


def resolve_stem(stem: str, last_block: int) -> tuple[Target | None, str]:
    """A module stem -> (Target or None, layout name). `last_block`: the MMDiT's last block index
    (its context adaLN is stored [scale; shift] by diffusers)."""
    for prefix, component, spelling in _PREFIXES:
        if not stem.startswith(prefix):
            continue
        name = stem[len(prefix):] if not spelling.endswith("_bare") else stem
        if component == "mmdit":
            if spelling.startswith("diffusers"):
                dotted = _diffusers_dotted(name, spelling == "diffusers_us")
                hit = None if dotted is None else original_module(dotted, last_block)
                if hit is None:
                    return None, "diffusers"
                module, op, part = hit
                layout = "kohya (diffusers names)" if spelling == "diffusers_us" else "diffusers / peft"
                return Target("mmdit", module, op, part), layout
            module = _mmdit_original(name, spelling == "original_us")
            layout = "kohya / sd-scripts" if spelling == "original_us" else "Stability / ComfyUI"
            return (None if module is None else Target("mmdit", module, "copy")), layout
        us = spelling == "us"
        module = _clip(name, us) if component in ("clip_l", "clip_g") else _t5(name, us)
        layout = "kohya / sd-scripts" if us else ("ComfyUI" if prefix.startswith("text_encoders.") else "diffusers / peft")
        return (None if module is None else Target(component, module, "copy")), layout
    return None, "unknown"


def other_model(stems: list[str]) -> str | None:
    """The family another model's LoRA keys point to (FLUX, a UNet model...), else None."""
    for pattern, family in OTHER_MODELS:
        if any(pattern.search(s) for s in stems):
            return family
    return None


def block_index(module: str) -> int | None:
    m = re.match(r"joint_blocks\.(\d+)\.", module)
    return None if m is None else int(m.group(1))


def max_diffusers_block(stems: list[str]) -> int:
    """Largest `transformer_blocks.N` / `transformer_blocks_N` index among the stems (-1 if none)."""
    found = [int(m.group(1)) for s in stems if (m := re.search(r"transformer_blocks[._](\d+)[._]", s))]
    return max(found) if found else -1
