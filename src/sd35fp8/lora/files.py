"""Read a LoRA safetensors file into low-rank terms on our module names (format inferred from keys).

    lora = read_lora("hands.safetensors", depth=38)   # depth: the MMDiT's (None: the file's own)
    lora.terms[("mmdit", "joint_blocks.3.x_block.attn.qkv")]  -> [LoraTerm(down, up, offset, magnitude)]

Each term is W += up @ down on output rows [offset, offset + up.shape[0]) of the target, with the
file's alpha / rank already folded into `up` (alpha absent: scale 1, as diffusers and ComfyUI).
DoRA terms carry the magnitude vector of their rows. What the file holds that we do not apply is
an error naming the format (LyCORIS LoHa / LoKr / OFT ..., conv LoRA with a Tucker core), a file of
another model family is an error naming the family, a file matching nothing is an error, and keys
that match no SD3.5 layer while others do are listed in `skipped` (loaders print them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sd35fp8.checkpoints.safetensors_file import SafetensorsFile
from sd35fp8.errors import CheckpointError

from .keys import LYCORIS, REFUSED, SUFFIXES, max_diffusers_block, other_model, resolve_stem, split_key


@dataclass
class LoraTerm:
    """One low-rank update of one target: rows [offset, offset + n) += up @ down (times strength)."""

    down: torch.Tensor  # [r, K] (conv: [r, C, kh, kw])
    up: torch.Tensor  # [n, r] with alpha / r folded in (conv: [n, r, 1, 1])
    offset: int = 0
    magnitude: torch.Tensor | None = None  # DoRA: [n] target row norms
    key: str = ""  # the file's module stem (errors)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def rows(self) -> int:
        return int(self.up.shape[0])


@dataclass
class LoraFile:
    path: str
    name: str
    layouts: list[str]  # key layouts found ("kohya / sd-scripts", "diffusers / peft", ...)
    terms: dict[tuple[str, str], list[LoraTerm]]  # (component, our module) -> terms
    skipped: list[str] = field(default_factory=list)  # file stems matching no SD3.5 layer
    metadata: dict[str, str] = field(default_factory=dict)
    dora: bool = False

    @property
    def format(self) -> str:
        return " + ".join(self.layouts) + (" (DoRA)" if self.dora else "")

    @property
    def ranks(self) -> list[int]:
        return sorted({t.rank for ts in self.terms.values() for t in ts})

    def components(self) -> dict[str, int]:
        """component -> number of target modules."""
        out: dict[str, int] = {}
        for comp, _ in self.terms:
            out[comp] = out.get(comp, 0) + 1
        return out


def _peft_alpha(metadata: dict[str, str], stem: str) -> float | None:
    """diffusers writes the peft config as JSON metadata (`lora_adapter_metadata`): lora_alpha and
    alpha_pattern (a pattern matches a module name suffix)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"lora_adapter_metadata is not JSON: {e}") from e
    for pattern, alpha in (cfg.get("alpha_pattern") or {}).items():
        if stem.endswith(pattern):
            return float(alpha)
    return None if cfg.get("lora_alpha") is None else float(cfg["lora_alpha"])


def _magnitude(t: torch.Tensor, n: int, path: str, stem: str) -> torch.Tensor:
    if t.numel() != n or (t.ndim == 2 and t.shape[1] != 1):
        raise CheckpointError(f"DoRA {stem}: magnitude of shape {tuple(t.shape)} for {n} output rows; only "
                              "output-axis DoRA ([N] or [N, 1]) is supported, input-axis ([1, K]) is not",
                              path, [stem])
    return t.reshape(n).float()


def _low_rank(w: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None, what: str, path: str,
              stem: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A LyCORIS factor as (left [m, r], right [r, n]) with left @ right = it: given as a @ b, or whole (then the
    identity on its shorter side)."""
    if w is not None:
        w = w.float()
        if w.ndim != 2:
            raise CheckpointError(f"{path}: {stem} {what} is {tuple(w.shape)}; only linear layers' LyCORIS factors "
                                  "are supported", path, [stem])
        eye = torch.eye(min(w.shape), dtype=w.dtype)
        return (eye, w) if w.shape[0] <= w.shape[1] else (w, eye)
    if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise CheckpointError(f"{path}: {stem} lacks a usable {what} (its _a / _b factors)", path, [stem])
    return a.float(), b.float()


def lycoris_factors(roles: dict[str, torch.Tensor], path: str, stem: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A LyCORIS LoHa / LoKr module -> (down [r, K], up [N, r]) with up @ down = ComfyUI's weight difference
    (comfy/weight_adapter loha.py / lokr.py calculate_weight, strength 1), exactly:

        LoHa  (w1a @ w1b) * (w2a @ w2b) * alpha / w1b.shape[0]      (Hadamard product: rank r1 * r2, the
              face-splitting products of the factors)
        LoKr  kron(w1, w2) * alpha / dim, dim = the rank of the last factor given as a / b (no alpha scaling when
              both are whole), kron(A1 B1, A2 B2) = kron(A1, A2) kron(B1, B2): rank r1 * r2

    A product whose rank reaches the layer's size is kept as one full-rank term (the difference itself beside an
    identity: fuse such LoRAs for speed)."""
    alpha = float(roles["alpha"]) if "alpha" in roles else None
    if "hada_w1_a" in roles:
        a1, b1 = _low_rank(None, roles.get("hada_w1_a"), roles.get("hada_w1_b"), "hada_w1", path, stem)
        a2, b2 = _low_rank(None, roles.get("hada_w2_a"), roles.get("hada_w2_b"), "hada_w2", path, stem)
        if a1.shape[0] != a2.shape[0] or b1.shape[1] != b2.shape[1]:
            raise CheckpointError(f"{path}: {stem} LoHa factors of different shapes", path, [stem])
        scale = alpha / b1.shape[0] if alpha is not None else 1.0
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)  # [N, r1 r2]
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])  # [r1 r2, K]
    else:
        a1, b1 = _low_rank(roles.get("lokr_w1"), roles.get("lokr_w1_a"), roles.get("lokr_w1_b"), "lokr_w1", path,
                           stem)
        a2, b2 = _low_rank(roles.get("lokr_w2"), roles.get("lokr_w2_a"), roles.get("lokr_w2_b"), "lokr_w2", path,
                           stem)
        dim = None
        if "lokr_w1" not in roles:
            dim = roles["lokr_w1_b"].shape[0]
        if "lokr_w2" not in roles:
            dim = roles["lokr_w2_b"].shape[0]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        up, down = torch.kron(a1, a2), torch.kron(b1, b2)  # [N, r1 r2], [r1 r2, K]
    n, k = up.shape[0], down.shape[1]
    if up.shape[1] >= min(n, k):  # as much work as the difference itself: one full-rank term
        diff = up @ down
        up, down = (torch.eye(n), diff) if n <= k else (diff, torch.eye(k))
    return down.contiguous(), up * scale


def read_lora(path: str | Path, depth: int | None = None, name: str | None = None) -> LoraFile:
    """Parse a LoRA file. depth: the MMDiT's number of joint blocks (places diffusers' pre-only last
    context block); None takes the largest block index in the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist", str(path))
    f = SafetensorsFile(path)  # validated header: clear errors for truncated / non-safetensors files
    tensors = {k: f.get(k) for k in f.keys()}
    return parse_lora(tensors, str(path), depth, name or path.stem, f.metadata)


def parse_lora(tensors: dict[str, torch.Tensor], path: str, depth: int | None = None, name: str = "lora",
               metadata: dict[str, str] | None = None) -> LoraFile:
    metadata = dict(metadata or {})
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        groups.setdefault(parts[0], {})[parts[1]] = t
    refused = sorted({REFUSED[s] for g in groups.values() for s in g if s in REFUSED})
    if refused:
        raise CheckpointError(f"{path}: {', '.join(refused)} weights are not supported (LoRA / LoCon / DoRA factors, "
                              "LyCORIS LoHa and LoKr without Tucker cores are)", path)
    stems = sorted(groups)
    family = other_model(stems + unknown)
    last = (depth - 1) if depth is not None else max_diffusers_block(stems)
    terms: dict[tuple[str, str], list[LoraTerm]] = {}
    layouts: list[str] = []
    skipped: list[str] = list(unknown)
    dora = False
    for stem in stems:
        g = groups[stem]
        target, layout = resolve_stem(stem, last)
        if target is None:
            skipped.append(stem)
            continue
        roles = {SUFFIXES[s]: t for s, t in g.items()}
        if any(r in LYCORIS for r in roles):
            down, up = lycoris_factors(roles, path, stem)
            layout = f"LyCORIS {'LoKr' if any(r.startswith('lokr') for r in roles) else 'LoHa'} ({layout})"
        else:
            if "down" not in roles or "up" not in roles:
                raise CheckpointError(f"{path}: LoRA module {stem} lacks its down or up factor (has {sorted(g)})",
                                      path, [stem])
            down, up = roles["down"].float(), roles["up"].float()
            rank = down.shape[0]
            if up.shape[1] != rank:
                raise CheckpointError(f"{path}: {stem} up {tuple(up.shape)} does not match down "
                                      f"{tuple(down.shape)}", path, [stem])
            alpha = float(roles["alpha"]) if "alpha" in roles else _peft_alpha(metadata, stem)
            up = up * ((alpha / rank) if alpha is not None else 1.0)
        n = up.shape[0]
        mag = None if "dora" not in roles else _magnitude(roles["dora"], n, path, stem)
        dora = dora or mag is not None
        offset = 0
        if target.op == "swap_halves":  # diffusers [scale; shift] rows -> our [shift; scale]
            up = torch.cat(up.chunk(2, dim=0)[::-1])
            mag = None if mag is None else torch.cat(mag.chunk(2)[::-1])
        elif target.op == "part":
            offset = target.part * n
        if layout not in layouts:
            layouts.append(layout)
        terms.setdefault((target.component, target.module), []).append(
            LoraTerm(down.contiguous(), up.contiguous(), offset, mag, stem))
    if not terms:
        if family is not None:
            raise CheckpointError(f"{path} is a LoRA for {family}, not for SD3.5 (keys such as "
                                  f"{', '.join((stems + unknown)[:3])})", path, (stems + unknown)[:10])
        raise CheckpointError(f"{path}: no key matches an SD3.5 MMDiT or text-encoder layer (keys such as "
                              f"{', '.join((stems + unknown)[:3])})", path, (stems + unknown)[:10])
    return LoraFile(path, name, layouts, terms, skipped, metadata, dora)


def guess_base(lora: LoraFile) -> str:
    """Which base model the MMDiT part fits, from its block count and width."""
    mm = [(m, ts) for (c, m), ts in lora.terms.items() if c == "mmdit"]
    if not mm:
        return "text encoders only (any SD3.5 model with these encoders)"
    blocks = {int(m.split(".")[1]) for m, _ in mm if m.startswith("joint_blocks.")}
    width = {int(t.down.shape[1]) for m, ts in mm if m.endswith("attn.qkv") for t in ts}
    attn2 = any(".attn2." in m for m, _ in mm)
    hidden = next(iter(width)) if len(width) == 1 else None
    known = {2432: "SD3.5 Large / Large Turbo (38 blocks)", 1536: "SD3.5 Medium (24 blocks, MMDiT-X)",
             192: "the shipped tiny model (3 blocks)"}
    if hidden in known:
        return known[hidden]
    top = max(blocks) + 1 if blocks else 0
    return (f"an MMDiT{'-X' if attn2 else ''} of hidden size {hidden}, at least {top} blocks"
            if hidden else f"an MMDiT with at least {top} blocks")
