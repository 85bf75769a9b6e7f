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

from gemm_epilogue_kernels import QBLOCK, triton_mm, triton_mm_blockscaled

C, MLP, M_X = 2432, 9728, 2 * 4096
TILES = [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (256, 128, 128, 8, 3),
         (128, 256, 64, 8, 4)]  # BM, BN, BK, warps, stages (BN a multiple of QBLOCK for the fused fc1)


def operands(m, g, device, c=C, mlp=MLP):
    """e4m3 fc1 input [M, c] and per-token scales, fc1 / fc2 weights (e4m3, per-channel scales, bf16 bias)."""
    x = torch.randn(m, c, device=device, generator=g)
    sa = x.abs().amax(1) / 448
    a8 = (x / sa[:, None]).to(torch.float8_e4m3fn)
    w1 = torch.randn(mlp, c, device=device, generator=g) / math.sqrt(c)
    w2 = torch.randn(c, mlp, device=device, generator=g) / math.sqrt(mlp)
    s1, s2 = w1.abs().amax(1) / 448, w2.abs().amax(1) / 448
    w18, w28 = (w1 / s1[:, None]).to(torch.float8_e4m3fn), (w2 / s2[:, None]).to(torch.float8_e4m3fn)
    b1 = (torch.randn(mlp, device=device, generator=g) * 0.1).bfloat16()
    b2 = (torch.randn(c, device=device, generator=g) * 0.1).bfloat16()
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

    g = torch.Generator().manual_seed(0)
    ops = operands(96, g, "cpu", c=256, mlp=512)
    ref = reference(*ops)
    tile = (32, 128, 64, 4, 2)
    a8, sa, w18, s1, b1, w28, s2, b2 = ops
    h = triton_mm(a8, w18, sa, s1, b1, tile, tma=False)
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
            row["fc1_ms"] = bench(lambda: triton_mm(a8, w18, sa, s1, b1, tile, tma=False))
            row["fc1_gelu_q_ms"] = bench(lambda: triton_mm(a8, w18, sa, s1, b1, tile, gelu_q=True, tma=False))
            try:  # the persistent TMA kernel (its tiles' shared memory may not fit)
                row["fc1_tma_ms"] = bench(lambda: triton_mm(a8, w18, sa, s1, b1, tile, tma=True))
                row["fc1_tma_gelu_q_ms"] = bench(lambda: triton_mm(a8, w18, sa, s1, b1, tile, gelu_q=True, tma=True))
                row["fc1_tma_tflops"] = flops1 / row["fc1_tma_ms"] / 1e9
            except Exception as err:  # noqa: BLE001
                row["tma_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            g8, gs = triton_mm(a8, w18, sa, s1, b1, tile, gelu_q=True, tma=False)
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
