"""Attention of the fast MMDiT step: SDPA on [B, L, H, D] layouts, backend choice, FP8 probe.

q, k, v come out of the qkv matmul as views of one [B, L, 3, H, D] tensor; SDPA takes the
[B, H, L, D] *views* (`transpose(1, 2)`, no copy; flash and cuDNN accept a strided head axis),
and flash / cuDNN write their output in the query's [B, L, H, D] order, so the reshape to
[B, L, H*D] for the projection is free.

Backend: `backend_context(name)` pins one SDPA backend for a whole forward (eager and while
torch.compile traces, which is when the compiled graph picks its kernel). Measured on H100 at
SD3.5 Large shapes (REFERENCE.md): cuDNN ~400 TFLOP/s vs flash ~273, so "cudnn" is the default on
CUDA; on CPU no backend is pinned.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sd35fp8.errors import InputError

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def default_backend(device: torch.device) -> str | None:
    return "cudnn" if device.type == "cuda" else None


@contextlib.contextmanager
def backend_context(name: str | None) -> Iterator[None]:
    """Pin SDPA to one backend (None: torch's own choice). Unknown names raise InputError."""
    if name is None:
        yield
        return
    if name not in BACKENDS:
        raise InputError(f"fast/attention.py: SDPA backend {name!r} not in {sorted(BACKENDS)}")
    with sdpa_kernel([BACKENDS[name]]):
        yield


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v [B, L, H, D] (any strides with D contiguous) -> [B, L, H*D]."""
    B, L, H, D = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, L, D]
    return out.transpose(1, 2).reshape(B, L, H * D)


TRITON_KINDS = ("triton", "triton_fp8")  # our Triton flash attention (fast/attention_triton.py), bf16 / fp8
EMULATED_KINDS = ("fp8_emulated",)  # the FP8 kernel's numerics in torch ops (CPU / no Triton; slow, exact spec)
# FlashAttention-3's FP8 forward (fast/attention_fa3.py; auto's pick in dynamic mode where installed; joint attention)
LIBRARY_KINDS = ("fa3_fp8",)
ATTENTION_CHOICES = ("auto", "fp8", "bf16")  # build_engine(attention=...), --attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str = "sdpa") -> torch.Tensor:
    """q, k, v [B, L, H, D] -> [B, L, H*D] by SDPA (backend pinned by backend_context) or our Triton kernel."""
    if kind == "sdpa":
        return sdpa(q, k, v)
    if kind == "fp8_emulated":
        from sd35fp8.fast.attention_triton import fp8_attention_emulated  # [B, L, H*D] fp32

        return fp8_attention_emulated(q, k, v).to(q.dtype)
    if kind not in TRITON_KINDS:
        raise InputError(f"fast/attention.py: attention kind {kind!r} not in "
                         f"{('sdpa',) + TRITON_KINDS + EMULATED_KINDS}")
    from sd35fp8.fast.attention_triton import triton_attention_op  # a custom op: opaque to torch.compile

    return triton_attention_op(q, k, v, kind == "triton_fp8")


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> float:
    """QK^T and PV matmuls: 4 * B * H * Lq * Lkv * D."""
    return 4.0 * batch * heads * q_len * kv_len * head_dim


@torch.no_grad()
def probe_fp8_sdpa(device: torch.device | str, length: int = 256, heads: int = 2) -> dict:
    """Does this torch build run SDPA on float8_e4m3fn q, k, v?  -> {"ok": bool, "detail": str, ...}.

    torch 2.11 exposes no FP8 attention through SDPA (cuDNN's FP8 SDPA is not wired up); this
    records what the installed build answers instead of assuming it.
    """
    dev = torch.device(device)
    q = torch.randn(1, heads, length, 64, device=dev)
    ref = F.scaled_dot_product_attention(q, q, q)
    q8 = q.to(torch.float8_e4m3fn)
    try:
        out = F.scaled_dot_product_attention(q8, q8, q8)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
        return {"ok": False, "detail": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    from sd35fp8.fp8.scaling import sqnr

    return {"ok": True, "detail": f"output dtype {out.dtype}", "sqnr_db": sqnr(ref, out.float())}
