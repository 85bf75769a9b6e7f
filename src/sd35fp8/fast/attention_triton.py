"""Flash-attention forward in Triton, BF16 and FP8 (E4M3), for the MMDiT joint attention.

    triton_attention(q, k, v, fp8=False)   q, k, v [B, L, H, D] -> [B, L, H*D]   (same contract as
                                           fast/attention.py `sdpa`: non-causal, no mask, scale 1/sqrt(D))
    quantize_qkv(q, k, v) -> QKV8          the FP8 path's quantisation pass alone
    attention_fp8(qkv8, out_dtype)         the FP8 path's attention kernel alone
    fp8_attention_emulated(q, k, v)        the FP8 path's numerics in plain torch (spec for tests)

One kernel (`_attn_fwd`) serves both paths: grid (cdiv(L, BLOCK_M), B*H); each program keeps a
[BLOCK_M, D] query tile and streams K / V in [BLOCK_N, D] tiles with the online softmax in fp32
(exp2, log2(e) folded into the score scale). Only the last key block is masked (keys >= L get score
-inf), so L need not be a multiple of the block size (SD3.5: 4096 + 154 or 333 tokens).

BF16 path: q, k, v are read in place through their strides ([B, L, H, D] views of the qkv matmul
output, D contiguous); P is cast to bf16 for P @ V, as in flash-attention.

FP8 path numerics (`quantize_qkv`: one Triton amax pass + one quantise pass over q, k, v):
  * Hadamard rotation (hadamard=True, default): q and k are multiplied by the orthonormal D x D
    Hadamard matrix first (exact bf16 MMA against +-1, then * 1/sqrt(D)). q k^T is unchanged, but a
    few large channels (real activations have them) get spread over all D, so the e4m3 rounding
    error of a score is no longer dominated by two channels: ~ +10 dB SQNR with 20x outliers in
    2 of 64 dims, no change on randn (FlashAttention-3's "incoherent processing"). V is not rotated.
  * q, k, v are each quantised with one scale per (batch, head): s = amax / 448 (fp8/scaling.py's
    convention, x ~= x8 * s), x8 = clamp(x / s, -448, 448) as float8_e4m3fn (round to nearest even).
    In the joint op with qk RMS-norm, q's and k's amax is their bound sqrt(D) * max|w| x1.01
    (`qk_norm_bound`: no entry of a normed, rotated row can exceed it), so the amax pass reads v alone;
    e4m3's relative precision is the same over its normal range, so the headroom costs no accuracy
    (Large step SQNR vs float32 28.96 dB, 28.95 with the measured amax).
  * S = Q8 K8^T on fp8 tensor cores, fp32 accumulation; s_q * s_k * log2(e) / sqrt(D) is one scalar
    per program folded into the score scale, so dequantising S costs nothing.
  * P = exp2(S - m) lies in [0, 1]: cast as is, values below 2^-6 would be e4m3 subnormals and below
    2^-10 zero. The kernel computes P * 256 instead (exp2(S - (m - 8)), a shift of the running max,
    free), so P8 spans [0, 256] and values down to 2^-14 keep 3 mantissa bits. The row sum l is
    accumulated from the same scaled P (fp32, before the cast), so the 256 cancels in acc / l.
  * exp2 is the MUFU's ex2.approx.ftz (no subnormal fix-up: 3 % faster on the H100; below 2^-126 P is
    0 either way, and e4m3 flushes below 2^-9 anyway); SD35FP8_ATTN_EXP=mufu / split pick tl.math.exp2
    or a half-MUFU, half-polynomial split (measured slower at head dim 64: `exp_mode`).
  * O = (P8 @ V8) * s_v / l: s_v is applied once in the epilogue. (Hopper's fp8 MMA accumulates with
    reduced precision, ~2^-14 relative: far below the e4m3 rounding of its inputs, ~2^-4.)
  * Expected accuracy (torch emulation, L = 200..4429, D = 64): ~25.5 dB SQNR on randn q, k, v
    (QK ~28 dB, V ~31 dB, P ~32 dB each alone); bf16 flash attention is ~53 dB (its bf16 output).
  * Layouts written by the quantisation pass, L zero-padded to Lp = a multiple of 128 (the kernel's
    K / V loads need no masks and V^T rows are 16-byte aligned):
        q8, k8 [B, H, Lp, D]    D contiguous (K-major operands of Q @ K^T)
        v8t    [B, H, D, Lp]    V transposed: Hopper's fp8 wgmma wants the B operand of P @ V
                                K-major, i.e. contiguous along L (as in Triton's fused-attention tutorial).
Block sizes are pinned on sm_90 at head dim 64 (`PINNED_CONFIGS`), else autotuned (BLOCK_M 64/128,
BLOCK_N 64/128, 4/8 warps, 2-4 stages), keyed on L, D and the path. Runs on CUDA with Triton only
(fp8 needs sm_89+); anything else raises DeviceError.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from sd35fp8.errors import DeviceError, InputError
from sd35fp8.fp8.scaling import FP8_DTYPE, amax_to_scale, to_fp8_saturated

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
    from triton.testing import do_bench
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None

HEAD_DIMS = (32, 64, 128)
IN_DTYPES = (torch.bfloat16, torch.float16)
PAD = 128  # fp8 layouts pad L to a multiple of this (>= every BLOCK_M / BLOCK_N below)
P_LOG2_SCALE = 8.0  # fp8 path: P is computed as P * 2**8 before the e4m3 cast
_LOG2E = 1.4426950408889634
# launch meta of the quantisation passes (BLOCK_L rows of one (batch, head) per program; BLOCK_L divides PAD):
# benchmarks/elementwise_configs.py sweeps them at Large's shapes
AMAX_LAUNCH = {"BLOCK_L": 64, "num_warps": 4}
QUANT_LAUNCH = {"BLOCK_L": 64, "num_warps": 4}
QK_BOUND_MARGIN = 1.01  # `qk_norm_bound`: headroom for the bf16 rounding of a normed row
# Interpreter checks only (TRITON_INTERPRET=1, CPU tensors): set _ALLOW_CPU = True; CPU launches use the
# fixed block sizes below (the autotuner needs a GPU to time configs). Never set by library code or tests.
_ALLOW_CPU = False
_CPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}


class QKV8(NamedTuple):
    """Output of `quantize_qkv`: fp8 q, k, V^T padded to Lp rows, and their dequantisation scales."""

    q: torch.Tensor  # [B, H, Lp, D] float8_e4m3fn, rows >= length are 0 (Hadamard-rotated if hadamard)
    k: torch.Tensor  # [B, H, Lp, D] float8_e4m3fn (idem)
    vt: torch.Tensor  # [B, H, D, Lp] float8_e4m3fn (V transposed)
    scale: torch.Tensor  # [3, B, H] fp32: s_q, s_k, s_v with x ~= x8 * s
    length: int  # L, the real sequence length


# ---------------------------------------------------------------------------------- Triton kernels
if triton is not None:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 2),
                             (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 3), (64, 128, 4, 3),
                             (64, 128, 4, 4), (128, 128, 4, 3)]
    ]

    def _bench_config(fn, quantiles):
        """Autotuner timing; a config that fails to compile or launch is timed +inf instead of aborting the
        tuning (if every config fails, the real launch raises)."""
        try:
            return do_bench(fn, warmup=10, rep=50, quantiles=quantiles)
        except Exception:  # noqa: BLE001
            return [float("inf")] * len(quantiles)

    @triton.jit
    def _exp2_ftz(x):
        """2^x by the MUFU (ex2.approx.ftz.f32: no subnormal fix-up around it)."""
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _exp2_poly(x):
        """2^x on the FMA / integer pipes (no MUFU), x <= 127: round x to j (the 1.5 * 2^23 add),
        2^(x - j) by a degree-3 polynomial on [-0.5, 0.5] (relative error 7.5e-5, far below the e4m3 /
        bf16 rounding of P), then j added to the float's exponent bits. Below -126: ~0."""
        x = tl.maximum(x, -126.0)
        t = x + 12582912.0  # 1.5 * 2^23: the low mantissa bits of t hold round(x)
        f = x - (t - 12582912.0)  # [-0.5, 0.5]
        p = ((0.05517165313653412 * f + 0.24261116150077797) * f + 0.6932609919253176) * f + 0.9999280713051514
        # (bits(t) << 23) == round(x) << 23 modulo 2^32 (the magic's own bits shift out)
        return (p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)).to(tl.float32, bitcast=True)

    @triton.jit
    def _exp2(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EXP: tl.constexpr):
        """2^x of a [BM, BN] tile. EXP 0: tl.math.exp2; 1: MUFU, ftz; 2: even columns on the MUFU, odd
        columns by _exp2_poly (the MUFU's 16 results / clock / SM bound a head-64 FP8 tile: half of the
        exponentials move to the FMA pipes, FA4's split)."""
        if EXP == 0:
            return tl.math.exp2(x)
        if EXP == 1:
            return _exp2_ftz(x)
        a, b = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_N // 2, 2)))
        return tl.reshape(tl.join(_exp2_ftz(a), _exp2_poly(b)), (BLOCK_M, BLOCK_N))

    @triton.jit
    def _attn_block(acc, l_i, m_i, q, k_base, v_base, start_n, L, qk_scale, skn, svn, svd, offs_n0, offs_d,
                    FP8: tl.constexpr, P_SHIFT: tl.constexpr, MASKED: tl.constexpr, EXP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """One key block: acc [BM, D], l_i / m_i [BM] (log2 domain) updated with keys start_n + offs_n0."""
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
        p = _exp2(qk * qk_scale - (m_ij - P_SHIFT)[:, None], BLOCK_M, BLOCK_N, EXP)  # [BM, BN] in [0, 2**P_SHIFT]
        alpha = tl.math.exp2(m_i - m_ij)  # [BM]
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP8:
            v = tl.trans(tl.load(v_base + offs_d[:, None] * svd + offs_n[None, :]))  # [D, BN] -> [BN, D]
        elif MASKED:
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :])  # [BN, D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        return acc, l_i, m_ij

    @triton.jit
    def _attn_fwd(Q, K, V, OC, OX, SCALE, OSCALE, SROWC, SROWX, sm_scale_log2e,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, svd, H, L, LC,
                  HEAD_DIM: tl.constexpr, FP8: tl.constexpr, P_SHIFT: tl.constexpr, OUT_MODE: tl.constexpr,
                  EXP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, H_P2: tl.constexpr = 64):
        """O[b, m, h, :] = softmax(q k^T / sqrt(D)) v for one [BLOCK_M] query tile of one (b, h).

        bf16: Q, K, V [B, L, H, D] strided. fp8: Q, K [B, H, Lp, D], V = V^T [B, H, D, Lp], SCALE [3, B*H].
        Output rows m < LC go to OC [B, LC, H*D], the others to OX [B, L - LC, H*D] (contiguous; LC = 0:
        OX is the whole output). Strides are in elements; D is contiguous (stride 1).
        OUT_MODE: 0 the outputs' dtype; 1 e4m3 x / s with OSCALE = [1/s_c, 1/s_x] (the proj linears' static
        input scales); 2 (fp8 only) e4m3 x / s_b with s_b = max over heads of s_v[b, :] (an output row is a
        convex combination of v rows, so |o| <= amax(v) = 448 s_v: never saturates, apart from P's rounding),
        and s_b written to SROWC [B*LC] / SROWX [B*(L-LC)] for the output rows (the proj GEMMs' row scales) by
        the h = 0 programs. H_P2 >= H (a power of 2).
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
            qk_scale = qk_scale * tl.load(SCALE + bh) * tl.load(SCALE + tl.num_programs(1) + bh)  # * s_q * s_k
        else:
            q = tl.load(q_ptrs, mask=offs_m[:, None] < L, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = (L // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, n_full, BLOCK_N):  # full blocks: no masks
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base, v_base, start_n, L, qk_scale, skn, svn, svd,
                                        offs_n0, offs_d, FP8, P_SHIFT, False, EXP, BLOCK_M, BLOCK_N)
        for start_n in tl.range(n_full, L, BLOCK_N, num_stages=1):  # the tail block (0 or 1 iteration)
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, k_base, v_base, start_n, L, qk_scale, skn, svn, svd,
                                        offs_n0, offs_d, FP8, P_SHIFT, True, EXP, BLOCK_M, BLOCK_N)
        in_c = offs_m < LC
        in_x = (offs_m >= LC) & (offs_m < L)
        if OUT_MODE == 2:  # e4m3 / s_b: s_v / s_b and 1 / l in one factor a row
            hs = tl.arange(0, H_P2)
            s_b = tl.max(tl.load(SCALE + 2 * tl.num_programs(1) + b * H + hs, mask=hs < H, other=0.0))
            f = tl.load(SCALE + 2 * tl.num_programs(1) + bh) / s_b / l_i  # [BM]
            out = tl.clamp(acc * f[:, None], -448.0, 448.0)
            if h == 0:
                sb = tl.full([BLOCK_M], 0.0, tl.float32) + s_b
                tl.store(SROWC + b * LC + offs_m, sb, mask=in_c)
                tl.store(SROWX + b * (L - LC) + (offs_m - LC), sb, mask=in_x)
        else:
            out = acc / l_i[:, None]  # [BM, D]
            if FP8:
                out = out * tl.load(SCALE + 2 * tl.num_programs(1) + bh)  # * s_v
            if OUT_MODE == 1:
                inv = tl.where(in_c, tl.load(OSCALE), tl.load(OSCALE + 1))  # [BM] 1 / s
                out = tl.clamp(out * inv[:, None], -448.0, 448.0)
        hd = H * HEAD_DIM
        col = h * HEAD_DIM + offs_d[None, :]
        tl.store(OC + b * LC * hd + offs_m[:, None] * hd + col, out.to(OC.dtype.element_ty), mask=in_c[:, None])
        tl.store(OX + b * (L - LC) * hd + (offs_m - LC)[:, None] * hd + col, out.to(OX.dtype.element_ty),
                 mask=in_x[:, None])

    _attn_fwd_tuned = triton.autotune(_CONFIGS, key=["L", "HEAD_DIM", "FP8", "EXP"], do_bench=_bench_config)(_attn_fwd)

    @triton.jit
    def _tile(XC, XX, WC, WX, b, h, scb, sch, scl, sxb, sxh, sxl, offs_l, offs_d, LC, L,
              HEAD_DIM: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr):
        """[BL, D] fp32 tile of the joint sequence [XC (rows < LC); XX (rows LC..L-1)] at (b, h); 0 for rows
        >= L. NORM: RMS-norm each row with weight WC / WX (as F.rms_norm, eps 1e-6, rounded to the input
        dtype); ROTATE != 0: then times H_D * ROTATE."""
        in_c = offs_l < LC
        x = tl.load(XC + b * scb + h * sch + offs_l[:, None] * scl + offs_d[None, :], mask=in_c[:, None], other=0.0)
        x += tl.load(XX + b * sxb + h * sxh + (offs_l - LC)[:, None] * sxl + offs_d[None, :],
                     mask=((offs_l >= LC) & (offs_l < L))[:, None], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            w = tl.where(in_c[:, None], tl.load(WC + offs_d).to(tl.float32)[None, :],
                         tl.load(WX + offs_d).to(tl.float32)[None, :])  # [BL, D]
            x = (xf * tl.rsqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + 1e-6)[:, None] * w).to(x.dtype)
        if ROTATE > 0.0:  # Sylvester Hadamard H[i, j] = (-1)^popcount(i & j), exact +-1; fp32 MMA acc
            bits = offs_d[:, None] & offs_d[None, :]  # [D, D]
            parity = tl.zeros_like(bits)
            for s in tl.static_range(7):  # D <= 128
                parity = parity ^ ((bits >> s) & 1)
            hm = tl.where(parity == 0, 1.0, -1.0).to(x.dtype)
            return tl.dot(x, hm) * ROTATE  # ROTATE = 1 / sqrt(D)
        return x.to(tl.float32)

    @triton.jit
    def _quant_program(H, HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr):
        """This program's (b*H + h, B*H, b, h, rows [BL], dims [D]) on the (L blocks, B*H) grid."""
        bh = tl.program_id(1)
        offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)  # [BL]
        return bh, tl.num_programs(1), (bh // H).to(tl.int64), (bh % H).to(tl.int64), offs_l, tl.arange(0, HEAD_DIM)

    @triton.jit
    def _qkv_tiles(QC, KC, VC, QX, KX, VX, WQC, WKC, WQX, WKX, b, h, offs_l, offs_d, LC, L,
                   sqcb, sqch, sqcl, skcb, skch, skcl, svcb, svch, svcl,
                   sqxb, sqxh, sqxl, skxb, skxh, skxl, svxb, svxh, svxl,
                   HEAD_DIM: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr):
        """The (normed, rotated) q and k tiles and the v tile, fp32 [BL, D] each."""
        q = _tile(QC, QX, WQC, WQX, b, h, sqcb, sqch, sqcl, sqxb, sqxh, sqxl, offs_l, offs_d, LC, L,
                  HEAD_DIM, NORM, ROTATE)
        k = _tile(KC, KX, WKC, WKX, b, h, skcb, skch, skcl, skxb, skxh, skxl, offs_l, offs_d, LC, L,
                  HEAD_DIM, NORM, ROTATE)
        v = _tile(VC, VX, WQC, WQX, b, h, svcb, svch, svcl, svxb, svxh, svxl, offs_l, offs_d, LC, L,
                  HEAD_DIM, False, 0.0)
        return q, k, v

    @triton.jit
    def _amax_kernel(QC, KC, VC, QX, KX, VX, WQC, WKC, WQX, WKX, AMAX,
                     sqcb, sqch, sqcl, skcb, skch, skcl, svcb, svch, svcl,
                     sqxb, sqxh, sqxl, skxb, skxh, skxl, svxb, svxh, svxl, H, LC, L,
                     HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr,
                     QK_BOUND: tl.constexpr = 0.0):
        """AMAX [3, B*H] (zero-initialised) <- max |x| over each (b, h) of (normed, rotated) q, k and v.
        QK_BOUND > 0 (needs NORM; = 1.01 * sqrt(D)): q and k are not read; their entry is the norm bound
        QK_BOUND * max|w| (`qk_norm_bound`), written by the first L-block's programs; only v is reduced."""
        bh, nbh, b, h, offs_l, offs_d = _quant_program(H, HEAD_DIM, BLOCK_L)
        if QK_BOUND > 0.0:
            if tl.program_id(0) == 0:
                wq = tl.maximum(tl.max(tl.abs(tl.load(WQC + offs_d).to(tl.float32))),
                                tl.max(tl.abs(tl.load(WQX + offs_d).to(tl.float32))))
                wk = tl.maximum(tl.max(tl.abs(tl.load(WKC + offs_d).to(tl.float32))),
                                tl.max(tl.abs(tl.load(WKX + offs_d).to(tl.float32))))
                tl.store(AMAX + bh, wq * QK_BOUND)
                tl.store(AMAX + nbh + bh, wk * QK_BOUND)
            v = _tile(VC, VX, WQC, WQX, b, h, svcb, svch, svcl, svxb, svxh, svxl, offs_l, offs_d, LC, L,
                      HEAD_DIM, False, 0.0)
        else:
            q, k, v = _qkv_tiles(QC, KC, VC, QX, KX, VX, WQC, WKC, WQX, WKX, b, h, offs_l, offs_d, LC, L,
                                 sqcb, sqch, sqcl, skcb, skch, skcl, svcb, svch, svcl,
                                 sqxb, sqxh, sqxl, skxb, skxh, skxl, svxb, svxh, svxl, HEAD_DIM, NORM, ROTATE)
            tl.atomic_max(AMAX + bh, tl.max(tl.abs(q)))
            tl.atomic_max(AMAX + nbh + bh, tl.max(tl.abs(k)))
        tl.atomic_max(AMAX + 2 * nbh + bh, tl.max(tl.abs(v)))

    @triton.jit
    def _to_e4m3(x, s):
        return tl.clamp(x / s, -448.0, 448.0).to(tl.float8e4nv)

    @triton.jit
    def _quant_kernel(QC, KC, VC, QX, KX, VX, WQC, WKC, WQX, WKX, Q8, K8, V8T, SCALE,
                      sqcb, sqch, sqcl, skcb, skch, skcl, svcb, svch, svcl,
                      sqxb, sqxh, sqxl, skxb, skxh, skxl, svxb, svxh, svxl, H, LC, L, LP,
                      HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr, NORM: tl.constexpr, ROTATE: tl.constexpr,
                      V_T: tl.constexpr = True):
        """q8, k8 [B, H, Lp, D] and v8t [B, H, D, Lp] <- clamp(x / s) as e4m3; grid covers Lp (pads = 0).
        V_T False: v8 [B, H, Lp, D] as q8 (in V8T's place; a library kernel taking V with D contiguous)."""
        bh, nbh, b, h, offs_l, offs_d = _quant_program(H, HEAD_DIM, BLOCK_L)
        q, k, v = _qkv_tiles(QC, KC, VC, QX, KX, VX, WQC, WKC, WQX, WKX, b, h, offs_l, offs_d, LC, L,
                             sqcb, sqch, sqcl, skcb, skch, skcl, svcb, svch, svcl,
                             sqxb, sqxh, sqxl, skxb, skxh, skxl, svxb, svxh, svxl, HEAD_DIM, NORM, ROTATE)
        row = bh.to(tl.int64) * LP * HEAD_DIM + offs_l[:, None] * HEAD_DIM + offs_d[None, :]  # [BL, D]
        tl.store(Q8 + row, _to_e4m3(q, tl.load(SCALE + bh)))
        tl.store(K8 + row, _to_e4m3(k, tl.load(SCALE + nbh + bh)))
        v = _to_e4m3(v, tl.load(SCALE + 2 * nbh + bh))
        if V_T:
            col = bh.to(tl.int64) * HEAD_DIM * LP + offs_d[:, None] * LP + offs_l[None, :]  # [D, BL]
            tl.store(V8T + col, tl.trans(v))
        else:
            tl.store(V8T + row, v)


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


def _bhl_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, seq) strides of a [B, L, H, D] tensor."""
    return x.stride(0), x.stride(2), x.stride(1)


# ---------------------------------------------------------------------------------- public ops
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool = False,
                     hadamard: bool = True) -> torch.Tensor:
    """q, k, v [B, L, H, D] bf16/fp16 (any strides, D contiguous) -> [B, L, H*D] in q's dtype.

    Non-causal softmax(q k^T / sqrt(D)) v. fp8=True: q, k (Hadamard-rotated unless hadamard=False)
    and v quantised per (batch, head) to e4m3, both matmuls on fp8 tensor cores (module docstring);
    fp8=False: bf16 flash attention reading q, k, v through their strides.
    """
    _check(q, k, v, fp8)
    q, k, v = _d_contiguous(q), _d_contiguous(k), _d_contiguous(v)
    if fp8:
        return attention_fp8(quantize_qkv(q, k, v, hadamard), q.dtype)
    B, L, H, D = q.shape
    out = torch.empty(B, L, H * D, device=q.device, dtype=q.dtype)  # [B, L, H*D] = [B, L, H, D]
    _launch(q, k, v, out, out, 0, out, None, _bhl_strides(q), _bhl_strides(k), (*_bhl_strides(v), 1), B, H, L, D,
            fp8=False)
    return out


@torch.library.custom_op("sd35fp8::triton_attention", mutates_args=())
def triton_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp8: bool) -> torch.Tensor:
    """`triton_attention` as a torch custom op: torch.compile keeps it opaque (one call in the graph,
    its autotuned Triton kernels untouched by Inductor); CUDA graphs capture it after warm-up."""
    return triton_attention(q, k, v, fp8)


@triton_attention_op.register_fake
def _(q, k, v, fp8):
    B, L, H, D = q.shape
    return q.new_empty(B, L, H * D)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hadamard: bool = True) -> QKV8:
    """q, k, v [B, L, H, D] (D contiguous) -> QKV8 (per-(batch, head) e4m3, V transposed, L padded)."""
    _check(q, k, v, fp8=True)
    return _quantize(None, (_d_contiguous(q), _d_contiguous(k), _d_contiguous(v)), None, hadamard)


def _quant_args(ctx: tuple | None, x: tuple, norms: tuple | None, hadamard: bool):
    """Kernel arguments shared by the amax and quantisation passes over the joint sequence [ctx; x]."""
    qx = x[0]
    c = ctx if ctx is not None else x
    B, Lx, H, D = qx.shape
    lc = c[0].shape[1] if ctx is not None else 0
    strides = tuple(st for t in (*c, *x) for st in _bhl_strides(t))
    weights = norms if norms is not None else (qx,) * 4  # unread without NORM
    rotate = 1.0 / math.sqrt(D) if hadamard else 0.0  # ROTATE constexpr: q, k @ H_D * rotate
    meta = dict(HEAD_DIM=D, NORM=norms is not None, ROTATE=rotate)  # + AMAX_LAUNCH / QUANT_LAUNCH
    return (*c, *x, *weights), strides, lc, lc + Lx, meta


def _amax(ctx: tuple | None, x: tuple, norms: tuple | None, hadamard: bool, qk_bound: bool = False) -> torch.Tensor:
    """max |x| per (batch, head) of the (normed, rotated) q, k and of v -> [3, B*H] fp32. qk_bound (with
    norms): q's and k's entries are their norm bound (`qk_norm_bound`) instead, and only v is read."""
    tensors, strides, lc, L, meta = _quant_args(ctx, x, norms, hadamard)
    B, _, H, D = x[0].shape
    amax = torch.zeros(3, B * H, device=x[0].device, dtype=torch.float32)  # [3, B*H]
    bound = QK_BOUND_MARGIN * math.sqrt(D) if qk_bound and norms is not None else 0.0  # qk_norm_bound / max|w|
    _amax_kernel[(triton.cdiv(L, AMAX_LAUNCH["BLOCK_L"]), B * H)](*tensors, amax, *strides, H, lc, L, QK_BOUND=bound,
                                                                  **meta, **AMAX_LAUNCH)
    return amax


def _quantize(ctx: tuple | None, x: tuple, norms: tuple | None, hadamard: bool,
              scale: torch.Tensor | None = None, v_transposed: bool = True) -> QKV8:
    """The joint sequence [ctx; x] of (q, k, v) [B, L*, H, D] views -> QKV8, q and k RMS-normed first when
    norms = (wq_ctx, wk_ctx, wq_x, wk_x) [D] is given (ctx None: x alone). scale [3, H] (static: the
    same for every batch row) skips the amax pass; None: amax / 448 per (batch, head) for v (and for q, k
    without norms); with norms, q and k use their norm bound (`qk_norm_bound` / 448: the amax pass reads v
    alone, a third of its bytes and none of the norm / rotation work). v_transposed False: the QKV8's `vt`
    holds V as [B, H, Lp, D] (D contiguous, as q and k) instead of V^T."""
    qx = x[0]
    B, _, H, D = qx.shape
    tensors, strides, lc, L, meta = _quant_args(ctx, x, norms, hadamard)
    lp = triton.cdiv(L, PAD) * PAD
    if scale is None:
        scale = amax_to_scale(_amax(ctx, x, norms, hadamard, qk_bound=True))  # [3, B*H], amax / 448
    else:
        scale = scale.float().repeat(1, B)  # [3, H] -> [3, B*H] (index b*H + h)
    q8 = torch.empty(B, H, lp, D, device=qx.device, dtype=FP8_DTYPE)
    k8 = torch.empty(B, H, lp, D, device=qx.device, dtype=FP8_DTYPE)
    v8t = torch.empty((B, H, D, lp) if v_transposed else (B, H, lp, D), device=qx.device, dtype=FP8_DTYPE)
    _quant_kernel[(lp // QUANT_LAUNCH["BLOCK_L"], B * H)](*tensors, q8, k8, v8t, scale, *strides, H, lc, L, lp,
                                                          V_T=v_transposed, **meta, **QUANT_LAUNCH)
    return QKV8(q8, k8, v8t, scale.view(3, B, H), L)


def _joint_split(qkv_ctx, qkv_x, n_ctx, heads, wq_ctx, wk_ctx, wq_x, wk_x):
    """(ctx (q, k, v) | None, x (q, k, v), norms | None): [B, L, H, D] views of the qkv outputs."""
    def split(t):
        B, L, C3 = t.shape
        return t.view(B, L, 3, heads, C3 // (3 * heads)).unbind(2)  # q, k, v [B, L, H, D] views

    x = split(qkv_x)
    ctx = split(qkv_ctx) if n_ctx else None
    _check(*x, fp8=True)
    norms = (wq_ctx if n_ctx else wq_x, wk_ctx if n_ctx else wk_x, wq_x, wk_x) if wq_x is not None else None
    return ctx, x, norms


@torch.library.custom_op("sd35fp8::joint_attention_fp8", mutates_args=())
def joint_attention_fp8_op(qkv_ctx: torch.Tensor, qkv_x: torch.Tensor, n_ctx: int, heads: int,
                           wq_ctx: torch.Tensor | None, wk_ctx: torch.Tensor | None,
                           wq_x: torch.Tensor | None, wk_x: torch.Tensor | None,
                           qkv_scale: torch.Tensor | None = None,
                           out_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 joint attention straight from the two qkv linears' outputs, qk RMS-norm fused.

    qkv_ctx [B, Lc, 3*C], qkv_x [B, Lx, 3*C] (C = heads * D; n_ctx = Lc, 0: x alone, qkv_ctx unused);
    w* [D]: the ln_q / ln_k weights (all None: no qk-norm) -> (o_ctx [B, Lc, C], o_x [B, Lx, C]) in
    qkv_x's dtype, each contiguous (the proj linears' inputs). Same result as
    triton_attention(cat(rms(q)), cat(rms(k)), cat(v), fp8=True) split at Lc, without the norm, cat and
    split passes. Static scales: qkv_scale [3, H] (q, k, v dequantisation scales, e.g. from
    `static_qkv_scale`) skips the amax pass; out_scale [2] (the ctx / x proj input scales) stores the
    outputs as e4m3 (x / s, saturated) instead.
    """
    ctx, x, norms = _joint_split(qkv_ctx, qkv_x, n_ctx, heads, wq_ctx, wk_ctx, wq_x, wk_x)
    return _attention_fp8_split(_quantize(ctx, x, norms, hadamard=True, scale=qkv_scale), n_ctx, qkv_x.dtype,
                                out_scale)


@joint_attention_fp8_op.register_fake
def _(qkv_ctx, qkv_x, n_ctx, heads, wq_ctx, wk_ctx, wq_x, wk_x, qkv_scale=None, out_scale=None):
    B, L, C3 = qkv_x.shape
    dtype = FP8_DTYPE if out_scale is not None else qkv_x.dtype
    return qkv_x.new_empty(B, n_ctx, C3 // 3, dtype=dtype), qkv_x.new_empty(B, L, C3 // 3, dtype=dtype)


@torch.library.custom_op("sd35fp8::joint_attention_fp8_rows", mutates_args=())
def joint_attention_fp8_rows_op(qkv_ctx: torch.Tensor, qkv_x: torch.Tensor, n_ctx: int, heads: int,
                                wq_ctx: torch.Tensor | None, wk_ctx: torch.Tensor | None,
                                wq_x: torch.Tensor | None, wk_x: torch.Tensor | None
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`joint_attention_fp8_op` with dynamic scales whose outputs come as the proj GEMMs' fp8 inputs:
    -> (o_ctx8 [B, Lc, C], o_x8 [B, Lx, C] e4m3, s_ctx [B*Lc, 1], s_x [B*Lx, 1] fp32), o ~= o8 * s row by
    row. One scale per batch row, s_b = max over heads of v's scale: an attention output is a convex
    combination of v rows, so it never exceeds amax(v) (448 s_v) and needs no amax pass of its own (a
    per-token quantise pass over the bf16 output otherwise); e4m3's relative precision is the same over its
    whole normal range (2^-6 .. 448), so the coarser scale costs nothing but for values 2^15 below the
    largest v."""
    ctx, x, norms = _joint_split(qkv_ctx, qkv_x, n_ctx, heads, wq_ctx, wk_ctx, wq_x, wk_x)
    return _attention_fp8_split(_quantize(ctx, x, norms, hadamard=True), n_ctx, qkv_x.dtype, None, rows=True)


@joint_attention_fp8_rows_op.register_fake
def _(qkv_ctx, qkv_x, n_ctx, heads, wq_ctx, wk_ctx, wq_x, wk_x):
    B, L, C3 = qkv_x.shape
    f32 = torch.float32
    return (qkv_x.new_empty(B, n_ctx, C3 // 3, dtype=FP8_DTYPE), qkv_x.new_empty(B, L, C3 // 3, dtype=FP8_DTYPE),
            qkv_x.new_empty(B * n_ctx, 1, dtype=f32), qkv_x.new_empty(B * L, 1, dtype=f32))


@torch.no_grad()
def joint_attention_amax(qkv_ctx: torch.Tensor, qkv_x: torch.Tensor, n_ctx: int, heads: int,
                         wq_ctx: torch.Tensor | None, wk_ctx: torch.Tensor | None,
                         wq_x: torch.Tensor | None, wk_x: torch.Tensor | None) -> torch.Tensor:
    """Calibration: max |x| per head (over the batch) of the normed, rotated q, k and of v, as the
    quantisation of `joint_attention_fp8_op` sees them -> [3, H] fp32."""
    ctx, x, norms = _joint_split(qkv_ctx, qkv_x, n_ctx, heads, wq_ctx, wk_ctx, wq_x, wk_x)
    return _amax(ctx, x, norms, hadamard=True).view(3, x[0].shape[0], heads).amax(1)


def static_qkv_scale(amax: torch.Tensor, norm_weights: tuple | None, head_dim: int,
                     v_margin: float = 2.0) -> torch.Tensor:
    """Static q, k, v scales [3, H] for `joint_attention_fp8_op` from a calibrated amax [3, H].

    With qk RMS-norm (norm_weights = (wq, wk) each [D] or a tuple of such, all the weights whose
    outputs share the scale), q and k need no calibration: a normed row has L2 norm <= sqrt(D) * max|w|
    (and the Hadamard rotation keeps the norm), so that bound (x1.01 for bf16 rounding) never
    saturates; e4m3's relative precision is the same over its whole normal range, so the unused
    headroom costs nothing measurable. v (and q, k without norm) use amax * v_margin: headroom for
    inputs that differ from the calibration ones (beyond it values saturate at 448 * s).
    """
    scale = amax_to_scale(amax.float() * v_margin)  # [3, H]
    if norm_weights is not None:
        for i, ws in enumerate(norm_weights):  # 0: q, 1: k
            scale[i] = amax_to_scale(torch.tensor(qk_norm_bound(ws, head_dim), device=amax.device))
    return scale


def qk_norm_bound(weights, head_dim: int) -> float:
    """Largest |entry| a RMS-normed (weight w [D], any of `weights`), Hadamard-rotated q or k row can have:
    sqrt(D) * max|w| (an entry is at most the row's L2 norm, which the norm sets to <= sqrt(D) * max|w| and
    the orthonormal rotation keeps), x1.01 for bf16 rounding. The dynamic path's q / k amax (in-kernel)."""
    ws = weights if isinstance(weights, (tuple, list)) else (weights,)
    return max(float(w.detach().float().abs().max()) for w in ws) * math.sqrt(head_dim) * QK_BOUND_MARGIN


def attention_fp8(qkv8: QKV8, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The fp8 attention kernel on already-quantised inputs -> [B, L, H*D] in out_dtype."""
    return _attention_fp8_split(qkv8, 0, out_dtype, None)[1]


def _attention_fp8_split(qkv8: QKV8, n_ctx: int, out_dtype: torch.dtype, out_scale: torch.Tensor | None,
                         rows: bool = False) -> tuple[torch.Tensor, ...]:
    """-> (rows < n_ctx [B, n_ctx, H*D], the rest [B, L - n_ctx, H*D]); e4m3 / out_scale if given.
    rows: e4m3 / s_b per batch row (the kernel's OUT_MODE 2), and their row scales [B*n_ctx, 1],
    [B*(L - n_ctx), 1] fp32 as third and fourth outputs."""
    q8, k8, v8t, scale, L = qkv8
    B, H, _, D = q8.shape
    dtype = FP8_DTYPE if out_scale is not None or rows else out_dtype
    oc = torch.empty(B, n_ctx, H * D, device=q8.device, dtype=dtype)
    ox = torch.empty(B, L - n_ctx, H * D, device=q8.device, dtype=dtype)
    inv = None if out_scale is None else out_scale.float().reshape(2).reciprocal()
    srow = (torch.empty(B * n_ctx, 1, device=q8.device, dtype=torch.float32),
            torch.empty(B * (L - n_ctx), 1, device=q8.device, dtype=torch.float32)) if rows else None
    _launch(q8, k8, v8t, oc, ox, n_ctx, scale, inv, q8.stride()[:3], k8.stride()[:3],
            (*v8t.stride()[:2], 1, v8t.stride(2)), B, H, L, D, fp8=True, out_rows=srow)
    return (oc, ox) if srow is None else (oc, ox, *srow)


def _launch(q, k, v, oc, ox, n_ctx, scale, out_inv_scale, sq, sk, sv, B, H, L, D, fp8: bool,
            out_rows: tuple | None = None) -> None:
    """sq, sk: (batch, head, seq) strides; sv: (batch, head, seq, dim) strides; oc [B, n_ctx, H*D],
    ox [B, L - n_ctx, H*D]; out_inv_scale [2] (1 / s of oc, ox) stores e4m3, None the outputs' dtype;
    out_rows (fp8 only): (row scales of oc, of ox) for e4m3 outputs scaled per batch row (OUT_MODE 2)."""
    out_mode = 2 if out_rows is not None else int(out_inv_scale is not None)
    srow_c, srow_x = out_rows if out_rows is not None else (scale, scale)  # unread unless OUT_MODE 2
    args = (q, k, v, oc, ox, scale, out_inv_scale if out_mode == 1 else scale, srow_c, srow_x,
            _LOG2E / math.sqrt(D), *sq, *sk, *sv, H, L, n_ctx)
    meta = dict(HEAD_DIM=D, FP8=fp8, P_SHIFT=P_LOG2_SCALE if fp8 else 0.0, OUT_MODE=out_mode,
                EXP=exp_mode() if q.is_cuda else 0,  # the interpreter has no inline PTX
                H_P2=triton.next_power_of_2(H))
    grid = lambda m: (triton.cdiv(L, m["BLOCK_M"]), B * H)  # noqa: E731
    pinned = pinned_config(q.device, D, fp8) if q.is_cuda else None
    if pinned is not None:
        _attn_fwd[grid(pinned)](*args, **meta, **pinned)
    elif q.is_cuda:
        _attn_fwd_tuned[grid](*args, **meta)
    else:  # interpreter checks only (_ALLOW_CPU)
        _attn_fwd[grid(_CPU_CONFIG)](*args, **meta, **_CPU_CONFIG)


# The attention kernel's exponential (_exp2): ftz (default), mufu (tl.math.exp2) or split. H100, Large
# joint attention L = 4429 (benchmarks/attention_fp8.py, benchmarks/results/attention_exp_nvidia-h100-80gb-hbm3.json):
# kernel 0.856 ms (mufu), 0.832 ms (ftz), 0.902 ms (split), the same SQNR against fp32 in all three.
EXP_ENV = "SD35FP8_ATTN_EXP"
EXP_MODES = {"mufu": 0, "ftz": 1, "split": 2}


def exp_mode() -> int:
    name = os.environ.get(EXP_ENV, "ftz").strip().lower()
    if name not in EXP_MODES:
        raise ValueError(f"{EXP_ENV}={name!r}: expected one of {sorted(EXP_MODES)}")
    return EXP_MODES[name]


# Block sizes pinned per (compute capability, head dim, path): the autotuner's pick among near-equal tiles
# changed from process to process (H100, Large step: 26.1-27.8 ms of attention and last-bit differences in
# the image), so where a sweep chose, the choice is fixed. fp8: 64 x 128, 4 warps, 4 stages, the best of
# the 50-config sweep (benchmarks/attention_configs.py, attention_configs_nvidia-h100-80gb-hbm3.json: 0.646
# ms at L = 4250, the next 0.648 / 0.670; attention_variants_nvidia-h100-80gb-hbm3.json at L = 4429: 0.697
# ms against 0.741 / 0.803 / 0.872 for the other tiles); bf16: the autotuner's pick in
# attention_exp_nvidia-h100-80gb-hbm3.json. Other GPUs and head dims autotune; SD35FP8_ATTN_AUTOTUNE=1
# autotunes everywhere.
PINNED_CONFIGS = {
    ((9, 0), 64, True): {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4},
    ((9, 0), 64, False): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
}
AUTOTUNE_ENV = "SD35FP8_ATTN_AUTOTUNE"


def _autotune_forced() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0").strip() not in ("", "0")


def pinned_config(device: torch.device, head_dim: int, fp8: bool) -> dict | None:
    """The pinned launch config for this GPU, head dim and path, or None (autotune)."""
    if _autotune_forced():
        return None
    return PINNED_CONFIGS.get((torch.cuda.get_device_capability(device), head_dim, fp8))


def tuned_config(length: int, fp8: bool, head_dim: int = 64) -> dict | None:
    """Block sizes / warps / stages a launch at sequence length L, head dim and path uses: the pinned
    config of this GPU (`pinned_config`), else the autotuner's pick (None if it has not run)."""
    if triton is None:
        return None
    if torch.cuda.is_available() and (pinned := pinned_config(torch.device("cuda"), head_dim, fp8)) is not None:
        return dict(pinned)
    for (L, _, is_fp8, *_), cfg in _attn_fwd_tuned.cache.items():  # key: (L, HEAD_DIM, FP8, dtypes...)
        if L == length and is_fp8 == fp8:
            return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return None


# ---------------------------------------------------------------------------------- torch spec
def hadamard_matrix(n: int) -> torch.Tensor:
    """[n, n] orthonormal Sylvester Hadamard matrix, H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    i = torch.arange(n)
    bits = i[:, None] & i[None, :]
    parity = torch.zeros_like(bits)
    for s in range(max(n - 1, 1).bit_length()):
        parity ^= (bits >> s) & 1
    return (1 - 2 * parity).float() / math.sqrt(n)


@torch.no_grad()
def quantize_qkv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hadamard: bool = True
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`quantize_qkv`'s numerics in fp32 torch, layout kept: q, k, v [B, L, H, D] -> ([q8, k8, v8] e4m3
    [B, L, H, D] (q, k Hadamard-rotated if hadamard), [s_q, s_k, s_v] fp32 [B, 1, H, 1], x ~= x8 * s)."""
    x = [t.float() for t in (q, k, v)]
    if hadamard:
        hm = hadamard_matrix(q.shape[-1]).to(q.device)
        x[0], x[1] = x[0] @ hm, x[1] @ hm
    scales = [amax_to_scale(t.abs().amax(dim=(1, 3), keepdim=True)) for t in x]  # [B, 1, H, 1] each
    return [to_fp8_saturated(t, sc) for t, sc in zip(x, scales)], scales


@torch.no_grad()
def fp8_attention_emulated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int = 64,
                           hadamard: bool = True) -> torch.Tensor:
    """The fp8 path's numerics in fp32 torch (torch's e4m3 casts): q, k, v [B, L, H, D] -> [B, L, H*D] fp32.

    Same rotation, per-(b, h) scales, block-wise online softmax with P * 256 cast to e4m3 as the kernel;
    differs only by summation order (and Hopper's reduced-precision fp8 accumulation).
    """
    B, L, H, D = q.shape
    x8, s = quantize_qkv_reference(q, k, v, hadamard)
    x8 = [t.float().transpose(1, 2) for t in x8]  # [B, H, L, D] e4m3 values
    s = [t.transpose(1, 2) for t in s]  # [B, H, 1, 1]
    q8, k8, v8 = x8
    qk_scale = _LOG2E / math.sqrt(D) * s[0] * s[1]  # [B, H, 1, 1]
    m = torch.full((B, H, L, 1), -math.inf, device=q.device)
    l = torch.zeros(B, H, L, 1, device=q.device)
    acc = torch.zeros(B, H, L, D, device=q.device)
    for n0 in range(0, L, block_n):
        qk = q8 @ k8[:, :, n0:n0 + block_n].transpose(-1, -2)  # [B, H, L, bn]
        m_new = torch.maximum(m, qk.amax(-1, keepdim=True) * qk_scale)
        p = torch.exp2(qk * qk_scale - (m_new - P_LOG2_SCALE))  # [B, H, L, bn] in [0, 256]
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1, keepdim=True)
        acc = acc * alpha + p.to(FP8_DTYPE).float() @ v8[:, :, n0:n0 + block_n]
        m = m_new
    return (acc / l * s[2]).transpose(1, 2).reshape(B, L, H * D)
