"""How the engine (fast/step.py) lays out one linear's weights: which tensors, in which mode.

`linear_weights(mod, mode, ...)` -> {'w', 'ws'?, 'b'?, 'xs'?, 'mode'?}: the tensors the fused step's
matmul reads for an nn.Linear or FP8Linear run in `mode` (no copy, except quantising an nn.Linear
or dequantising an FP8Linear for a 16-bit engine). `auto_attention` picks the attention kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from sd35fp8.errors import InputError
from sd35fp8.fast.attention import default_backend
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.fp8.scaling import quantize_rowwise
from sd35fp8.lora.apply import lora_slot

HIGH_PRECISION = "bf16"  # a linear's `.mode` entry: its 16/32-bit weight, no fp8
MM_OUT_DTYPE = torch.bfloat16  # torch._scaled_mm output (and bias) dtype


def layer_mode(mod: nn.Module) -> str | None:
    """The mode a linear runs in on its own: an FP8Linear's effective mode, None for nn.Linear."""
    return mod.effective_mode if isinstance(mod, FP8Linear) else None


def linear_weights(mod: nn.Module, mode: str | None, dtype: torch.dtype, where: str, per_layer: bool = False) -> dict:
    """{'w', 'ws'?, 'b'?, 'xs'?, 'mode'?} of one linear for `mode` (no copy unless quantising an nn.Linear).

    per_layer: a linear whose own mode (layer_mode) differs from `mode` keeps it ('mode' entry:
    HIGH_PRECISION for a 16/32-bit nn.Linear, else its fp8 mode)."""
    own = None
    if per_layer and type(mod) in (nn.Linear, FP8Linear) and layer_mode(mod) != mode:
        own = layer_mode(mod)
        if own in ("dynamic", "static") and mode in (None, "weight_only"):
            own = mode if mode is not None else "weight_only"  # no fp8 matmul asked for: the engine's choice
        if own == "static" and mod.input_scale is None:
            own = "dynamic"
        out = linear_weights(mod, own, dtype, where)
        out["mode"] = HIGH_PRECISION if own is None else own
        return out
    if mode is None:
        if type(mod) is FP8Linear:  # a 16-bit engine over fp8 weights: dequantise (a copy)
            return {"w": mod.dequantized_weight(dtype), "b": None if mod.bias is None else mod.bias.to(dtype),
                    "lora": lora_slot(mod)}
        if type(mod) is not nn.Linear:
            raise InputError(f"MMDiTEngine: {where} is {type(mod).__name__}, expected nn.Linear or FP8Linear")
        return {"w": mod.weight, "b": mod.bias, "lora": lora_slot(mod)}
    if isinstance(mod, FP8Linear):
        w, ws, xs = mod.weight, mod.weight_scale, mod.input_scale
    elif type(mod) is nn.Linear:
        w, ws = quantize_rowwise(mod.weight.detach(), dim=-1)  # [N, K] fp8, [N, 1]
        xs = None
    else:
        raise InputError(f"MMDiTEngine: {where} is {type(mod).__name__}, expected nn.Linear or FP8Linear")
    n = w.shape[0]
    ws_row = (ws.reshape(1, 1).expand(1, n) if ws.numel() == 1 else ws.reshape(1, n)).float().contiguous()
    bias = mod.bias
    if bias is not None and mode != "weight_only" and bias.dtype != MM_OUT_DTYPE:
        bias = bias.to(MM_OUT_DTYPE)
    if bias is not None and mode == "weight_only" and bias.dtype != dtype:
        bias = bias.to(dtype)
    out = {"w": w, "ws": ws_row, "b": bias, "lora": lora_slot(mod)}  # the LoRA slot: a list shared with the layer
    if xs is not None and mode == "static":
        out["xs"] = xs
    return out


def put(p: dict, name: str, lin: dict) -> None:
    for k, v in lin.items():
        if v is None:
            continue
        # plain tensors (detach shares storage): dynamo then guards shapes, not identity; a mode string is a
        # constant for the compiled block; the LoRA slot is a list shared with the layer (lora/apply.py)
        p[f"{name}.{k}"] = v.detach() if isinstance(v, torch.Tensor) else v


def auto_attention(device: torch.device, fp8_mode: str | None) -> str | None:
    """FP8 matmul modes on a GPU with fp8 tensor cores (sm_89+) and Triton: our FP8 flash attention
    (Large step 103.4 -> 99.2 ms, step SQNR 29.0 -> 28.9 dB on the H100; docs/PERF.md), or, in dynamic mode on
    a Hopper GPU where FlashAttention-3 is installed (fast/attention_fa3.py), FA3's FP8 forward on our quantise
    pass (Large step 75.30 -> 73.32 ms, SQNR 28.96 dB both, H200; docs/PERF.md session 26). Otherwise
    cuDNN SDPA on CUDA, torch's choice on CPU."""
    from sd35fp8.fast import attention_fa3, attention_triton

    if (fp8_mode in ("dynamic", "static") and device.type == "cuda" and attention_triton.triton is not None
            and torch.cuda.get_device_capability(device) >= (8, 9)):
        return attention_fa3.KIND if fp8_mode == "dynamic" and attention_fa3.available(device) else "triton_fp8"
    return default_backend(device)


