"""Apply LoRA terms to Linear / FP8Linear / Conv2d layers: unmerged (a low-rank term beside the
unchanged, possibly FP8, matmul) or merged (dequantise, add, requantise with fresh scales).

Unmerged: every target layer owns one list, its *slot* (`lora_slot(module)`), of `ActiveTerm`s.
A forward hook adds `apply_lora(y, x, slot)` to the layer's output, and the fused MMDiT engine
holds the same list object as `p[name + ".lora"]` and calls `apply_lora` after its FP8 GEMM, so a
new LoRA set (or strength) is one in-place list update (`slot[:] = ...`): no weight changes, no
reload. An empty slot costs one truthiness test. Strength 0 terms are never put in a slot, so
strength 0 is the base model exactly.

    y = x W^T + b + sum_t strength_t * (x down_t^T) up_t^T          (rows of each term)
    DoRA: rows' = bias + g * (x W^T + (x down^T) up^T),  g = magnitude / ||W + up down||_row,
          blended with the base by strength: y + strength * ((g - 1)(y - b) + g (x down^T) up^T)

Merged (`fuse`): W' = W + sum strength * up @ down (DoRA as above), then for FP8Linear a fresh
per-output-channel scale (or per-tensor for per-tensor layers: ComfyUI scaled-fp8 files), written
in place so whoever shares the tensors sees it; the original fp8 bytes and scales are kept, so
`unfuse` restores them exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sd35fp8.errors import CheckpointError
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.fp8.scaling import FP8_DTYPE

from .files import LoraTerm

SLOT_ATTR = "sd35_lora"  # the module attribute holding its slot (list[ActiveTerm])
_BACKUP_ATTR = "sd35_lora_backup"
_HOOK_ATTR = "sd35_lora_hook"
_PLACED_ATTR = "_sd35_placed"  # on a LoraTerm: {(device, dtype, weights generation, layer id): factors}
_GENERATION = [0]  # bumped by every fuse / unfuse: engines holding weight copies re-read them (fast/step.py)


def weights_generation() -> int:
    """How many times `fuse` / `unfuse` rewrote some layer's weights in this process. An engine that
    keeps copies of weights (the fused adaLN scales, CUDA graphs) compares it with the value it was
    built at and re-reads the weights when it moved (MMDiTEngine.refresh_weights)."""
    return _GENERATION[0]


@dataclass
class ActiveTerm:
    """A term as the forward uses it: factors on the layer's device and compute dtype."""

    down: torch.Tensor  # [r, K] (conv [r, C, kh, kw])
    up: torch.Tensor  # [n, r] (conv [n, r, 1, 1])
    offset: int
    strength: float
    dora_g: torch.Tensor | None = None  # [n] magnitude / row norm (DoRA)


# ---------------------------------------------------------------------------------- geometry
def out_in(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, FP8Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    raise CheckpointError(f"LoRA target is a {type(module).__name__}, not a Linear, FP8Linear or Conv2d")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as float32 [N, K] (FP8 dequantised; conv flattened)."""
    if isinstance(module, FP8Linear):
        return module.dequantized_weight(torch.float32)
    return module.weight.detach().float().reshape(module.weight.shape[0], -1)


def check_term(module: nn.Module, term: LoraTerm, where: str) -> None:
    n_out, k = out_in(module)
    k_term = term.down[0].numel() if term.down.ndim == 4 else term.down.shape[1]
    if k_term != k or term.offset + term.rows > n_out or (term.down.ndim == 4) != isinstance(module, nn.Conv2d):
        raise CheckpointError(f"LoRA {term.key}: factors down {tuple(term.down.shape)} up {tuple(term.up.shape)} "
                              f"(rows {term.offset}..{term.offset + term.rows}) do not fit {where} "
                              f"({type(module).__name__} {n_out} x {k}); is it a LoRA for another model?",
                              None, [term.key])


def _dora_g(weight: torch.Tensor, term: LoraTerm) -> torch.Tensor:
    rows = weight[term.offset:term.offset + term.rows]  # [n, K] float32
    v = rows + term.up.float().reshape(term.rows, -1) @ term.down.float().reshape(term.rank, -1)
    return term.magnitude.float().to(v.device) / v.norm(dim=1)  # [n]


def activate(module: nn.Module, terms: list[tuple[LoraTerm, float]], dtype: torch.dtype) -> list[ActiveTerm]:
    """(term, strength) pairs -> the ActiveTerms of this layer (strength 0 dropped).

    The factors on the layer's device and dtype are made once per (term, device, dtype) and reused
    (kept on the parsed term, `_PLACED_ATTR`): switching back to a LoRA gives the same tensors,
    so the engine's CUDA graph captured for it replays (fast/graphs.py keys on their identity)."""
    dev = module.weight.device
    out = []
    weight = None
    for term, strength in terms:
        if strength == 0:
            continue
        placed = term.__dict__.setdefault(_PLACED_ATTR, {})
        gen = weights_generation() if term.magnitude is not None else 0  # DoRA's g depends on the weight
        key = (dev, dtype, gen, id(module))
        if key not in placed:
            g = None
            if term.magnitude is not None:
                weight = dense_weight(module) if weight is None else weight
                g = _dora_g(weight, term).to(device=dev, dtype=dtype)
            placed.clear()  # one placement per term: an older device / dtype / weight is not kept
            placed[key] = (term.down.to(device=dev, dtype=dtype), term.up.to(device=dev, dtype=dtype), g)
        down, up, g = placed[key]
        out.append(ActiveTerm(down, up, term.offset, float(strength), g))
    return out


# ---------------------------------------------------------------------------------- unmerged
def apply_lora(y: torch.Tensor, x: torch.Tensor, terms: list[ActiveTerm], bias: torch.Tensor | None = None,
               x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] (the base layer's output for x [..., K]) plus every term's low-rank update.

    x may be the FP8 engine's quantised activation (float8 [M, K] with x_scale [] or [M, 1]); it is
    dequantised for the low-rank product. bias: the layer's (DoRA needs x W^T without it).
    """
    if not terms:
        return y
    n = y.shape[-1]
    y2 = y.reshape(-1, n)  # [M, N]
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    row_scale = None  # FP8 x: (x8 * s) down^T = (x8 down^T) * s for a per-row (or scalar) s, so the
    if x2.dtype == FP8_DTYPE:  # scale goes on the [M, r] product, and x8 -> the factors' dtype is exact
        row_scale = x_scale
    out, owned = y2, False
    xs: dict[torch.dtype, torch.Tensor] = {}
    for t in terms:
        if t.down.dtype not in xs:
            xs[t.down.dtype] = x2.to(t.down.dtype)
        h = xs[t.down.dtype] @ t.down.t()  # [M, r]
        if row_scale is not None:
            h = (h.float() * row_scale.float()).to(t.down.dtype)
        rows = t.up.shape[0]
        if t.dora_g is not None:
            h = h @ t.up.t()  # [M, n]
            base = y2[:, t.offset:t.offset + rows].to(h.dtype)
            if bias is not None:
                base = base - bias[t.offset:t.offset + rows].to(h.dtype)
            h = ((t.dora_g - 1) * base + t.dora_g * h) * t.strength  # [M, n]
            h = h.to(y2.dtype)
        elif t.offset == 0 and rows == n:  # the common case: one GEMM adds the term to the output (cuBLAS beta=1)
            out = torch.addmm(out, h.to(y2.dtype), (t.up * t.strength).t().to(y2.dtype))
            owned = True
            continue
        else:
            h = (h @ (t.up * t.strength).t()).to(y2.dtype)  # [M, rows]
        if not owned:
            out, owned = out.clone(), True  # never write into the caller's y
        out[:, t.offset:t.offset + rows] += h
    return out.reshape(y.shape)


def _conv_lora(y: torch.Tensor, x: torch.Tensor, terms: list[ActiveTerm], conv: nn.Conv2d) -> torch.Tensor:
    for t in terms:
        h = F.conv2d(x.to(t.down.dtype), t.down, stride=conv.stride, padding=conv.padding)  # [B, r, h, w]
        h = F.conv2d(h, t.up)  # [B, n, h, w]
        if t.dora_g is not None:
            raise CheckpointError("DoRA on a convolution is not supported unmerged; use merge")
        y = y + (h * t.strength).to(y.dtype)
    return y


def _hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    terms = getattr(module, SLOT_ATTR)
    if not terms:
        return None
    if isinstance(module, nn.Conv2d):
        return _conv_lora(output, args[0], terms, module)
    return apply_lora(output, args[0], terms, module.bias)


def lora_slot(module: nn.Module) -> list[ActiveTerm]:
    """The layer's slot (created on first use; its forward hook registered when missing). The list
    object lives as long as the layer: an engine that holds it (fast/weights.py) sees every change."""
    if not hasattr(module, SLOT_ATTR):
        out_in(module)  # raises for layers LoRA cannot target
        setattr(module, SLOT_ATTR, [])
    if not hasattr(module, _HOOK_ATTR):
        setattr(module, _HOOK_ATTR, module.register_forward_hook(_hook))
    return getattr(module, SLOT_ATTR)


def existing_slot(module: nn.Module) -> list[ActiveTerm] | None:
    """The slot if the layer has one (the engine shares it), else None."""
    return getattr(module, SLOT_ATTR, None)


def remove_slot(module: nn.Module) -> None:
    """Empty the layer's slot and remove its forward hook. The (empty) list stays on the layer: an
    engine built earlier holds the same object, and a LoRA loaded later must land in it too."""
    if hasattr(module, _HOOK_ATTR):
        getattr(module, _HOOK_ATTR).remove()
        delattr(module, _HOOK_ATTR)
    if hasattr(module, SLOT_ATTR):
        getattr(module, SLOT_ATTR).clear()


# ---------------------------------------------------------------------------------- merged
def merged_weight(module: nn.Module, terms: list[tuple[LoraTerm, float]], base: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """float32 [N, K]: the layer's weight with the terms added (DoRA rows rescaled)."""
    w = dense_weight(module) if base is None else base
    new = w.clone()
    for term, strength in terms:
        if strength == 0:
            continue
        d = term.up.float().reshape(term.rows, -1).to(w.device) @ term.down.float().reshape(term.rank, -1).to(w.device)
        rows = w[term.offset:term.offset + term.rows]
        if term.magnitude is not None:
            v = rows + d
            d = v * (term.magnitude.float().to(w.device) / v.norm(dim=1))[:, None] - rows
        new[term.offset:term.offset + term.rows] += strength * d
    return new


def fuse(module: nn.Module, terms: list[tuple[LoraTerm, float]]) -> None:
    """Merge into the layer's weights in place (FP8: requantised with fresh scales); keeps a backup."""
    new = merged_weight(module, terms)  # [N, K] float32
    if not hasattr(module, _BACKUP_ATTR):
        scale = module.weight_scale.detach().clone() if isinstance(module, FP8Linear) else None
        setattr(module, _BACKUP_ATTR, (module.weight.detach().clone(), scale))
    if isinstance(module, FP8Linear):
        module.requantize_(new)
    else:
        with torch.no_grad():
            module.weight.data.copy_(new.reshape(module.weight.shape).to(module.weight.dtype))
    _GENERATION[0] += 1


def unfuse(module: nn.Module) -> bool:
    """Restore the weights saved by `fuse` (exactly); False when the layer was not fused."""
    backup = getattr(module, _BACKUP_ATTR, None)
    if backup is None:
        return False
    w, s = backup
    with torch.no_grad():
        module.weight.data.copy_(w)
        if s is not None:
            module.weight_scale.copy_(s)
    delattr(module, _BACKUP_ATTR)
    _GENERATION[0] += 1
    return True
