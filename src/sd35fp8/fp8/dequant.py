"""Weight-only FP8: the 16-bit weight W = weight * weight_scale in one pass.

    w16 = dequantize(weight, weight_scale, torch.bfloat16)   # weight fp8 [N, K], scale [] / [N, 1] / [1, N]

Torch writes it in two passes (cast to bf16, then multiply: 8 + 16 GB read and 16 + 16 GB written per
step on SD3.5 Large); the Triton kernel reads the fp8 bytes once and writes the bf16 copy once
(8 + 16 GB). Same result bit for bit: torch casts both factors to the 16-bit dtype and multiplies
(exact product in fp32, rounded once); the kernel does the same (fp8 -> 16-bit is exact).
Triton eager on CUDA; torch ops on CPU and under torch.compile (Inductor fuses them itself).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None

_BLOCK_N, _BLOCK_K = 8, 1024
NATIVE_E4M3_CC = (8, 9)  # Triton's fp8e4nv type needs sm_89+ ("not supported in this architecture" below)


def e4m3_operand(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """An e4m3 tensor as our Triton kernels take it on t's GPU -> (tensor, bits): itself on sm_89+; its bytes
    (a uint8 view, bits True) on older GPUs (RTX 30x0, A100: weight_only mode), which the kernels decode with
    `e4m3_bits_to_f32`, as Triton cannot load fp8e4nv there."""
    if t.dtype == torch.float8_e4m3fn and t.is_cuda and torch.cuda.get_device_capability(t.device) < NATIVE_E4M3_CC:
        return t.view(torch.uint8), True
    return t, False


def _torch(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
    return weight.to(dtype) * s.to(dtype)


if triton is not None:

    @triton.jit
    def e4m3_bits_to_f32(x):
        """float8_e4m3fn codes given as uint8 -> their fp32 values, exactly (integer ops: no fp8 type needed).
        Normal: 2^(e-7) (1 + m/8) -> fp32 exponent e + 120, mantissa m << 20; subnormal (e = 0): m 2^-9. The NaN
        codes (0x7f, 0xff) are not decoded as NaN (quantised weights hold none)."""
        b = x.to(tl.int32)
        e = (b >> 3) & 15
        m = b & 7
        normal = (((b & 128) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125
        sub = tl.where(b >= 128, -sub, sub)
        return tl.where(e == 0, sub, normal)

    @triton.jit
    def _dequant_kernel(W, S, OUT, N, K, PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        W_BITS: tl.constexpr = False):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        off = rn[:, None].to(tl.int64) * K + rk[None, :]
        if W_BITS:  # e4m3 codes as uint8 (e4m3_operand: GPUs before sm_89)
            w = e4m3_bits_to_f32(tl.load(W + off, mask=mask, other=0))  # [BN, BK], exact
        else:
            w = tl.load(W + off, mask=mask, other=0.0).to(tl.float32)  # [BN, BK], exact
        if PER_ROW:  # the scale rounded to the 16-bit dtype first, as torch's `scale.to(dtype)`
            s = tl.load(S + rn, mask=rn < N, other=0.0).to(OUT.dtype.element_ty).to(tl.float32)[:, None]  # [BN, 1]
        else:
            s = tl.load(S).to(OUT.dtype.element_ty).to(tl.float32)
        tl.store(OUT + off, (w * s).to(OUT.dtype.element_ty), mask=mask)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight fp8 [N, K] (contiguous), scale [] or N values -> weight * scale in `dtype` [N, K]."""
    if triton is None or not weight.is_cuda or torch.compiler.is_compiling() or not weight.is_contiguous():
        return _torch(weight, scale, dtype)
    n, k = weight.shape
    out = torch.empty(n, k, device=weight.device, dtype=dtype)
    per_row = scale.numel() > 1
    s = scale.reshape(-1).contiguous() if per_row else scale.reshape(1)
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(k, _BLOCK_K))
    weight, bits = e4m3_operand(weight)
    _dequant_kernel[grid](weight, s, out, n, k, PER_ROW=per_row, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, W_BITS=bits,
                          num_warps=8)
    return out
