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


def _torch(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    s = scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(())
    return weight.to(dtype) * s.to(dtype)


if triton is not None:

    @triton.jit
    def _dequant_kernel(W, S, OUT, N, K, PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        off = rn[:, None].to(tl.int64) * K + rk[None, :]
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
    _dequant_kernel[grid](weight, s, out, n, k, PER_ROW=per_row, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=8)
    return out
