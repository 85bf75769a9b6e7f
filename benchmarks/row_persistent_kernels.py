"""Persistent forms of the fused step's residual-LN and GELU row passes (an experiment, not in fast/kernels.py;
benchmarks/elementwise_configs.py --only persistent times them): a grid of a few programs per SM, each looping
over rows, with Triton's software pipelining of the loop's loads (num_stages), so that the next row's loads are
in flight while this row is reduced and stored. Dynamic FP8 (MODE 1) only. Triton resolves a kernel's globals in
its module, hence a module of their own."""

import triton
import triton.language as tl

from sd35fp8.fast.kernels import _gelu_tanh, _ln_modulate_row, _residual_part, _row_parts, _store_row


@triton.jit
def residual_ln(X, Y, GATE, SHIFT, SCALE, XOUT, Q, S, M, L, C, QS, stride_mod, EPS: tl.constexpr,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, STAGES: tl.constexpr):
    ca, ma, cb, mb = _row_parts(C, BLOCK_A, BLOCK_B)
    for r in tl.range(tl.program_id(0), M, tl.num_programs(0), num_stages=STAGES):
        row = tl.program_id(0).to(tl.int64) * 0 + r  # int64 (the interpreter gives r as a Python int)
        b = row // L
        xa = _residual_part(X, Y, GATE, XOUT, row, b, ca, ma, C, C, stride_mod)
        xb = _residual_part(X, Y, GATE, XOUT, row, b, cb, mb, C, C, stride_mod)
        _ln_modulate_row(xa, xb, ca, ma, cb, mb, b, row, SHIFT, SCALE, Q, S, Q, C, QS, stride_mod, EPS, 1)


@triton.jit
def gelu_rows(Y, Q, S, M, N, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, STAGES: tl.constexpr):
    ca, ma, cb, mb = _row_parts(N, BLOCK_A, BLOCK_B)
    for r in tl.range(tl.program_id(0), M, tl.num_programs(0), num_stages=STAGES):
        row = tl.program_id(0).to(tl.int64) * 0 + r  # int64 (the interpreter gives r as a Python int)
        ya = _gelu_tanh(tl.load(Y + row * N + ca, mask=ma, other=0.0).to(tl.float32))
        yb = _gelu_tanh(tl.load(Y + row * N + cb, mask=mb, other=0.0).to(tl.float32))
        _store_row(Q, S, Q, row, ca, ma, ya, cb, mb, yb, N, 1)
