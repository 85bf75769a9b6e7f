"""Flash-attention forward in Triton, BF16 and FP8 (E4M3), for the MMDiT joint attention.

    triton_attention(q, k, v, fp8=False)   q, k, v [B, L, H, D] -> [B, L, H*D]   (same contract as
                                           fast/attention.py `sdpa`: non-causal, no mask, scale 1/sqrt(D))
    quantize_qkv(q, k, v) -> QKV8          the FP8 path's quantisation pass alone
    attention_fp8(qkv8, out_dtype)         the FP8 path's attention kernel alone

One kernel (`_attn_fwd`) serves both paths: grid (cdiv(L, BLOCK_M), B*H); each program keeps a
[BLOCK_M, D] query tile and streams K / V in [BLOCK_N, D] tiles with the online softmax in fp32
(exp2, the log2(e) folded into the score scale). The last key block is the only masked one (keys
>= L get score -inf), so L need not be a multiple of the block size (SD3.5: 4096 + 154 or 333).

BF16 path: q, k, v are read in place through their strides ([B, L, H, D] views of the qkv matmul
output, D contiguous); P is cast to bf16 for the P @ V matmul, like flash-attention.

FP8 path numerics (`quantize_qkv`, one Triton amax pass + one quantise pass over q, k, v):
  * q, k, v are each quantised with one scale per (batch, head): s = amax / 448 (fp8/scaling.py's
    convention, x ~= x8 * s), x8 = clamp(x / s, -448, 448) as float8_e4m3fn (round to nearest).
  * S = Q K^T runs on fp8 tensor cores with fp32 accumulation; s_q * s_k * sm_scale * log2(e) is one
    scalar per program, folded into the score scale, so the dequantisation costs nothing.
  * P = exp2(S - m) lies in [0, 1]: cast as is, values below 2^-6 would be e4m3 subnormals and below
    2^-10 zero. The kernel computes P * 256 instead (exp2(S - (m - 8)): a shift of the running max,
    free), so P8 spans [0, 256] and values down to 2^-14 keep 3 mantissa bits. The row sum l is
    accumulated from the same scaled P, so the 256 cancels in O = acc / l with no extra work.
  * O = (P8 @ V8) * s_v / l: s_v is applied once in the epilogue. Each block's P8 @ V8 starts from a
    zero accumulator and is added to the running fp32 acc outside the MMA, so Hopper's reduced-
    precision fp8 accumulation only ever spans one block (BLOCK_N products).
  * Layouts written by the quantisation pass, L padded with zeros to Lp = a multiple of 128 (so the
    kernel's K / V loads need no masks and V^T rows are 16-byte aligned):
        q8, k8 [B, H, Lp, D]    D contiguous (K-major operands of Q @ K^T)
        v8t    [B, H, D, Lp]    V transposed: fp8 wgmma on Hopper wants the B operand of P @ V
                                K-major, i.e. contiguous along L (as the Triton fused-attention
                                tutorial does for fp8).
Block sizes are autotuned (BLOCK_M 64/128, BLOCK_N 64/128, 4/8 warps, 2-4 stages), keyed on L, D
and the path. Runs on CUDA with Triton only (fp8 needs sm_89+); anything else raises DeviceError.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from sd35fp8.errors import DeviceError, InputError
from sd35fp8.fp8.scaling import FP8_DTYPE, amax_to_scale

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None

HEAD_DIMS = (32, 64, 128)
IN_DTYPES = (torch.bfloat16, torch.float16)
PAD = 128  # fp8 layouts pad L to a multiple of this (>= every BLOCK_M / BLOCK_N below)
P_LOG2_SCALE = 8.0  # fp8 path: P is computed as P * 2**8 before the e4m3 cast
_LOG2E = 1.4426950408889634
_QUANT_BLOCK_L = 128
# Interpreter checks only (TRITON_INTERPRET=1, CPU tensors): set _ALLOW_CPU = True; CPU launches use the
# fixed block sizes below (the autotuner needs a GPU to time configs). Never set by library code or tests.
_ALLOW_CPU = False
_CPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}


class QKV8(NamedTuple):
    """Output of `quantize_qkv`: fp8 q, k, V^T padded to Lp rows, and their dequantisation scales."""

    q: torch.Tensor  # [B, H, Lp, D] float8_e4m3fn, rows >= length are 0
    k: torch.Tensor  # [B, H, Lp, D] float8_e4m3fn
    vt: torch.Tensor  # [B, H, D, Lp] float8_e4m3fn (V transposed)
    scale: torch.Tensor  # [3, B, H] fp32: s_q, s_k, s_v with x ~= x8 * s
    length: int  # L, the real sequence length


# ---------------------------------------------------------------------------------- Triton kernels
if triton is not None:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 2),
                             (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 3), (64, 128, 4, 3)]
    ]

    @triton.jit
    def _attn_block(acc, l_i, m_i, q, k_base, v_base, start_n, L, qk_scale, skn, svn, svd,
                    offs_n0, offs_d, FP8: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
        """One key block: acc [BM, D], l_i / m_i [BM] (log2 domain) updated with keys start_n + [0, BN)."""
        offs_n = start_n + offs_n0  # [BN]
        kmask = offs_n < L
        if FP8 or not MASKED:  # fp8 layouts are zero-padded to Lp: loads never need a mask
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :])  # [BN, D]
        else:
            k = tl.load(k_base + offs_n[:, None] * skn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k))  # [BM, BN] fp32 (fp8 or bf16 tensor cores)
        if MASKED:
            qk = tl.where(kmask[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # [BM]
        if FP8:  # P * 256 = exp2(S - (m - 8)): keeps small probabilities out of e4m3 subnormals
            p = tl.math.exp2(qk * qk_scale - (m_ij - 8.0)[:, None])  # [BM, BN] in [0, 256]
        else:
            p = tl.math.exp2(qk * qk_scale - m_ij[:, None])  # [BM, BN] in [0, 1]
        alpha = tl.math.exp2(m_i - m_ij)  # [BM]
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:
            v = tl.trans(tl.load(v_base + offs_d[:, None] * svd + offs_n[None, :]))  # [D, BN] -> [BN, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float8e4nv), v)  # fresh fp8 MMA acc per block
        else:
            if MASKED:
                v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kmask[:, None], other=0.0)
            else:
                v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :])  # [BN, D]
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, l_i, m_ij

    @triton.jit
    def _attn_fwd(Q, K, V, O, SCALE, sm_scale_log2e,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, svd, sob, soh, som,
                  H, L, HEAD_DIM: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """O[b, m, h, :] = softmax(q k^T * scale) v for one [BLOCK_M] query tile of one (b, h).

        bf16: Q, K, V [B, L, H, D] strided. fp8: Q, K [B, H, Lp, D], V = V^T [B, H, D, Lp], SCALE [3, B*H].
        O [B, L, H, D] (the [B, L, H*D] output). Strides are in elements; D is contiguous everywhere.
        """
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
        offs_n0 = tl.arange(0, BLOCK_N)  # [BN]
        offs_d = tl.arange(0, HEAD_DIM)  # [D]
        q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :]  # [BM, D]
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        qk_scale = sm_scale_log2e
        if FP8:
            q = tl.load(q_ptrs)  # padded rows are zeros
            nbh = tl.num_programs(1)
            qk_scale = qk_scale * tl.load(SCALE + bh) * tl.load(SCALE + nbh + bh)  # * s_q * s_k
        else:
            q = tl.load(q_ptrs, mask=offs_m[:, None] < L, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = (L // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, n_full, BLOCK_N):  # full blocks: no masks
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base, v_base, start_n, L, qk_scale, skn, svn, svd,
                                        offs_n0, offs_d, FP8, False, BLOCK_N)
        for start_n in range(n_full, L, BLOCK_N):  # the tail block (0 or 1 iteration)
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base, v_base, start_n, L, qk_scale, skn, svn, svd,
                                        offs_n0, offs_d, FP8, True, BLOCK_N)
        out = acc / l_i[:, None]  # [BM, D]
        if FP8:
            out = out * tl.load(SCALE + 2 * tl.num_programs(1) + bh)  # * s_v
        o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < L)

    _attn_fwd_tuned = triton.autotune(_CONFIGS, key=["L", "HEAD_DIM", "FP8"])(_attn_fwd)

    @triton.jit
    def _tile(X, b, h, sb, sh, sl, offs_l, offs_d, L):
        """[BL, D] fp32 tile of X[b, l, h, :] for l in offs_l (zeros for l >= L)."""
        ptrs = X + b * sb + h * sh + offs_l[:, None] * sl + offs_d[None, :]
        return tl.load(ptrs, mask=offs_l[:, None] < L, other=0.0).to(tl.float32)

    @triton.jit
    def _amax_kernel(Q, K, V, AMAX, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, H, L,
                     HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr):
        """AMAX [3, B*H] (zero-initialised) <- max |x| over each (b, h) of q, k, v."""
        bh = tl.program_id(1)
        nbh = tl.num_programs(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        offs_d = tl.arange(0, HEAD_DIM)
        tl.atomic_max(AMAX + bh, tl.max(tl.abs(_tile(Q, b, h, sqb, sqh, sql, offs_l, offs_d, L))))
        tl.atomic_max(AMAX + nbh + bh, tl.max(tl.abs(_tile(K, b, h, skb, skh, skl, offs_l, offs_d, L))))
        tl.atomic_max(AMAX + 2 * nbh + bh, tl.max(tl.abs(_tile(V, b, h, svb, svh, svl, offs_l, offs_d, L))))

    @triton.jit
    def _to_e4m3(x, s):
        return tl.clamp(x / s, -448.0, 448.0).to(tl.float8e4nv)

    @triton.jit
    def _quant_kernel(Q, K, V, Q8, K8, V8T, SCALE, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, H, L, LP,
                      HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr):
        """q8, k8 [B, H, Lp, D] and v8t [B, H, D, Lp] <- clamp(x / s) as e4m3; grid covers Lp (pads = 0)."""
        bh = tl.program_id(1)
        nbh = tl.num_programs(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
        offs_d = tl.arange(0, HEAD_DIM)  # [D]
        row = bh.to(tl.int64) * LP * HEAD_DIM + offs_l[:, None] * HEAD_DIM + offs_d[None, :]  # [BL, D]
        q = _to_e4m3(_tile(Q, b, h, sqb, sqh, sql, offs_l, offs_d, L), tl.load(SCALE + bh))
        tl.store(Q8 + row, q)
        k = _to_e4m3(_tile(K, b, h, skb, skh, skl, offs_l, offs_d, L), tl.load(SCALE + nbh + bh))
        tl.store(K8 + row, k)
        v = _to_e4m3(_tile(V, b, h, svb, svh, svl, offs_l, offs_d, L), tl.load(SCALE + 2 * nbh + bh))
        col = bh.to(tl.int64) * HEAD_DIM * LP + offs_d[:, None] * LP + offs_l[None, :]  # [D, BL]
        tl.store(V8T + col, tl.trans(v))


# ---------------------------------------------------------------------------------- checks
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool) -> None:
    where = "fast/attention_triton.py"
    if triton is None:
        raise DeviceError(f"{where}: Triton is not installed (CPU build of torch?); use fast.attention.sdpa")
    if not q.is_cuda and not _ALLOW_CPU:
        raise DeviceError(f"{where}: needs CUDA tensors (got {q.device}; "
                          f"CUDA available: {torch.cuda.is_available()}); use fast.attention.sdpa")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise InputError(f"{where}: q, k, v must be [B, L, H, D] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise InputError(f"{where}: head_dim {q.shape[-1]} not in {HEAD_DIMS}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in IN_DTYPES:
        raise InputError(f"{where}: q, k, v dtype must be one of {IN_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"{where}: q, k, v on different devices ({q.device}, {k.device}, {v.device})")
    if fp8 and q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        cap = torch.cuda.get_device_capability(q.device)
        raise DeviceError(f"{where}: fp8 tensor-core dot needs sm_89+, {torch.cuda.get_device_name(q.device)} "
                          f"is sm_{cap[0]}{cap[1]}")


def _d_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------- public ops
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool = False) -> torch.Tensor:
    """q, k, v [B, L, H, D] bf16/fp16 (any strides, D contiguous) -> [B, L, H*D] in q's dtype.

    Non-causal softmax(q k^T / sqrt(D)) v. fp8=True: q, k, v quantised per (batch, head) to e4m3
    and both matmuls on fp8 tensor cores (module docstring); fp8=False: bf16 flash attention.
    """
    _check(q, k, v, fp8)
    q, k, v = _d_contiguous(q), _d_contiguous(k), _d_contiguous(v)
    if fp8:
        return attention_fp8(quantize_qkv(q, k, v), q.dtype)
    B, L, H, D = q.shape
    out = torch.empty(B, L, H * D, device=q.device, dtype=q.dtype)  # [B, L, H*D] = [B, L, H, D]
    _launch(q, k, v, out, out, (q.stride(0), q.stride(2), q.stride(1)), (k.stride(0), k.stride(2), k.stride(1)),
            (v.stride(0), v.stride(2), v.stride(1), 1), B, H, L, D, fp8=False)
    return out


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> QKV8:
    """q, k, v [B, L, H, D] (D contiguous) -> QKV8 (per-(batch, head) e4m3, V transposed, L padded)."""
    _check(q, k, v, fp8=True)
    q, k, v = _d_contiguous(q), _d_contiguous(k), _d_contiguous(v)
    B, L, H, D = q.shape
    lp = triton.cdiv(L, PAD) * PAD
    strides = [s for x in (q, k, v) for s in (x.stride(0), x.stride(2), x.stride(1))]
    amax = torch.zeros(3, B * H, device=q.device, dtype=torch.float32)  # [3, B*H]
    _amax_kernel[(triton.cdiv(L, _QUANT_BLOCK_L), B * H)](q, k, v, amax, *strides, H, L, HEAD_DIM=D,
                                                           BLOCK_L=_QUANT_BLOCK_L, num_warps=4)
    scale = amax_to_scale(amax)  # [3, B*H], amax / 448
    q8 = torch.empty(B, H, lp, D, device=q.device, dtype=FP8_DTYPE)
    k8 = torch.empty(B, H, lp, D, device=q.device, dtype=FP8_DTYPE)
    v8t = torch.empty(B, H, D, lp, device=q.device, dtype=FP8_DTYPE)
    _quant_kernel[(lp // _QUANT_BLOCK_L, B * H)](q, k, v, q8, k8, v8t, scale, *strides, H, L, lp, HEAD_DIM=D,
                                                  BLOCK_L=_QUANT_BLOCK_L, num_warps=4)
    return QKV8(q8, k8, v8t, scale.view(3, B, H), L)


def attention_fp8(qkv8: QKV8, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The fp8 attention kernel on already-quantised inputs -> [B, L, H*D] in out_dtype."""
    q8, k8, v8t, scale, L = qkv8
    B, H, lp, D = q8.shape
    out = torch.empty(B, L, H * D, device=q8.device, dtype=out_dtype)
    _launch(q8, k8, v8t, out, scale, q8.stride()[:3], k8.stride()[:3], (*v8t.stride()[:2], 1, v8t.stride(2)),
            B, H, L, D, fp8=True)
    return out


def _launch(q, k, v, out, scale, sq, sk, sv, B, H, L, D, fp8: bool) -> None:
    """sq, sk: (batch, head, seq) strides; sv: (batch, head, seq, dim) strides; out [B, L, H*D]."""
    args = (q, k, v, out, scale, _LOG2E / math.sqrt(D), *sq, *sk, *sv, L * H * D, D, H * D, H, L)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    if q.is_cuda:
        _attn_fwd_tuned[grid](*args, HEAD_DIM=D, FP8=fp8)
    else:  # interpreter checks only (_ALLOW_CPU)
        _attn_fwd[grid(_CPU_CONFIG)](*args, HEAD_DIM=D, FP8=fp8, **_CPU_CONFIG)
