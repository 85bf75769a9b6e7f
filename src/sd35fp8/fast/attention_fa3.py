"""FlashAttention-3's FP8 forward as the fast step's joint attention: attention kind "fa3_fp8" (auto's pick).

    MMDiTEngine(model, "dynamic", attention_backend="fa3_fp8")    # or build_engine(..., attention_backend=...)

FA3 is a library kernel (the optional module `flash_attn_interface`, e.g. PyPI `tokenspeed-fa3`: CUDA 13, Hopper);
it overlaps one warp group's softmax with another's MMAs, which our Triton kernel (fast/attention_triton.py) cannot
express on sm_90. `auto` (fast/weights.py auto_attention) picks it in dynamic mode where it is installed: the Large
step 73.32 against 75.30 ms with our kernel, the same SQNR (H200, docs/PERF.md session 26: `benchmarks/faster.py`
times both in one process).

Numerics: our quantise pass as it is (attention_triton._quantize: qk RMS-norm fused, Hadamard-rotated q and k,
one e4m3 scale per (batch, head), q / k from their norm bound, v from its amax), V written [B, H, Lp, D] (D
contiguous, as FA3 takes it); FA3 runs on [B, L, H, D] views of those codes with the scales as its descales and
rounds P to e4m3 its own way; one bf16 output [B, L, C] (ctx rows first), which the proj linears' per-token
quantise pass reads in place, one window of rows for each (fast/kernels.py plain_act_window; fast/step.py
`_fp8_attention`). Dynamic mode only: static mode and calibration take the Triton kernel.
"""

from __future__ import annotations

import math

import torch

from sd35fp8.errors import DeviceError
from sd35fp8.fast import attention_triton as at

KIND = "fa3_fp8"
INSTALL = "pip install tokenspeed-fa3 (FlashAttention-3 for CUDA 13, Hopper)"


_IMPORT_ERROR: list[str] = []  # why flash_attn_interface did not import (for check's message)


def _module():
    try:
        import flash_attn_interface
    except Exception as err:  # noqa: BLE001  ImportError, or its extension failing to load or register its ops
        _IMPORT_ERROR[:] = [f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"]
        return None
    return flash_attn_interface


def available(device: torch.device | str) -> bool:
    """FA3's FP8 forward can run here: a Hopper GPU (sm_90), Triton (our quantise pass), flash_attn_interface."""
    device = torch.device(device)
    return (device.type == "cuda" and at.triton is not None and torch.cuda.get_device_capability(device) == (9, 0)
            and _module() is not None)


def check(device: torch.device | str) -> None:
    """DeviceError naming what is missing when `available(device)` is False."""
    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        raise DeviceError(f"attention {KIND!r}: FlashAttention-3's FP8 forward runs on Hopper GPUs (sm_90) only, "
                          f"not on {device}")
    if at.triton is None or _module() is None:
        why = f": {_IMPORT_ERROR[0]}" if _IMPORT_ERROR else ""
        raise DeviceError(f"attention {KIND!r}: flash_attn_interface is not importable ({INSTALL}){why}")


@torch.library.custom_op("sd35fp8::joint_attention_fa3", mutates_args=())
def joint_attention_fa3_op(qkv_ctx: torch.Tensor, qkv_x: torch.Tensor, n_ctx: int, heads: int,
                           wq_ctx: torch.Tensor | None, wk_ctx: torch.Tensor | None,
                           wq_x: torch.Tensor | None, wk_x: torch.Tensor | None) -> torch.Tensor:
    """attention_triton.joint_attention_fp8_op's inputs (dynamic scales) on FA3's FP8 forward:
    qkv_ctx [B, Lc, 3*C], qkv_x [B, Lx, 3*C] -> o [B, Lc + Lx, C] bf16, ctx rows first (n_ctx = Lc; 0 with
    qkv_ctx = qkv_x: self-attention over x alone)."""
    ctx, x, norms = at._joint_split(qkv_ctx, qkv_x, n_ctx, heads, wq_ctx, wk_ctx, wq_x, wk_x)
    q8, k8, v8, scale, length = at._quantize(ctx, x, norms, hadamard=True, v_transposed=False)
    b, h, _, d = q8.shape
    view = lambda t: t[:, :, :length].transpose(1, 2)  # noqa: E731  [B, L, H, D] views, D contiguous
    out = _module().flash_attn_func(view(q8), view(k8), view(v8), softmax_scale=1.0 / math.sqrt(d),
                                    q_descale=scale[0], k_descale=scale[1], v_descale=scale[2])
    return (out[0] if isinstance(out, tuple) else out).reshape(b, length, h * d)  # [B, L, C]


@joint_attention_fa3_op.register_fake
def _(qkv_ctx, qkv_x, n_ctx, heads, wq_ctx, wk_ctx, wq_x, wk_x):
    B, L, C3 = qkv_x.shape
    return qkv_x.new_empty(B, n_ctx + L, C3 // 3)
