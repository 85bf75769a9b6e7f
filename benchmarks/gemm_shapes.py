"""Where the Large step's FP8 GEMM time goes, shape by shape, and whether the context stream's small GEMMs
can ride along with the image stream's.

The fused step (fast/step.py) runs every linear as torch._scaled_mm (e4m3 x e4m3, row-wise scales, bf16
out, use_fast_accum). For SD3.5 Large at 1024², CFG batch 2 (image tokens M = 2 x 4096, context tokens
M = 2 x 154), this program times each distinct GEMM alone (triton.testing.do_bench, random e4m3
operands), multiplies by its count a step (38 joint blocks; the last block's context stream has its
qkv only; the fused adaLN of every block is one M = 2 GEMM over 2.68 GB of weights) and prints the sum
next to the profile's fp8_gemm group. Then, per linear kind, three ways to run the image and context
GEMMs of one block:

    separate   two _scaled_mm calls on one stream (the step as it is)
    grouped    one torch._scaled_grouped_mm over [image; context] rows with the two weights stacked
               (context rows padded to a multiple of 16)
    streams    the context GEMM on a second CUDA stream, concurrent with the image GEMM

and writes JSON (device, versions, date, rows) to --out.

    PYTHONPATH=src python benchmarks/gemm_shapes.py --out OUTDIR     # H100: ~1 min
"""

from __future__ import annotations

import argparse

import torch
from results_io import write_json  # benchmarks/ is this script's folder

C, MLP, BLOCKS = 2432, 9728, 38
M_X, M_CTX = 2 * 4096, 2 * 154
KINDS = {"qkv": (C, 3 * C), "proj": (C, C), "fc1": (C, MLP), "fc2": (MLP, C)}  # (K, N)
ADA_N = (BLOCKS * 12 - 4) * C  # every block's x and context adaLN (6C each; the last context block 2C)


def operands(m: int, k: int, n: int, g: torch.Generator, device: str = "cuda"):
    a = (torch.randn(m, k, device=device, generator=g) * 0.5).to(torch.float8_e4m3fn)
    w = (torch.randn(n, k, device=device, generator=g) * 0.5).to(torch.float8_e4m3fn)  # [N, K] as the engine
    sa = torch.rand(m, 1, device=device, generator=g) + 0.5
    sw = torch.rand(1, n, device=device, generator=g) + 0.5
    return a, w, sa, sw


def mm(a, w, sa, sw):
    return torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=True)


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="JSON file, or a folder for the default name")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, total = [], 0.0
    shapes = [(f"x.{kd}", M_X, k, n, BLOCKS) for kd, (k, n) in KINDS.items()]
    shapes += [(f"ctx.{kd}", M_CTX, k, n, BLOCKS if kd == "qkv" else BLOCKS - 1) for kd, (k, n) in KINDS.items()]
    shapes += [("adaLN (fused)", 2, C, ADA_N, 1)]
    print(f"{'gemm':14s} {'M':>6s} {'K':>6s} {'N':>8s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>7s} {'count':>5s} {'ms/step':>8s}")
    for name, m, k, n, count in shapes:
        ops = operands(m, k, n, g)
        ms = do_bench(lambda: mm(*ops), warmup=25, rep=100)
        tf = 2 * m * k * n / ms / 1e9
        gbs = (m * k + n * k + 2 * m * n) / ms / 1e6
        total += ms * count
        rows.append({"gemm": name, "M": m, "K": k, "N": n, "ms": ms, "tflops": tf, "gbs": gbs, "count": count,
                     "ms_per_step": ms * count})
        print(f"{name:14s} {m:6d} {k:6d} {n:8d} {ms:8.4f} {tf:8.1f} {gbs:7.0f} {count:5d} {ms * count:8.3f}")
        del ops
    print(f"sum a step: {total:.2f} ms")

    pad = -(-M_CTX // 16) * 16
    side = torch.cuda.Stream()
    pairs = []
    print(f"\n{'kind':6s} {'separate':>9s} {'grouped':>9s} {'streams':>9s}  (ms, one block's image + context GEMM)")
    for kd, (k, n) in KINDS.items():
        xa, xw, xsa, xsw = operands(M_X, k, n, g)
        ca, cw, csa, csw = operands(M_CTX, k, n, g)
        row = {"kind": kd, "separate": do_bench(lambda: (mm(xa, xw, xsa, xsw), mm(ca, cw, csa, csw)), warmup=25, rep=100)}
        try:
            a = torch.cat([xa.view(torch.uint8), torch.nn.functional.pad(ca.view(torch.uint8), (0, 0, 0, pad - M_CTX))])
            a = a.view(torch.float8_e4m3fn)  # [M_X + pad, K]
            wb = torch.stack([xw, cw]).transpose(1, 2)  # [2, K, N] column-major per group
            sa = torch.cat([xsa.reshape(-1), torch.nn.functional.pad(csa.reshape(-1), (0, pad - M_CTX))])
            sb = torch.cat([xsw, csw])  # [2, N]
            offs = torch.tensor([M_X, M_X + pad], device="cuda", dtype=torch.int32)

            def grouped():
                return torch._scaled_grouped_mm(a, wb, sa, sb, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True)
            y = grouped()
            ref = torch.cat([mm(xa, xw, xsa, xsw), mm(ca, cw, csa, csw)])
            row["grouped_max_abs_diff"] = float((y[:M_X + M_CTX].float() - ref.float()).abs().max())
            row["grouped"] = do_bench(grouped, warmup=25, rep=100)
        except Exception as err:  # noqa: BLE001
            row["grouped_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"

        def streams():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                mm(ca, cw, csa, csw)
            mm(xa, xw, xsa, xsw)
            torch.cuda.current_stream().wait_stream(side)
        row["streams"] = do_bench(streams, warmup=25, rep=100)
        pairs.append(row)
        print(f"{kd:6s} {row['separate']:9.4f} {row.get('grouped', float('nan')):9.4f} {row['streams']:9.4f}  "
              f"{row.get('grouped_error', '')}")
    write_json(args.out, "gemm_shapes", {"gemms": rows, "sum_ms_per_step": total, "image_and_context": pairs})


if __name__ == "__main__":
    main()
