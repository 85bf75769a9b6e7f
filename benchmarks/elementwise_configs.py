"""Sweep the launch width (num_warps) of the fused step's row kernels (fast/kernels.py) at the SD3.5 Large
shapes (CFG batch 2, 4096 + 154 tokens, C = 2432, MLP 9728), FP8 dynamic: time and achieved GB/s of each.

    python benchmarks/elementwise_configs.py --out benchmarks/results/elementwise_configs_<device>.json   # CUDA

Kernels: GELU + per-token e4m3 (fc2 input, `_act_rows_kernel`), per-token e4m3 alone (proj input, the same
kernel), x + gate * y then LayerNorm, modulate, e4m3 (`_residual_ln_modulate_kernel`). Bytes = what each must
read and write once (bf16 in, e4m3 + fp32 row scales out, bf16 x out); the project's choice is marked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096 + 154)
    ap.add_argument("--hidden", type=int, default=2432)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("elementwise_configs.py needs CUDA", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    from sd35fp8.fast import kernels as k

    dev = torch.device("cuda")
    B, L, C = 2, args.tokens, args.hidden
    M, F = B * L, 4 * C
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(M, F, device=dev, generator=g).to(torch.bfloat16)  # fc1 output
    o = torch.randn(M, C, device=dev, generator=g).to(torch.bfloat16)  # attention output
    x = torch.randn(B, L, C, device=dev, generator=g).to(torch.bfloat16)
    y = torch.randn(M, C, device=dev, generator=g).to(torch.bfloat16)
    mods = torch.randn(B, 3 * C, device=dev, generator=g).to(torch.bfloat16)
    gate, shift, scale = mods[:, :C], mods[:, C:2 * C], mods[:, 2 * C:]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "shape": {"B": B, "L": L, "C": C, "mlp": F}, "kernels": {}}

    def rows_case(name, t, gelu, project_warps):
        n = t.shape[1]
        q = torch.empty(t.shape, device=dev, dtype=torch.float8_e4m3fn)
        s = torch.empty(t.shape[0], 1, device=dev, dtype=torch.float32)
        block = triton.next_power_of_2(n)
        nbytes = t.numel() * 2 + q.numel() + s.numel() * 4
        rows = []
        for w in (4, 8, 16, 32):
            fn = lambda: k._act_rows_kernel[(t.shape[0],)](t, q, s, q, n, n, BLOCK=block, MODE=1, GELU=gelu,  # noqa: E731
                                                            num_warps=w)
            fn()
            ms = do_bench(fn, warmup=10, rep=100)
            rows.append({"num_warps": w, "ms": ms, "gb_s": nbytes / ms / 1e6, "project": w == project_warps})
        res["kernels"][name] = rows

    block_f = triton.next_power_of_2(F)
    rows_case("gelu_quant_fc2_input", h, True, k.row_warps(block_f))
    block_c = triton.next_power_of_2(C)
    rows_case("quant_proj_input", o, False, k.row_warps(block_c))

    x_new = torch.empty_like(x)
    q = torch.empty(M, C, device=dev, dtype=torch.float8_e4m3fn)
    s = torch.empty(M, 1, device=dev, dtype=torch.float32)
    nbytes = x.numel() * 2 * 2 + y.numel() * 2 + q.numel() + s.numel() * 4
    rows = []
    for w in (4, 8, 16, 32):
        fn = lambda: k._residual_ln_modulate_kernel[(M,)](x, y, gate, shift, scale, x_new, q, s, q, L, C, C,  # noqa: E731
                                                          mods.stride(0), EPS=k.NORM_EPS, BLOCK=block_c, MODE=1,
                                                          num_warps=w)
        fn()
        ms = do_bench(fn, warmup=10, rep=100)
        rows.append({"num_warps": w, "ms": ms, "gb_s": nbytes / ms / 1e6, "project": w == k.row_warps(block_c)})
    res["kernels"]["residual_ln_modulate_quant"] = rows

    for name, rows in res["kernels"].items():
        print(name)
        for r in rows:
            print(f"  warps {r['num_warps']:2d}: {r['ms'] * 1000:7.1f} us  {r['gb_s']:7.0f} GB/s{'  <- project' if r['project'] else ''}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
