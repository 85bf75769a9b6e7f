"""The context stream's small-M FP8 GEMMs: cuBLAS (torch._scaled_mm) against a plain Triton kernel with small tiles.

At 1024², CFG batch 2, the context stream's linears have M = 2 x 154 = 308 rows. cuBLAS runs them at 262-595
TFLOP/s (gemm_shapes_nvidia-h100-80gb-hbm3.json: 3.48 ms a Large step): with 128 x 128 tiles an M = 308, N = 2432
GEMM has 3 x 19 = 57 output tiles for 132 SMs. The Triton kernel here (e4m3 x e4m3 -> fp32, row-wise scales
and bias in the epilogue, bf16 out: the same contract as fast/step.py `matmul`) tries tiles of 64 rows and 64-256
columns, so the same GEMM has 95-190 tiles. Each shape: the best Triton tile, its time against cuBLAS's, and its
SQNR against cuBLAS's output.

    PYTHONPATH=src python benchmarks/gemm_small.py --out OUTDIR
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/gemm_small.py --check-cpu
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
from gemm_shapes import operands as shapes_operands  # benchmarks/ is this script's folder

C, MLP, BLOCKS = 2432, 9728, 38
M_CTX = 2 * 154
KINDS = {"qkv": (C, 3 * C, BLOCKS), "proj": (C, C, BLOCKS - 1), "fc1": (C, MLP, BLOCKS - 1),
         "fc2": (MLP, C, BLOCKS - 1)}  # (K, N, count a step)
TILES = [(64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 128, 128, 4, 5), (128, 64, 128, 4, 4),
         (64, 64, 256, 4, 3), (64, 256, 128, 8, 3), (128, 128, 128, 8, 4)]  # BM, BN, BK, warps, stages


@triton.jit
def _fp8_mm(A, W, SA, SW, BIAS, OUT, M, N, K, sam, swn, som, HAS_BIAS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT [M, N] bf16 = (A [M, K] e4m3 @ W [N, K]^T e4m3) * SA [M] * SW [N] (+ BIAS [N]); N % BLOCK_N == 0 and
    K % BLOCK_K == 0 (the step's shapes); rows >= M masked."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    rows = tl.minimum(offs_m, M - 1)  # clamped: the loads need no mask, the store masks
    a_ptr = A + rows[:, None].to(tl.int64) * sam + offs_k[None, :]
    w_ptr = W + offs_n[:, None].to(tl.int64) * swn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for _ in tl.range(0, K, BLOCK_K):
        acc = tl.dot(tl.load(a_ptr), tl.trans(tl.load(w_ptr)), acc)  # [BM, BK] x [BK, BN]
        a_ptr += BLOCK_K
        w_ptr += BLOCK_K
    acc = acc * tl.load(SA + rows)[:, None] * tl.load(SW + offs_n)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n).to(tl.float32)[None, :]
    tl.store(OUT + offs_m[:, None].to(tl.int64) * som + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=(offs_m < M)[:, None])


def triton_mm(a, w, sa, sw, bias, tile):
    bm, bn, bk, warps, stages = tile
    M, K = a.shape
    N = w.shape[0]
    out = torch.empty(M, N, device=a.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(M, bm), N // bn)
    _fp8_mm[grid](a, w, sa, sw, bias if bias is not None else sw, out, M, N, K, a.stride(0), w.stride(0),
                  out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                  num_stages=stages)
    return out


def operands(m, k, n, device, g):
    """gemm_shapes' operands (e4m3 a [M, K], w [N, K], row-wise scales) and a bf16 bias [N]."""
    ops = shapes_operands(m, k, n, g, device)
    return (*ops, (torch.randn(n, device=device, generator=g) * 0.1).bfloat16())  # drawn after them, as before


def reference(a, w, sa, sw, bias):
    return (a.float() @ w.float().t() * sa * sw + bias.float()).bfloat16()


def check_cpu() -> int:
    from sd35fp8.fp8.scaling import sqnr

    g = torch.Generator().manual_seed(0)
    a, w, sa, sw, bias = operands(100, 256, 128, "cpu", g)
    out = triton_mm(a, w, sa.reshape(-1), sw.reshape(-1), bias, (64, 64, 128, 4, 2))
    db = float(sqnr(reference(a, w, sa, sw, bias).float(), out.float()))
    print(f"interpreter: SQNR vs torch {db:.1f} dB")
    return 0 if db > 40 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="JSON file, or a folder for the default name")
    ap.add_argument("--check-cpu", action="store_true", help="interpreter check against torch")
    args = ap.parse_args(argv)
    if args.check_cpu:
        return check_cpu()
    from results_io import write_json  # benchmarks/ is this script's folder
    from triton.testing import do_bench

    from sd35fp8.fp8.scaling import sqnr

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, total = [], {"cublas": 0.0, "triton": 0.0}
    for kind, (k, n, count) in KINDS.items():
        a, w, sa, sw, bias = operands(M_CTX, k, n, "cuda", g)
        ref = torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw, bias=bias, out_dtype=torch.bfloat16,
                               use_fast_accum=True)
        flops = 2 * M_CTX * k * n
        row = {"gemm": f"ctx.{kind}", "M": M_CTX, "K": k, "N": n, "count": count,
               "cublas_ms": do_bench(lambda: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw, bias=bias,
                                                              out_dtype=torch.bfloat16, use_fast_accum=True),
                                     warmup=25, rep=200), "tiles": []}
        for tile in TILES:
            if n % tile[1] or k % tile[2]:
                continue
            try:
                out = triton_mm(a, w, sa.reshape(-1), sw.reshape(-1), bias, tile)
                ms = do_bench(lambda: triton_mm(a, w, sa.reshape(-1), sw.reshape(-1), bias, tile), warmup=25, rep=200)
                row["tiles"].append({"tile": tile, "ms": ms, "sqnr_vs_cublas_db": float(sqnr(ref.float(), out.float()))})
            except Exception as err:  # noqa: BLE001
                row["tiles"].append({"tile": tile, "error": f"{type(err).__name__}: {str(err)[:200]}"})
        best = min((t for t in row["tiles"] if "ms" in t), key=lambda t: t["ms"])
        row["triton_best"] = best
        total["cublas"] += row["cublas_ms"] * count
        total["triton"] += best["ms"] * count
        print(f"ctx.{kind:4s} M {M_CTX} K {k:5d} N {n:5d}: cuBLAS {row['cublas_ms'] * 1e3:6.1f} us "
              f"({flops / row['cublas_ms'] / 1e9:4.0f} TFLOP/s), Triton {best['ms'] * 1e3:6.1f} us "
              f"({flops / best['ms'] / 1e9:4.0f}) at {best['tile']}, SQNR {best['sqnr_vs_cublas_db']:.1f} dB", flush=True)
        rows.append(row)
    print(f"a step: cuBLAS {total['cublas']:.2f} ms, Triton {total['triton']:.2f} ms", flush=True)
    write_json(args.out, "gemm_small", {"rows": rows, "ms_a_step": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
