"""How the engine (fast/step.py) lays out one linear's weights: which tensors, in which mode.

`linear_weights(mod, mode, ...)` -> {'w', 'ws'?, 'b'?, 'xs'?, 'mode'?}: the tensors the fused step's
matmul reads for an nn.Linear or FP8Linear run in `mode` (no copy, except quantising an nn.Linear
or dequantising an FP8Linear for a 16-bit engine). `auto_attention` picks the attention kernel.
"""

from __future__ import annotations

import os

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


# Output rows padded (pad_output_rows): the N = 2432 GEMMs of Large (x.proj, x.fc2: 1216 output tiles of 128 x 128,
# 9.2 waves on 132 SMs) run faster at N = 2560 although they compute 5 % more: x.proj 84.3 -> 76.7 us, x.fc2 316.4 ->
# 306.3 us on the H100 (benchmarks/gemm_pad.py, gemm_pad_nvidia-h100-80gb-hbm3.json; N = 2688 / 3072 slower).
PAD_ROWS_TO = 256
PAD_MIN_N = 1024  # narrower layers (the tiny models) stay as they are
# Opt-in for now: SD35FP8_PAD_N=1 pads. Measured as lone GEMMs (above), not yet in the step on a GPU;
# `bash benchmarks/gpu_session31_short.sh OUT` times the step both ways, and the default follows from that.
PAD_ENV = "SD35FP8_PAD_N"
PADDED_LINEARS = ("x.proj", "x.fc2")  # the image stream's N = hidden GEMMs (M = 2 x 4096 rows at 1024², CFG)
_ALLOW_CPU = False  # tests only: pad CPU weights too (the engine's CPU road then reads the padded GEMMs)
_PADDED_ATTR = "_sd35fp8_padded_weight"  # the padded buffer, kept on the layer (its weight is a view of it)


def pad_output_rows(p: dict, name: str, mod: nn.Module | None, mode: str | None) -> None:
    """Give linear `name` of a block's weight dict `p` zero weight rows up to a multiple of PAD_ROWS_TO, for the
    FP8 GEMM's tiling: p[name + '.w'] [Np, K] (ws padded with ones, bias with zeros) and p[name + '.n'] = N, the
    columns the engine reads of its [M, Np] output (fast/step.py matmul: a view, rows Np apart; the row kernels
    take the stride). The layer's own weight becomes a view of the first N rows (one copy, as the fused adaLN's).
    Only with $SD35FP8_PAD_N=1, and where it pays: CUDA fp8 weights in a matmul mode (dynamic / static) with
    N >= PAD_MIN_N."""
    w = p.get(name + ".w")
    if (os.environ.get(PAD_ENV, "0").strip() != "1" or w is None or not (w.is_cuda or _ALLOW_CPU)
            or w.dtype != torch.float8_e4m3fn
            or mode not in ("dynamic", "static") or p.get(name + ".mode") not in (None, mode) or name + ".n" in p):
        return
    n, k = w.shape
    n_pad = -(-n // PAD_ROWS_TO) * PAD_ROWS_TO
    if n < PAD_MIN_N or n_pad == n or not isinstance(mod, FP8Linear) or mod.weight.data_ptr() != w.data_ptr():
        return
    big = getattr(mod, _PADDED_ATTR, None)  # padded by an earlier build (refresh_weights): the same buffer
    if big is None or big.data_ptr() != w.data_ptr() or tuple(big.shape) != (n_pad, k) or big.dtype != w.dtype:
        big = torch.zeros(n_pad, k, dtype=w.dtype, device=w.device)
        big[:n].copy_(w)
        mod.weight.data = big[:n]  # the layer reads the first N rows of the padded buffer: no second copy
        setattr(mod, _PADDED_ATTR, big)
    p[name + ".w"] = big
    ws = p[name + ".ws"]
    p[name + ".ws"] = torch.cat([ws, torch.ones(1, n_pad - n, dtype=ws.dtype, device=ws.device)], dim=1)
    if p.get(name + ".b") is not None:
        b = p[name + ".b"]
        p[name + ".b"] = torch.cat([b, torch.zeros(n_pad - n, dtype=b.dtype, device=b.device)])
    p[name + ".n"] = n
