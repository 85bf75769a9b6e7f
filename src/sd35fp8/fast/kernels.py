"""Fused pre-matmul ops of the fast MMDiT step: each produces the *input of one linear layer*.

    ln_modulate_act(x, shift, scale, mode)  LayerNorm -> modulate -> (per-token fp8 quantise)
    residual_ln_modulate_act(x, gate, y, ...) x + gate*y, then the same (fc1 input after attention)
    gelu_act(h, mode)                        GELU(tanh) -> (per-token fp8 quantise)     (fc2 input)
    plain_act(y, mode)                       (per-token fp8 quantise)                    (proj input)
    plain_act_window(y, start, length, mode) the same over rows start..start+length of each batch row

Each returns `(a, a_scale)`: for mode None / "weight_only" `a` is the activation in the compute
dtype and `a_scale` is None; for "dynamic" `a` is float8_e4m3fn [M, K] with per-token scales
[M, 1] fp32 (scale = amax / 448, fp8/scaling.py's convention); for "static" the scale is the
calibrated fp32 scalar `static_scale` expanded to [M, 1].

Two implementations of the same math (not a fallback): one Triton kernel per op (one read, one
write of each row), or plain torch ops that Inductor fuses under torch.compile (on CUDA it splits
LayerNorm into a statistics kernel and a pointwise kernel that reads the row again). `impl`
("auto", "triton", "torch") and `act_impl(x, impl)` say which one a call takes: "auto" is Triton
eager on CUDA and torch ops under compile or on CPU; "triton" keeps the Triton kernels inside a
compiled graph too. Tests check both agree on the GPU.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from sd35fp8.errors import InputError
from sd35fp8.fp8.dequant import e4m3_operand
from sd35fp8.fp8.device import MATMUL_MODES
from sd35fp8.fp8.scaling import E4M3_MAX, EPS, FP8_DTYPE

try:  # Triton ships with CUDA builds of torch; CPU builds have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None
    tl = None

NORM_EPS = 1e-6
_GELU_C = math.sqrt(2.0 / math.pi)


IMPLS = ("auto", "triton", "torch")


def act_impl(x: torch.Tensor, impl: str = "auto") -> str:
    """Which implementation a call takes: "triton" or "torch".

    "auto": Triton for an eager call on a CUDA tensor, torch ops under torch.compile (Inductor fuses
    them) and on CPU. "triton": the Triton kernel whenever the tensor is on CUDA, also inside a
    compiled graph (torch.compile calls user-defined Triton kernels as they are). "torch": torch ops.
    """
    if impl not in IMPLS:
        raise InputError(f"fast/kernels.py: impl {impl!r} not in {IMPLS}")
    if triton is None or not x.is_cuda or impl == "torch":
        return "torch"
    return "triton" if impl == "triton" or not torch.compiler.is_compiling() else "torch"


# ---------------------------------------------------------------------------------- torch reference
def _quant_rows_torch(y: torch.Tensor, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """y [M, K] (fp32) -> (fp8 [M, K], scale [M, 1] fp32)."""
    if static_scale is None:
        s = y.abs().amax(dim=-1, keepdim=True).clamp(min=EPS) / E4M3_MAX  # [M, 1]
    else:
        s = static_scale.reshape(1, 1).expand(y.shape[0], 1).contiguous()  # [M, 1]
    return (y / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE), s


def _finish(y32: torch.Tensor, mode: str | None, static_scale: torch.Tensor | None, dtype: torch.dtype):
    if mode in MATMUL_MODES:
        return _quant_rows_torch(y32, static_scale if mode == "static" else None)
    return y32.to(dtype), None


def _ln_modulate_torch(x, shift, scale, mode, static_scale):
    B, L, C = x.shape
    xf = x.float()
    y = F.layer_norm(xf, (C,), eps=NORM_EPS)
    y = y * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)  # [B, L, C]
    return _finish(y.reshape(B * L, C), mode, static_scale, x.dtype)


def _residual_ln_modulate_torch(x, gate, y, shift, scale, mode, static_scale):
    B, L, C = x.shape
    x = torch.addcmul(x, gate.unsqueeze(1), y.view(B, L, C))  # [B, L, C] in x's dtype
    return x, _ln_modulate_torch(x, shift, scale, mode, static_scale)


def _gelu_torch(h, mode, static_scale):
    return _finish(F.gelu(h.float(), approximate="tanh"), mode, static_scale, h.dtype)


def _plain_torch(y, mode, static_scale):
    return _finish(y.float(), mode, static_scale, y.dtype)


# ---------------------------------------------------------------------------------- Triton kernels
if triton is not None:
    from sd35fp8.fp8.dequant import e4m3_bits_to_f32  # a @triton.jit helper: a global of the kernels calling it

    @triton.jit
    def _e4m3(y, s):
        return tl.minimum(tl.maximum(y / s, -448.0), 448.0).to(tl.float8e4nv)

    @triton.jit
    def _store_row(Q, S, SSTATIC, row, ca, ma, ya, cb, mb, yb, QS, MODE: tl.constexpr):
        # a row given as two parts (`row_blocks`: columns ca [BLOCK_A], cb [BLOCK_B], masks ma / mb, values
        # ya / yb fp32) -> Q. MODE 0: y in Q's dtype; 1: dynamic per-row fp8; 2: static scalar fp8. QS: Q's
        # row stride (the row length, or more when Q has spare columns for a fused LoRA term: lora/fused.py)
        if MODE == 0:
            tl.store(Q + row * QS + ca, ya.to(Q.dtype.element_ty), mask=ma)
            tl.store(Q + row * QS + cb, yb.to(Q.dtype.element_ty), mask=mb)
        else:
            if MODE == 1:
                amax = tl.maximum(tl.max(tl.where(ma, tl.abs(ya), 0.0), axis=0),
                                  tl.max(tl.where(mb, tl.abs(yb), 0.0), axis=0))
                s = tl.maximum(amax, 1e-12) / 448.0
            else:
                s = tl.load(SSTATIC)
            tl.store(Q + row * QS + ca, _e4m3(ya, s), mask=ma)
            tl.store(Q + row * QS + cb, _e4m3(yb, s), mask=mb)
            tl.store(S + row, s)

    @triton.jit
    def _row_parts(C, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
        ca = tl.arange(0, BLOCK_A)
        cb = BLOCK_A + tl.arange(0, BLOCK_B)
        return ca, ca < C, cb, cb < C

    @triton.jit
    def _modulate(d, rstd, b, cols, mask, SHIFT, SCALE, stride_mod):
        sh = tl.load(SHIFT + b * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(SCALE + b * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        return d * rstd * (1.0 + sc) + sh

    @triton.jit
    def _ln_modulate_row(xa, xb, ca, ma, cb, mb, b, row, SHIFT, SCALE, Q, S, SSTATIC, C, QS, stride_mod,
                         EPS: tl.constexpr, MODE: tl.constexpr):
        # x = [xa, xb] fp32 (0 past C) -> LayerNorm -> * (1 + scale[b]) + shift[b] -> Q row (_store_row)
        mean = (tl.sum(xa, axis=0) + tl.sum(xb, axis=0)) / C
        da = tl.where(ma, xa - mean, 0.0)
        db = tl.where(mb, xb - mean, 0.0)
        var = (tl.sum(da * da, axis=0) + tl.sum(db * db, axis=0)) / C
        rstd = 1.0 / tl.sqrt(var + EPS)  # EPS constexpr: a runtime float is f64 under torch.compile
        _store_row(Q, S, SSTATIC, row, ca, ma, _modulate(da, rstd, b, ca, ma, SHIFT, SCALE, stride_mod),
                   cb, mb, _modulate(db, rstd, b, cb, mb, SHIFT, SCALE, stride_mod), QS, MODE)

    @triton.jit
    def _ln_modulate_kernel(X, SHIFT, SCALE, Q, S, SSTATIC, L, C, QS, stride_mod, EPS: tl.constexpr,
                            BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, MODE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ca, ma, cb, mb = _row_parts(C, BLOCK_A, BLOCK_B)
        xa = tl.load(X + row * C + ca, mask=ma, other=0.0).to(tl.float32)
        xb = tl.load(X + row * C + cb, mask=mb, other=0.0).to(tl.float32)
        _ln_modulate_row(xa, xb, ca, ma, cb, mb, row // L, row, SHIFT, SCALE, Q, S, SSTATIC, C, QS, stride_mod,
                         EPS, MODE)

    @triton.jit
    def _residual_part(X, Y, GATE, XOUT, row, b, cols, mask, C, LDY, stride_mod):
        # x + gate * y (rounded to x's dtype as torch.addcmul does), stored -> fp32; y's rows LDY apart
        off = row * C + cols
        x = tl.load(X + off, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * LDY + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GATE + b * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        xn = (x + g * y).to(XOUT.dtype.element_ty)
        tl.store(XOUT + off, xn, mask=mask)
        return xn.to(tl.float32)

    @triton.jit
    def _residual_ln_modulate_kernel(X, Y, GATE, SHIFT, SCALE, XOUT, Q, S, SSTATIC, L, C, LDY, QS, stride_mod,
                                     EPS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                                     MODE: tl.constexpr):
        # x + gate * y, stored; then LN -> modulate -> Q (one row a program: several rows of one batch item,
        # reading the gate / shift / scale columns once for them, were slower on the H100, docs/PERF.md)
        row = tl.program_id(0).to(tl.int64)
        b = row // L
        ca, ma, cb, mb = _row_parts(C, BLOCK_A, BLOCK_B)
        xa = _residual_part(X, Y, GATE, XOUT, row, b, ca, ma, C, LDY, stride_mod)
        xb = _residual_part(X, Y, GATE, XOUT, row, b, cb, mb, C, LDY, stride_mod)
        _ln_modulate_row(xa, xb, ca, ma, cb, mb, b, row, SHIFT, SCALE, Q, S, SSTATIC, C, QS, stride_mod, EPS, MODE)

    @triton.jit
    def _gelu_tanh(h):
        """GELU(tanh) of fp32 h; tanh by the hardware approximation (PTX tanh.approx.f32, sm_75+,
        rel. error ~2^-11: far below the bf16 / e4m3 rounding of the result)."""
        z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32, is_pure=True,
                                      pack=1)
        return 0.5 * h * (1.0 + t)

    @triton.jit
    def _act_rows_kernel(Y, Q, S, SSTATIC, N, QS, LI, LO, OFF, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                         MODE: tl.constexpr, GELU: tl.constexpr):
        # one row per program (dynamic mode needs the row's amax). Output row r reads input row
        # (r // LO) * LI + OFF + r % LO: a window of LO rows at OFF in each group of LI (plain_act_window)
        row = tl.program_id(0).to(tl.int64)
        src = (row // LO) * LI + OFF + row % LO
        ca, ma, cb, mb = _row_parts(N, BLOCK_A, BLOCK_B)
        ya = tl.load(Y + src * N + ca, mask=ma, other=0.0).to(tl.float32)
        yb = tl.load(Y + src * N + cb, mask=mb, other=0.0).to(tl.float32)
        if GELU:
            ya = _gelu_tanh(ya)
            yb = _gelu_tanh(yb)
        _store_row(Q, S, SSTATIC, row, ca, ma, ya, cb, mb, yb, QS, MODE)

    @triton.jit
    def _act_static_kernel(Y, Q, SSTATIC, n, BLOCK: tl.constexpr, GELU: tl.constexpr):
        # static fp8: no row reduction, so flat blocks of BLOCK elements (no padding of rows to a power of 2)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            y = _gelu_tanh(y)
        q = tl.minimum(tl.maximum(y * (1.0 / tl.load(SSTATIC)), -448.0), 448.0)
        tl.store(Q + offs, q.to(tl.float8e4nv), mask=mask)

    @triton.jit
    def _gemv_kernel(A, AS, W, WS, BIAS, OUT, IDX, FLAG, M, N, K, HAS_AS: tl.constexpr, HAS_WS: tl.constexpr,
                     HAS_BIAS: tl.constexpr, MEMO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, W_BITS: tl.constexpr = False):
        # OUT[row(m), n] = (sum_k A[m, k] * W[n, k]) * AS[m] * WS[n] + BIAS[n] for M <= BLOCK_M rows, W (fp8 or
        # 16-bit) read once, products and sums in fp32. MEMO (fast/ada_memo.py): row(m) = IDX[m], and the
        # program does nothing unless FLAG[0] != 0 (a row missed the memo); else row(m) = m.
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        nmask = rn < N
        mmask = rm < M
        run = True
        if MEMO:
            run = tl.load(FLAG) != 0
        if run:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                kmask = rk < K
                w_ptr, w_mask = W + rn[:, None].to(tl.int64) * K + rk[None, :], nmask[:, None] & kmask[None, :]
                if W_BITS:  # e4m3 codes as uint8 (fp8/dequant.py e4m3_operand: GPUs before sm_89)
                    w = e4m3_bits_to_f32(tl.load(w_ptr, mask=w_mask, other=0))  # [BN, BK]
                else:
                    w = tl.load(w_ptr, mask=w_mask, other=0.0).to(tl.float32)  # [BN, BK]
                for m in tl.static_range(BLOCK_M):
                    a = tl.load(A + m * K + rk, mask=kmask & ((rk * 0 + m) < M), other=0.0).to(tl.float32)  # [BK]
                    part = tl.sum(w * a[None, :], axis=1)  # [BN]
                    acc += tl.where(rm[:, None] == m, part[None, :], 0.0)
            if HAS_AS:
                acc = acc * tl.load(AS + rm, mask=mmask, other=0.0)[:, None]
            if HAS_WS:
                acc = acc * tl.load(WS + rn, mask=nmask, other=0.0)[None, :]
            if HAS_BIAS:
                acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            rows = rm
            if MEMO:
                rows = tl.load(IDX + rm, mask=mmask, other=0)
            tl.store(OUT + rows[:, None].to(tl.int64) * N + rn[None, :], acc.to(OUT.dtype.element_ty),
                     mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _lora_store_h(A, h, INVB, rm, mmask, K, LDA, R: tl.constexpr, PAD: tl.constexpr, PAD_P2: tl.constexpr,
                      BLOCK_M: tl.constexpr):
        # h [BM, R] fp32 -> e4m3(clamp(h * inv_beta)) into A's columns [K, K + R); zeros into the PAD
        # columns after them (the augmented weight's zero columns: 0 * garbage could be 0 * NaN)
        rr = tl.arange(0, R)
        row = A + rm[:, None].to(tl.int64) * LDA
        h = h * tl.load(INVB + rr)[None, :]
        h = tl.minimum(tl.maximum(h, -448.0), 448.0)
        tl.store(row + K + rr[None, :], h.to(tl.float8e4nv), mask=mmask[:, None])
        if PAD > 0:
            rp = tl.arange(0, PAD_P2)
            zero = tl.zeros((BLOCK_M, PAD_P2), dtype=tl.float32).to(tl.float8e4nv)
            tl.store(row + K + R + rp[None, :], zero, mask=mmask[:, None] & (rp[None, :] < PAD))

    @triton.autotune(configs=[triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
                              for bm, bk, nw, ns in ((32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 3),
                                                     (128, 64, 8, 3), (32, 128, 4, 4), (64, 128, 4, 4),
                                                     (128, 128, 4, 4))],
                     key=["M", "K", "R"])  # in place but idempotent (reads columns :K only): safe to time
    @triton.jit
    def _lora_down_kernel(A, D, INVB, M, K, LDA, R: tl.constexpr, PAD: tl.constexpr, PAD_P2: tl.constexpr,
                          FP8_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        # A [M, LDA] fp8: columns [0, K) read (x8), columns [K, K + R + PAD) written (h8, zeros);
        # D [R, K] e4m3 (FP8_D: an fp8 x fp8 MMA) or bf16 (x8 widened)
        pid = tl.program_id(0)
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, R)
        mmask = rm < M
        row = A + rm[:, None].to(tl.int64) * LDA
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            a = tl.load(row + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK] fp8
            d = tl.load(D + rr[:, None] * K + rk[None, :], mask=kmask[None, :], other=0.0)  # [R, BK]
            if FP8_D:
                acc = tl.dot(a, tl.trans(d), acc)
            else:
                acc = tl.dot(a.to(tl.bfloat16), tl.trans(d), acc)
        _lora_store_h(A, acc, INVB, rm, mmask, K, LDA, R, PAD, PAD_P2, BLOCK_M)

    @triton.autotune(configs=[triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=4, num_stages=ns)
                              for bm, bk, ns in ((32, 128, 3), (64, 128, 3), (64, 64, 4), (32, 256, 3))],
                     key=["M", "K", "R", "KCHUNK"])  # writes P only: safe to time
    @triton.jit
    def _lora_down_partial_kernel(A, D, P, M, K, LDA, KCHUNK, R: tl.constexpr, BLOCK_M: tl.constexpr,
                                  FP8_D: tl.constexpr, BLOCK_K: tl.constexpr):
        # split-K part of _lora_down_kernel: program (i, s) sums columns [s KCHUNK, (s + 1) KCHUNK) of
        # row tile i into P[s] [M, R] fp32 (KCHUNK a multiple of every BLOCK_K)
        pid, sid = tl.program_id(0), tl.program_id(1)
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, R)
        mmask = rm < M
        row = A + rm[:, None].to(tl.int64) * LDA
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        k_lo = sid * KCHUNK
        for k0 in range(0, KCHUNK, BLOCK_K):
            rk = k_lo + k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            a = tl.load(row + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)  # [BM, BK] fp8
            d = tl.load(D + rr[:, None] * K + rk[None, :], mask=kmask[None, :], other=0.0)  # [R, BK]
            if FP8_D:
                acc = tl.dot(a, tl.trans(d), acc)
            else:
                acc = tl.dot(a.to(tl.bfloat16), tl.trans(d), acc)
        tl.store(P + sid.to(tl.int64) * M * R + rm[:, None] * R + rr[None, :], acc, mask=mmask[:, None])

    @triton.jit
    def _lora_down_finish_kernel(P, A, INVB, M, K, LDA, S, R: tl.constexpr, PAD: tl.constexpr,
                                 PAD_P2: tl.constexpr, BLOCK_M: tl.constexpr):
        # h8 = e4m3(clamp(sum_s P[s] * inv_beta)) into A's spare columns [K, K + R), zeros after them
        pid = tl.program_id(0)
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, R)
        mmask = rm < M
        h = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for s in range(0, S):
            h += tl.load(P + s * M * R + rm[:, None] * R + rr[None, :], mask=mmask[:, None], other=0.0)
        _lora_store_h(A, h, INVB, rm, mmask, K, LDA, R, PAD, PAD_P2, BLOCK_M)


def _mode_code(mode: str | None) -> int:
    return {None: 0, "weight_only": 0, "dynamic": 1, "static": 2}[mode]


# ---------------------------------------------------------------------------------- public ops
def static_row_scale(static_scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A static (per-tensor) activation scale as the [rows, 1] fp32 scale_a of a rowwise _scaled_mm."""
    return static_scale.reshape(1, 1).float().expand(rows, 1).contiguous()


def _check_static(mode: str | None, static_scale: torch.Tensor | None, what: str) -> None:
    if mode == "static" and static_scale is None:
        raise InputError(f"fast/kernels.py {what}: static mode needs a calibrated input scale "
                         "(MMDiTEngine.calibrate or FP8Linear.input_scale)")


def _same_stride_mods(*mods: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Modulation slices [B, C] the kernels index as base + b * stride(0) + col."""
    if any(m.stride(1) != 1 or m.stride(0) != mods[0].stride(0) for m in mods):
        return tuple(m.contiguous() for m in mods)
    return mods


def _act_out(rows: int, cols: int, code: int, like: torch.Tensor, extra: int = 0):
    """Output buffers: q [rows, cols + extra] (the spare columns for a fused LoRA term, lora/fused.py,
    are left unwritten), s [rows, 1] fp32 for the fp8 codes."""
    q = torch.empty(rows, cols + extra, device=like.device, dtype=FP8_DTYPE if code else like.dtype)
    s = torch.empty(rows, 1, device=like.device, dtype=torch.float32) if code else q
    return q, s


def _with_spare(act: tuple[torch.Tensor, torch.Tensor | None], extra: int):
    """A torch-path result (q [M, K], s) with `extra` spare columns (a copy; CPU / compiled path)."""
    q, s = act
    if not extra:
        return q, s
    out = torch.empty(q.shape[0], q.shape[1] + extra, device=q.device, dtype=q.dtype)
    out[:, :q.shape[1]] = q
    return out, s


def ln_modulate_act(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, mode: str | None,
                    static_scale: torch.Tensor | None = None, impl: str = "auto", extra: int = 0):
    """x [B, L, C], shift/scale [B, C] (may be column slices) -> linear input [B*L, C] (+ scale [B*L, 1]).

    extra > 0 (fp8 modes): the input comes as [B*L, C + extra], the last columns left for a fused LoRA
    term (lora/fused.py), written by the same pass at the wider row stride."""
    _check_static(mode, static_scale, "ln_modulate_act")
    if act_impl(x, impl) == "torch":
        return _with_spare(_ln_modulate_torch(x, shift, scale, mode, static_scale), extra)
    B, L, C = x.shape
    x = x.contiguous()
    shift, scale = _same_stride_mods(shift, scale)
    code = _mode_code(mode)
    q, s = _act_out(B * L, C, code, x, extra)
    _ln_modulate_kernel[(B * L,)](x, shift, scale, q, s, static_scale if code == 2 else q, L, C, C + extra,
                                  shift.stride(0), EPS=NORM_EPS, MODE=code, **row_launch(C))
    return q, (s if code else None)


def residual_ln_modulate_act(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                             scale: torch.Tensor, mode: str | None, static_scale: torch.Tensor | None = None,
                             impl: str = "auto", extra: int = 0):
    """x + gate * y, then LayerNorm -> modulate -> (quantise), in one pass over the rows.

    x [B, L, C], y [B*L, C] (a linear's output; its rows may lie further apart: a padded GEMM's first C
    columns, fast/weights.py pad_output_rows), gate/shift/scale [B, C] ->
    (x_new [B, L, C], (linear input [B*L, C (+ extra)], scale [B*L, 1] | None)); extra: ln_modulate_act.
    """
    _check_static(mode, static_scale, "residual_ln_modulate_act")
    if act_impl(x, impl) == "torch":
        x_new, act = _residual_ln_modulate_torch(x, gate, y, shift, scale, mode, static_scale)
        return x_new, _with_spare(act, extra)
    B, L, C = x.shape
    x = x.contiguous()
    if y.dim() != 2 or y.stride(1) != 1 or y.stride(0) < C:
        y = y.contiguous().view(B * L, C)
    gate, shift, scale = _same_stride_mods(gate, shift, scale)
    code = _mode_code(mode)
    x_new = torch.empty_like(x)
    q, s = _act_out(B * L, C, code, x, extra)
    _residual_ln_modulate_kernel[(B * L,)](x, y, gate, shift, scale, x_new, q, s, static_scale if code == 2 else q,
                                           L, C, y.stride(0), C + extra, shift.stride(0), EPS=NORM_EPS, MODE=code,
                                           **row_launch(C))
    return x_new, (q, (s if code else None))


def gelu_act(h: torch.Tensor, mode: str | None, static_scale: torch.Tensor | None = None, impl: str = "auto",
             extra: int = 0):
    """h [M, N] (fc1 output) -> GELU(tanh) as fc2 input (+ per-token scale [M, 1]); extra: ln_modulate_act."""
    _check_static(mode, static_scale, "gelu_act")
    if act_impl(h, impl) == "torch":
        return _with_spare(_gelu_torch(h, mode, static_scale), extra)
    return _rows(h.contiguous(), mode, static_scale, gelu=True, extra=extra)


def plain_act(y: torch.Tensor, mode: str | None, static_scale: torch.Tensor | None = None, impl: str = "auto",
              extra: int = 0):
    """y [M, K] -> linear input (quantised per token in fp8 modes); extra: ln_modulate_act."""
    _check_static(mode, static_scale, "plain_act")
    if mode not in MATMUL_MODES:
        return y, None
    if act_impl(y, impl) == "torch":
        return _with_spare(_plain_torch(y, mode, static_scale), extra)
    return _rows(y.contiguous(), mode, static_scale, gelu=False, extra=extra)


def plain_act_window(y: torch.Tensor, start: int, length: int, mode: str | None,
                     static_scale: torch.Tensor | None = None, impl: str = "auto"):
    """y [B, L, K] -> plain_act(y[:, start:start + length]) as [B * length, K] rows, read in place (no copy
    of the window first): the proj inputs of a joint attention's [ctx | x] output (fast/attention_fa3.py)."""
    _check_static(mode, static_scale, "plain_act_window")
    B, L, K = y.shape
    win = y[:, start:start + length]
    if mode not in MATMUL_MODES:
        return win.reshape(B * length, K), None
    if act_impl(y, impl) == "torch":
        return _plain_torch(win.reshape(B * length, K), mode, static_scale)
    return _rows(y.contiguous().view(B * L, K), mode, static_scale, gelu=False, window=(L, start, length))


_STATIC_BLOCK = 2048


def row_blocks(n: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): how the one-row-per-program kernels lay a row of n columns over their lanes, as
    two power-of-2 parts [0, A) and [A, A + B), A + B >= n. One next_power_of_2(n) block would leave up
    to half of its lanes masked, and masked lanes still execute the arithmetic: Large's 9728-wide fc1
    output is 8192 + 2048 lanes (1536 used) instead of 16384, its C = 2432 is 2048 + 512 instead of 4096,
    Medium's 1536 and 6144 split exactly."""
    a = max(triton.next_power_of_2(n) // 2, 1)  # the largest power of 2 below n (n / 2 for a power of 2)
    return a, triton.next_power_of_2(max(n - a, 1))


def row_warps(lanes: int) -> int:
    """num_warps of a one-row-per-program kernel over `lanes` columns: 4 up to 4096 (Large's C = 2432:
    59 vs 63 us for the residual-LN pass on an H100 at 4096 lanes, benchmarks/elementwise_configs.py), 8 up
    to 8192, 16 above (the GELU pass over the 9728-wide fc1 output)."""
    return 4 if lanes <= 4096 else (8 if lanes <= 8192 else 16)


def row_launch(n: int) -> dict:
    """The row kernels' launch meta for rows of n columns: BLOCK_A, BLOCK_B (`row_blocks`), num_warps."""
    a, b = row_blocks(n)
    return dict(BLOCK_A=a, BLOCK_B=b, num_warps=row_warps(a + b))


def _rows(y: torch.Tensor, mode: str | None, static_scale: torch.Tensor | None, gelu: bool, extra: int = 0,
          window: tuple[int, int, int] | None = None):
    """window (L, start, length): y [M, N] is groups of L rows, and the pass reads rows start..start+length
    of each group (plain_act_window) -> [M / L * length, N]."""
    M, N = y.shape
    code = _mode_code(mode)
    li, off, lo = window if window is not None else (1, 0, 1)  # (1, 0, 1): row r reads row r
    M = M // li * lo
    if code == 2 and not extra and window is None:  # static: flat elementwise pass; the [M, 1] scale is the scalar
        q = torch.empty(M, N, device=y.device, dtype=FP8_DTYPE)
        _act_static_kernel[(triton.cdiv(M * N, _STATIC_BLOCK),)](y, q, static_scale, M * N, BLOCK=_STATIC_BLOCK,
                                                                 GELU=gelu, num_warps=4)
        return q, static_row_scale(static_scale, M)
    q, s = _act_out(M, N, code, y, extra)
    if M:
        _act_rows_kernel[(M,)](y, q, s, static_scale if code == 2 else q, N, N + extra, li, lo, off, MODE=code,
                               GELU=gelu, **row_launch(N))  # MODE 0 / 1 (2: static with spare columns)
    return q, (s if code else None)


def lora_down_fp8(a: torch.Tensor, k: int, down: torch.Tensor, inv_beta: torch.Tensor) -> None:
    """The fused LoRA's down projection, in place: a [M, K + R + PAD] fp8 (columns :K the layer's
    quantised input x8) gets a[:, K:K + R] = e4m3(clamp(x8 @ down^T * inv_beta)) and zeros in the PAD
    columns after them (lora/fused.py pads K + R to the GEMM's K tile). down [R, K] bf16 or e4m3 (R a
    power of 2 >= 16), inv_beta [R] fp32. One pass over x8 (Triton on CUDA, torch ops elsewhere)."""
    m, r = a.shape[0], down.shape[0]
    pad = a.shape[1] - k - r
    if pad < 0:
        raise ValueError(f"lora_down_fp8: a has {a.shape[1]} columns, fewer than K {k} + R {r}")
    if act_impl(a) == "torch":
        h = (a[:, :k].float() @ down.float().t()) * inv_beta.float()  # x8 values are exact in fp32
        a[:, k:k + r] = h.clamp(-E4M3_MAX, E4M3_MAX).to(a.dtype)
        if pad:
            a[:, k + r:] = 0
        return
    pads = dict(PAD=pad, PAD_P2=triton.next_power_of_2(max(pad, 1)))
    fp8_d = down.dtype == FP8_DTYPE
    splits = lora_down_splits(m, k, _sm_count(a.device))
    if splits == 1:
        _lora_down_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](a, down, inv_beta, m, k, a.stride(0),
                                                                           R=r, FP8_D=fp8_d, **pads)
        return
    chunk = triton.cdiv(triton.cdiv(k, splits), SPLIT_K_QUANTUM) * SPLIT_K_QUANTUM
    splits = triton.cdiv(k, chunk)
    part = torch.empty(splits, m, r, device=a.device, dtype=torch.float32)  # [S, M, R]
    _lora_down_partial_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), splits)](
        a, down, part, m, k, a.stride(0), chunk, R=r, FP8_D=fp8_d)
    _lora_down_finish_kernel[(triton.cdiv(m, 32),)](part, a, inv_beta, m, k, a.stride(0), splits, R=r, BLOCK_M=32,
                                                   num_warps=4, **pads)


SPLIT_K_QUANTUM = 256  # split-K chunks: multiples of every BLOCK_K of _lora_down_partial_kernel


def lora_down_splits(m: int, k: int, sms: int) -> int:
    """How many K chunks lora_down_fp8 sums separately: enough programs for ~2 per SM (a context of
    666 rows is 11 row tiles of 64: one chunk each would leave most SMs idle, each program walking
    all of K), each chunk >= 2 quanta of K; 1 (one pass, no workspace) when the row tiles fill the GPU."""
    tiles = -(-m // 64)
    return max(1, min(16, (2 * sms) // tiles, k // (2 * SPLIT_K_QUANTUM)))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


GEMV_MAX_ROWS = 8  # gemv's rows (the adaLN input: 2 rows a call in batch-invariant mode)
GEMV_LAUNCH = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4}  # gemv's tile (benchmarks/ada_memo.py sizes it)


def gemv(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale_row: torch.Tensor | None,
         bias: torch.Tensor | None, out: torch.Tensor, idx: torch.Tensor | None = None,
         flag: torch.Tensor | None = None, launch: dict | None = None) -> torch.Tensor:
    """out[m] = (a[m] @ w^T) * a_scale[m] * w_scale_row + bias for a [M, K] (M <= GEMV_MAX_ROWS; fp8 codes or
    16-bit), w [N, K] (fp8 or 16-bit), a_scale [M] fp32 or None, w_scale_row [1, N] or None: the one big adaLN
    matmul, reading the weight once. idx / flag (fast/ada_memo.py): write row m to out[idx[m]], and only when
    flag [1] != 0. Always the Triton kernel (on CPU tensors only under the interpreter): callers choose."""
    M, K = a.shape
    N = w.shape[0]
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"gemv: {M} rows, at most {GEMV_MAX_ROWS}")
    memo = idx is not None
    w, bits = e4m3_operand(w)  # older GPUs: the e4m3 bytes, decoded in the kernel
    launch = dict(launch or GEMV_LAUNCH)
    block_n = launch.pop("BLOCK_N")
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        a.contiguous(), a_scale if a_scale is not None else out, w, w_scale_row if w_scale_row is not None else out,
        bias if bias is not None else out, out, idx if memo else out, flag if memo else out, M, N, K,
        HAS_AS=a_scale is not None, HAS_WS=w_scale_row is not None, HAS_BIAS=bias is not None, MEMO=memo,
        BLOCK_N=block_n, BLOCK_M=triton.next_power_of_2(max(M, 2)), W_BITS=bits, **launch)
    return out


def fp8_weight_gemv(a: torch.Tensor, w: torch.Tensor, w_scale_row: torch.Tensor, bias: torch.Tensor | None,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] (M <= 8, e.g. the adaLN input) x fp8 weight [N, K] * scale [1, N] + bias -> [M, N].

    Weight-only FP8 for the one big adaLN matmul: reads the fp8 weight once instead of writing a
    bf16 copy of it (2.7 G elements on Large) every step. Torch ops on CPU / under compile.
    """
    M, K = a.shape
    if act_impl(a) == "torch" or M > GEMV_MAX_ROWS:
        y = F.linear(a.float(), w.float()) * w_scale_row.float()
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype)
    return gemv(a, None, w, w_scale_row, bias, torch.empty(M, w.shape[0], device=a.device, dtype=out_dtype))

