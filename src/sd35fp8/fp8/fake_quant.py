"""FP8 inference numerics as differentiable float ops, for training adapters that will run on FP8.

    handle = emulate_fp8(model, fp8_model)   # model: the float MMDiT being trained around (frozen)
    ...train...                              # forward = the FP8 engine's rounding, backward = identity
    handle.remove()                          # weights and attention back as they were

What is emulated (the FP8 "dynamic" engine, fast/step.py and fast/attention_triton.py):
  * every layer that `fp8_model` holds as an FP8Linear gets that layer's dequantised weight
    (weight.float() * weight_scale: bit-exact the weight the FP8 matmul uses);
  * its input is rounded per token to e4m3 (scale = row amax / 448, as fast/kernels.py's dynamic
    activations), except the joint blocks' adaLN linears (the engine's weight-only FP8 GEMV);
  * attention (with `attention=True`): q and k Hadamard-rotated, q, k, v rounded to e4m3 with one scale
    per (batch, head), then exact softmax attention (the kernel's P rounding, ~32 dB, is left out).
Rounding uses the straight-through estimator: forward x + (q(x) - x).detach(), so gradients flow as if
nothing were rounded (QLoRA-style training around a quantised base). Frozen base weights only: the
swapped-in weights are not meant to be trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sd35fp8.errors import InputError
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.fp8.scaling import FP8_DTYPE, amax_to_scale, to_fp8_saturated
from sd35fp8.models import mmdit as mmdit_module  # its module-level `attention` is what emulate_fp8 swaps

WEIGHT_ONLY_SUFFIX = ".adaLN_modulation.1"  # joint blocks' adaLN: the engine's weight-only GEMV


def _round_e4m3(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x rounded to e4m3 with one scale per slice reduced over `dims` (fp32 math, x's dtype back)."""
    xf = x.float()
    s = amax_to_scale(xf.detach().abs().amax(dim=dims, keepdim=True))
    return (to_fp8_saturated(xf, s, FP8_DTYPE).float() * s).to(x.dtype)


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """Per-token e4m3 rounding of x [..., K] (straight-through gradient)."""
    return x + (_round_e4m3(x, (-1,)) - x).detach()


def hadamard(d: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [d, d] (d a power of two)."""
    if d & (d - 1):
        raise InputError(f"fp8/fake_quant.py: Hadamard size {d} is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).to(device)


def fake_quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] x3 -> [B, L, H*D]: attention on e4m3-rounded (rotated) q, k and v, per-(b, h) scales."""
    B, L, H, D = q.shape
    hm = hadamard(D, q.device).to(q.dtype)
    qr, kr = q @ hm, k @ hm  # q k^T unchanged (hm orthonormal); outliers spread over D
    qr, kr, v = (t + (_round_e4m3(t, (1, 3)) - t).detach() for t in (qr, kr, v))  # scale per (b, h)
    out = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(B, L, H * D)  # [B, L, H*D]


@dataclass
class Emulation:
    """What `emulate_fp8` changed, to undo it."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> original weight data
    hooks: list = field(default_factory=list)
    patched: list = field(default_factory=list)  # (module, attribute, original)
    model: nn.Module | None = None
    enabled: bool = True  # False: the layers keep their FP8 weights but inputs and attention are not rounded

    def input_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        return (fake_quant_rows(args[0]),) + tuple(args[1:]) if self.enabled else None

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        for mod, attr, orig in self.patched:
            setattr(mod, attr, orig)
        if self.model is not None:
            with torch.no_grad():
                for name, w in self.weights.items():
                    self.model.get_submodule(name).weight.data = w
        self.hooks, self.patched, self.weights = [], [], {}


def emulate_fp8(model: nn.Module, fp8_model: nn.Module, attention: bool = True) -> Emulation:
    """Make the float `model` compute as `fp8_model` (same architecture, FP8 layers) does; see the module
    docstring. Layers missing from `model` or of another shape are an InputError naming them."""
    em = Emulation(model=model)
    fp8_layers = {n: m for n, m in fp8_model.named_modules() if isinstance(m, FP8Linear)}
    if not fp8_layers:
        raise InputError("fp8/fake_quant.py: the FP8 model has no FP8Linear layers (loaded with fp8 'none'?)")
    mods = dict(model.named_modules())
    for name, layer in fp8_layers.items():
        lin = mods.get(name)
        if not isinstance(lin, nn.Linear) or tuple(lin.weight.shape) != (layer.out_features, layer.in_features):
            raise InputError(f"fp8/fake_quant.py: layer {name!r} of the FP8 model has no nn.Linear of shape "
                             f"[{layer.out_features}, {layer.in_features}] in the float model")
        with torch.no_grad():
            w = (layer.weight.float() * layer.weight_scale.float()).to(lin.weight.device, lin.weight.dtype)  # [N, K]
        em.weights[name] = lin.weight.data
        lin.weight.data = w
        if not (name.startswith("joint_blocks.") and name.endswith(WEIGHT_ONLY_SUFFIX)):
            em.hooks.append(lin.register_forward_pre_hook(em.input_hook))
    if attention:
        exact = mmdit_module.attention
        em.patched.append((mmdit_module, "attention", exact))
        mmdit_module.attention = lambda q, k, v: (fake_quant_attention if em.enabled else exact)(q, k, v)
    return em
