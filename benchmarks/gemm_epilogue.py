"""Would owning the MLP's GEMMs pay? The x stream's fc1 -> GELU -> fc2 at Large's shapes, three ways.

The fused step (fast/step.py) runs fc1 and fc2 as cuBLAS FP8 GEMMs (torch._scaled_mm, row-wise scales, bf16 out)
with one pass between them (fast/kernels.py gelu_act: GELU(tanh) and a per-token e4m3 quantise of the 9728-wide
fc1 output, 3.6 ms a Large step on the H100: a third of the step's elementwise time). cuBLAS has no epilogue for
it, and a per-token scale needs the whole row's amax, which no output tile of fc1 sees. With 1 x 128 blocks of
the fc2 input scaled on their own (DeepSeek-V3's activation tiles), fc1's epilogue can quantise its own tile and
fc2 applies the scales per K block:

    cublas      _scaled_mm fc1 -> gelu_act (Triton row pass) -> _scaled_mm fc2       (the step as it is)
    triton      fc1 as a plain Triton kernel (tl.dot, row-wise scales, bf16 out), and as a persistent kernel with TMA
                loads (Triton's Hopper matmul recipe): the raw rates against cuBLAS's
    fused       Triton fc1 with GELU + 1 x 128 e4m3 block quantise in the epilogue (fp8 out + scales [M, N/128])
                -> Triton fc2 over block-scaled A (each K block's partial product times its row scales)

Each: the best of a few tiles (triton.testing.do_bench), the chain's time and its SQNR against float32 math on
the same e4m3 operands. The fused chain pays off when its time is below the cuBLAS chain's.

    PYTHONPATH=src python benchmarks/gemm_epilogue.py --out OUTDIR
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gemm_epilogue.py --check-cpu
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import triton
import triton.language as tl

C, MLP, M_X = 2432, 9728, 2 * 4096
QBLOCK = 128  # the fc2 input's quantisation block (columns)
TILES = [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (256, 128, 128, 8, 3),
         (128, 256, 64, 8, 4)]  # BM, BN, BK, warps, stages (BN a multiple of QBLOCK for the fused fc1)


@triton.jit
def _gelu_tanh(h):
    z = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    t = 2.0 * tl.sigmoid(2.0 * z) - 1.0  # tanh (portable: the interpreter runs no inline PTX)
    return 0.5 * h * (1.0 + t)


@triton.jit
def _tile(A, W, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """This program's output tile in grouped order (GROUP row tiles share their column tiles in L2) ->
    (offs_m, offs_n, rows clamped to M - 1 (loads need no mask, stores do), A and W tile pointers at k = 0)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP
    size_m = tl.minimum(num_m - first_m, GROUP)
    offs_m = (first_m + (pid % per_group) % size_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = ((pid % per_group) // size_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_m, M - 1)
    a_ptr = A + rows[:, None].to(tl.int64) * K + offs_k[None, :]
    w_ptr = W + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    return offs_m, offs_n, rows, a_ptr, w_ptr


@triton.jit
def _epilogue(acc, SA, SW, BIAS, OUT, OS, offs_m, offs_n, rows, M, N, EPI: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, QB: tl.constexpr):
    """acc [BM, BN] fp32 -> * SA[rows] * SW + BIAS -> OUT (EPI 0: bf16; 1: GELU, e4m3 per row and QB columns, OS)."""
    acc = acc * tl.load(SA + rows)[:, None] * tl.load(SW + offs_n)[None, :]
    acc += tl.load(BIAS + offs_n).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None]
    if EPI == 0:
        tl.store(OUT + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(tl.bfloat16), mask=mask)
    else:
        g = tl.reshape(_gelu_tanh(acc), (BLOCK_M, BLOCK_N // QB, QB))
        s = tl.maximum(tl.max(tl.abs(g), axis=2), 1e-12) / 448.0  # [BM, BN / QB]
        q = tl.reshape(tl.clamp(g / s[:, :, None], -448.0, 448.0), (BLOCK_M, BLOCK_N)).to(tl.float8e4nv)
        tl.store(OUT + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], q, mask=mask)
        offs_s = tl.min(offs_n, axis=0) // QB + tl.arange(0, BLOCK_N // QB)  # this tile's scale columns
        tl.store(OS + offs_m[:, None].to(tl.int64) * (N // QB) + offs_s[None, :], s, mask=mask)


@triton.jit
def _mm_kernel(A, W, SA, SW, BIAS, OUT, OS, M, N, K, EPI: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QB: tl.constexpr, GROUP: tl.constexpr):
    """A [M, K] e4m3 @ W [N, K]^T e4m3 * SA [M] * SW [N] + BIAS [N]. EPI 0: bf16 out [M, N]. EPI 1: GELU, then
    e4m3 out [M, N] with one scale per row and QB columns, OS [M, N / QB] fp32 (amax / 448)."""
    offs_m, offs_n, rows, a_ptr, w_ptr = _tile(A, W, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, GROUP)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in tl.range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptr), tl.trans(tl.load(w_ptr)), acc)
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    _epilogue(acc, SA, SW, BIAS, OUT, OS, offs_m, offs_n, rows, M, N, EPI, BLOCK_M, BLOCK_N, QB)


@triton.jit
def _mm_tma_kernel(a_desc, w_desc, SA, SW, BIAS, OUT, OS, M, N, K, EPI: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QB: tl.constexpr, GROUP: tl.constexpr,
                   NUM_SMS: tl.constexpr):
    """_mm_kernel persistent (NUM_SMS programs walk the output tiles in grouped order) with TMA loads of A and W
    (tensor descriptors, blocks [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K]): Triton's Hopper matmul recipe."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * num_n
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_SMS, flatten=True):
        first_m = (tile // per_group) * GROUP
        size_m = tl.minimum(num_m - first_m, GROUP)
        m0 = (first_m + (tile % per_group) % size_m) * BLOCK_M
        n0 = ((tile % per_group) // size_m) * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(a_desc.load([m0, k0]), w_desc.load([n0, k0]).T, acc)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        _epilogue(acc, SA, SW, BIAS, OUT, OS, offs_m, offs_n, tl.minimum(offs_m, M - 1), M, N, EPI, BLOCK_M, BLOCK_N,
                  QB)


@triton.jit
def _mm_blockscaled_kernel(A, SA, W, SW, BIAS, OUT, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           QB: tl.constexpr, GROUP: tl.constexpr):
    """OUT [M, N] bf16 = sum over K blocks of (A[:, kb] e4m3 @ W[:, kb]^T e4m3) * SA[:, kb] (SA [M, K / QB]),
    * SW [N] + BIAS [N]: the K loop steps one quantisation block (BLOCK_K = QB)."""
    offs_m, offs_n, rows, a_ptr, w_ptr = _tile(A, W, M, N, K, BLOCK_M, BLOCK_N, QB, GROUP)
    s_ptr = SA + rows.to(tl.int64) * (K // QB)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for kb in tl.range(0, K // QB):
        part = tl.dot(tl.load(a_ptr), tl.trans(tl.load(w_ptr)))
        acc += part * tl.load(s_ptr + kb)[:, None]
        a_ptr += QB
        w_ptr += QB
    acc = acc * tl.load(SW + offs_n)[None, :] + tl.load(BIAS + offs_n).to(tl.float32)[None, :]
    tl.store(OUT + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], acc.to(tl.bfloat16),
             mask=(offs_m < M)[:, None])


def _grid(M, N, bm, bn):
    return (triton.cdiv(M, bm) * triton.cdiv(N, bn),)


def triton_mm(a, w, sa, sw, bias, tile, gelu_q: bool = False, tma: bool = False):
    """-> bf16 [M, N]; gelu_q: (e4m3 [M, N] of GELU, scales [M, N / QBLOCK]). tma: the persistent TMA kernel."""
    bm, bn, bk, warps, stages = tile
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=a.device, dtype=torch.float8_e4m3fn if gelu_q else torch.bfloat16)
    os_ = torch.empty(M, N // QBLOCK, device=a.device, dtype=torch.float32) if gelu_q else sw
    meta = dict(EPI=int(gelu_q), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, QB=QBLOCK, GROUP=8, num_warps=warps,
                num_stages=stages)
    if not tma:
        _mm_kernel[_grid(M, N, bm, bn)](a, w, sa, sw, bias, out, os_, M, N, K, **meta)
    else:
        from triton.tools.tensor_descriptor import TensorDescriptor

        sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
        grid = (min(sms, _grid(M, N, bm, bn)[0]),)
        _mm_tma_kernel[grid](TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]), sa,
                             sw, bias, out, os_, M, N, K, NUM_SMS=grid[0], **meta)
    return (out, os_) if gelu_q else out


def triton_mm_blockscaled(a, sa, w, sw, bias, tile):
    bm, bn, _, warps, stages = tile
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=a.device, dtype=torch.bfloat16)
    _mm_blockscaled_kernel[_grid(M, N, bm, bn)](a, sa, w, sw, bias, out, M, N, K, BLOCK_M=bm, BLOCK_N=bn, QB=QBLOCK,
                                                GROUP=8, num_warps=warps, num_stages=stages)
    return out


def operands(m, g, device):
    """e4m3 fc1 input [M, C] and per-token scales, fc1 / fc2 weights (e4m3, per-channel scales, bf16 bias)."""
    x = torch.randn(m, C, device=device, generator=g)
    sa = x.abs().amax(1) / 448
    a8 = (x / sa[:, None]).to(torch.float8_e4m3fn)
    w1 = torch.randn(MLP, C, device=device, generator=g) / math.sqrt(C)
    w2 = torch.randn(C, MLP, device=device, generator=g) / math.sqrt(MLP)
    s1, s2 = w1.abs().amax(1) / 448, w2.abs().amax(1) / 448
    w18, w28 = (w1 / s1[:, None]).to(torch.float8_e4m3fn), (w2 / s2[:, None]).to(torch.float8_e4m3fn)
    b1 = (torch.randn(MLP, device=device, generator=g) * 0.1).bfloat16()
    b2 = (torch.randn(C, device=device, generator=g) * 0.1).bfloat16()
    return a8, sa, w18, s1, b1, w28, s2, b2


def reference(a8, sa, w18, s1, b1, w28, s2, b2):
    """float32 math on the same e4m3 operands: fc2(GELU(fc1(a))) (GELU's input rounded to bf16, as the GEMM's)."""
    h = (a8.float() @ w18.float().t() * sa[:, None] * s1[None, :] + b1.float()).bfloat16().float()
    g = torch.nn.functional.gelu(h, approximate="tanh")
    return g @ (w28.float() * s2[:, None]).t() + b2.float()


def chain_cublas(a8, sa, w18, s1, b1, w28, s2, b2):
    from sd35fp8.fast.kernels import gelu_act

    h = torch._scaled_mm(a8, w18.t(), scale_a=sa[:, None], scale_b=s1[None, :], bias=b1, out_dtype=torch.bfloat16,
                         use_fast_accum=True)
    g8, gs = gelu_act(h, "dynamic")
    return torch._scaled_mm(g8, w28.t(), scale_a=gs, scale_b=s2[None, :], bias=b2, out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def chain_fused(ops, t1, t2, tma: bool = False):
    a8, sa, w18, s1, b1, w28, s2, b2 = ops
    g8, gs = triton_mm(a8, w18, sa, s1, b1, t1, gelu_q=True, tma=tma)
    return triton_mm_blockscaled(g8, gs, w28, s2, b2, t2)


def check_cpu() -> int:
    from sd35fp8.fp8.scaling import sqnr

    global C, MLP
    C, MLP = 256, 512
    g = torch.Generator().manual_seed(0)
    ops = operands(96, g, "cpu")
    ref = reference(*ops)
    tile = (32, 128, 64, 4, 2)
    a8, sa, w18, s1, b1, w28, s2, b2 = ops
    h = triton_mm(a8, w18, sa, s1, b1, tile)
    h_ref = (a8.float() @ w18.float().t() * sa[:, None] * s1[None, :] + b1.float())
    out = chain_fused(ops, tile, (32, 128, 128, 4, 2))
    out_tma = chain_fused(ops, tile, (32, 128, 128, 4, 2), tma=True)
    res = {"fc1_sqnr_db": float(sqnr(h_ref, h.float())), "fused_chain_sqnr_db": float(sqnr(ref, out.float())),
           "tma_chain_equal": bool(torch.equal(out, out_tma))}
    print(f"interpreter: {res}")
    return 0 if res["fc1_sqnr_db"] > 40 and res["fused_chain_sqnr_db"] > 20 and res["tma_chain_equal"] else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="JSON file, or a folder for the default name")
    ap.add_argument("--check-cpu", action="store_true", help="interpreter check against torch (small shapes)")
    args = ap.parse_args(argv)
    if args.check_cpu:
        return check_cpu()
    from results_io import write_json  # benchmarks/ is this script's folder
    from triton.testing import do_bench

    from sd35fp8.fp8.scaling import sqnr

    g = torch.Generator(device="cuda").manual_seed(0)
    ops = operands(M_X, g, "cuda")
    a8, sa, w18, s1, b1, w28, s2, b2 = ops
    ref = reference(*ops)
    flops1, flops2 = 2 * M_X * C * MLP, 2 * M_X * MLP * C
    bench = lambda fn: do_bench(fn, warmup=25, rep=200)  # noqa: E731
    res: dict = {"shape": {"M": M_X, "C": C, "MLP": MLP, "qblock": QBLOCK}}
    out = chain_cublas(*ops)
    res["cublas"] = {"chain_ms": bench(lambda: chain_cublas(*ops)), "sqnr_db": float(sqnr(ref, out.float())),
                     "fc1_ms": bench(lambda: torch._scaled_mm(a8, w18.t(), scale_a=sa[:, None], scale_b=s1[None, :],
                                                               bias=b1, out_dtype=torch.bfloat16, use_fast_accum=True))}
    print(f"cublas chain {res['cublas']['chain_ms']:.3f} ms (fc1 {res['cublas']['fc1_ms']:.3f}), "
          f"SQNR {res['cublas']['sqnr_db']:.2f} dB", flush=True)
    rows = []
    for tile in TILES:
        row = {"tile": tile}
        try:
            row["fc1_ms"] = bench(lambda: triton_mm(a8, w18, sa, s1, b1, tile))
            row["fc1_gelu_q_ms"] = bench(lambda: triton_mm(a8, w18, sa, s1, b1, tile, gelu_q=True))
            try:  # the persistent TMA kernel (its tiles' shared memory may not fit)
                row["fc1_tma_ms"] = bench(lambda: triton_mm(a8, w18, sa, s1, b1, tile, tma=True))
                row["fc1_tma_gelu_q_ms"] = bench(lambda: triton_mm(a8, w18, sa, s1, b1, tile, gelu_q=True, tma=True))
                row["fc1_tma_tflops"] = flops1 / row["fc1_tma_ms"] / 1e9
            except Exception as err:  # noqa: BLE001
                row["tma_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            g8, gs = triton_mm(a8, w18, sa, s1, b1, tile, gelu_q=True)
            row["fc2_blockscaled_ms"] = bench(lambda: triton_mm_blockscaled(g8, gs, w28, s2, b2, tile))
            row["fc1_tflops"] = flops1 / row["fc1_ms"] / 1e9
            row["fc2_blockscaled_tflops"] = flops2 / row["fc2_blockscaled_ms"] / 1e9
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        print(row, flush=True)
        rows.append(row)
    res["tiles"] = rows
    ok = [r for r in rows if "fc1_gelu_q_ms" in r]
    if ok:
        fc1 = min([(r["fc1_gelu_q_ms"], r["tile"], False) for r in ok]
                  + [(r["fc1_tma_gelu_q_ms"], r["tile"], True) for r in ok if "fc1_tma_gelu_q_ms" in r])
        t2 = min(ok, key=lambda r: r["fc2_blockscaled_ms"])
        out = chain_fused(ops, fc1[1], t2["tile"], tma=fc1[2])
        res["fused"] = {"fc1_tile": fc1[1], "fc1_tma": fc1[2], "fc2_tile": t2["tile"],
                        "chain_ms": bench(lambda: chain_fused(ops, fc1[1], t2["tile"], tma=fc1[2])),
                        "sqnr_db": float(sqnr(ref, out.float()))}
        print(f"fused chain {res['fused']['chain_ms']:.3f} ms, SQNR {res['fused']['sqnr_db']:.2f} dB "
              f"(cuBLAS chain {res['cublas']['chain_ms']:.3f} ms): x 38 blocks "
              f"{38 * (res['fused']['chain_ms'] - res['cublas']['chain_ms']):+.2f} ms a step", flush=True)
    write_json(args.out, "gemm_epilogue", res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
