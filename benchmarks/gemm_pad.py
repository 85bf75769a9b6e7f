"""Would padding a GEMM's N let cuBLAS run the Large step's narrow GEMMs faster?

x.proj (8192 x 2432 x 2432) and x.fc2 (8192 x 9728 x 2432) run at 1145-1221 TFLOP/s against 1401-1459 for the wide
qkv / fc1 (gemm_shapes_nvidia-h100-80gb-hbm3.json): N = 2432 = 19 x 128 gives 1216 output tiles of 128 x 128,
9.2 waves over 132 SMs. This times torch._scaled_mm (e4m3, row-wise scales, bf16 out, fast accumulation, as
fast/step.py) at N = 2432 and at padded N (zero weight rows would fill the pad; the output would be read with a
row stride), and M split into the two CFG halves, and reports the time and the useful TFLOP/s (of N = 2432).

    PYTHONPATH=src python benchmarks/gemm_pad.py --out OUTDIR
"""

from __future__ import annotations

import argparse

import torch
from gemm_shapes import mm, operands  # benchmarks/ is this script's folder
from results_io import write_json

M, C, MLP = 2 * 4096, 2432, 9728


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="JSON file, or a folder for the default name")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, k in (("proj", C), ("fc2", MLP)):
        for n in (C, 2560, 2688, 3072):
            ops = operands(M, k, n, g)
            ms = do_bench(lambda: mm(*ops), warmup=25, rep=200)
            rows.append({"gemm": name, "M": M, "K": k, "N": n, "ms": ms, "useful_tflops": 2 * M * k * C / ms / 1e9})
            print(f"{name:5s} M {M} K {k:5d} N {n:5d}: {ms:.4f} ms, useful {rows[-1]['useful_tflops']:.0f} TFLOP/s",
                  flush=True)
        a, w, sa, sw = operands(M, k, C, g)
        half = M // 2
        ms = do_bench(lambda: (mm(a[:half], w, sa[:half], sw), mm(a[half:], w, sa[half:], sw)), warmup=25, rep=200)
        rows.append({"gemm": name, "M": "2 x 4096", "K": k, "N": C, "ms": ms, "useful_tflops": 2 * M * k * C / ms / 1e9})
        print(f"{name:5s} M 2 x {half} K {k:5d} N {C}: {ms:.4f} ms, useful {rows[-1]['useful_tflops']:.0f} TFLOP/s",
              flush=True)
    write_json(args.out, "gemm_pad", {"rows": rows})


if __name__ == "__main__":
    main()
