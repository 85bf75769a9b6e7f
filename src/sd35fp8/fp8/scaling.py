"""FP8 (E4M3) scaling as pure functions: amax -> scale -> saturated cast, and back.

Convention used everywhere in this package (the ComfyUI / `torch._scaled_mm` one):

    x  ~=  q * scale,        q = clamp(x / scale, -448, 448).to(float8_e4m3fn)
    scale = amax / 448       (fp32; amax clamped to >= eps so a zero tensor gives finite scale)

This is the *inverse* of torchao's convention (torchao stores 448 / amax and multiplies).
Our `scale` is exactly what `torch._scaled_mm(scale_a=..., scale_b=...)` and ComfyUI's
`scale_weight` / `scale_input` expect: the factor that turns fp8 numbers back into real ones.

Granularities:
    tensorwise  one fp32 scalar for the whole tensor                       scale []
    rowwise     one fp32 per row along `dim` (reduce over `dim`)            scale [..., 1]
                - weights [N, K]: per output channel    -> [N, 1]
                - activations [M, K]: per token          -> [M, 1]
"""

from __future__ import annotations

import math

import torch

from sd35fp8.errors import InputError

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
E5M2_MAX = float(torch.finfo(torch.float8_e5m2).max)  # 57344.0
# Smallest amax used to build a scale: keeps 0-tensors finite (q = 0, scale tiny).
EPS = 1e-12

_FP8_MAX = {torch.float8_e4m3fn: E4M3_MAX, torch.float8_e5m2: E5M2_MAX}


def fp8_max(dtype: torch.dtype = FP8_DTYPE) -> float:
    """Largest finite value of an fp8 dtype (448 for E4M3FN)."""
    if dtype not in _FP8_MAX:
        raise ValueError(f"fp8/scaling.py: {dtype} is not a supported fp8 dtype ({list(_FP8_MAX)})")
    return _FP8_MAX[dtype]


@torch.no_grad()
def amax_to_scale(amax: torch.Tensor, dtype: torch.dtype = FP8_DTYPE, eps: float = EPS) -> torch.Tensor:
    """scale = max(amax, eps) / fp8_max(dtype), in float32 (same shape as amax)."""
    return torch.clamp(amax.to(torch.float32), min=eps) / fp8_max(dtype)


def to_fp8_saturated(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> torch.Tensor:
    """q = clamp(x / scale, -max, max).to(dtype). `scale` broadcasts against x.

    The clamp matters: E4M3FN has no inf, and whether a plain `.to(float8_e4m3fn)` of a value
    above 448 saturates or gives NaN depends on the backend (torch 2.13 CPU saturates); with a
    static scale calibrated on smaller activations that happens in real runs.
    """
    m = fp8_max(dtype)
    return (x.to(torch.float32) / scale).clamp(-m, m).to(dtype)


def quantize_tensorwise(x: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor -> (q like x in fp8, scale fp32 scalar [])."""
    amax = x.detach().abs().amax().to(torch.float32)  # []
    scale = amax_to_scale(amax, dtype)
    return to_fp8_saturated(x, scale, dtype), scale


def quantize_rowwise(
    x: torch.Tensor, dim: int = -1, dtype: torch.dtype = FP8_DTYPE
) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per slice reduced over `dim` -> (q like x, scale with `dim` kept as size 1).

    Weight [N, K] with dim=-1 -> scale [N, 1] (per output channel);
    activation [M, K] with dim=-1 -> scale [M, 1] (per token).
    """
    amax = x.detach().abs().amax(dim=dim, keepdim=True).to(torch.float32)  # [..., 1]
    scale = amax_to_scale(amax, dtype)
    return to_fp8_saturated(x, scale, dtype), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x ~= q * scale, computed in float32 then cast to `dtype` (exact reference path)."""
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


@torch.no_grad()
def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB: 20*log10(||ref|| / ||ref - out||), in float64.

    Returns +inf when out == ref exactly. Shapes must match.
    """
    if ref.shape != out.shape:
        raise ValueError(f"fp8/scaling.py sqnr: shape mismatch {tuple(ref.shape)} vs {tuple(out.shape)}")
    r = ref.detach().to(torch.float64)
    signal = torch.linalg.vector_norm(r).item()
    noise = torch.linalg.vector_norm(r - out.detach().to(torch.float64)).item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 20.0 * math.log10(signal / noise)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, granularity: str = "channel", clip: float | torch.Tensor = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (q fp8 [N, K], scale [N, 1] or []) with amax clipped by `clip` (<= 1: saturates outliers)."""
    w32 = w.to(torch.float32)
    amax = w32.abs().amax(dim=-1, keepdim=True) if granularity == "channel" else w32.abs().amax()
    clip_t = torch.as_tensor(clip, dtype=torch.float32, device=w32.device)
    if granularity == "tensor" and clip_t.ndim:
        raise InputError("quantize_weight: a per-channel clip needs granularity 'channel'")
    scale = amax_to_scale(amax * clip_t.reshape(-1, 1) if clip_t.ndim else amax * clip_t)
    return to_fp8_saturated(w32, scale), scale
