"""Sweep the FP8 attention kernel's tile configs (fast/attention_triton.py `_attn_fwd`) wider than the
project's autotune list, at the SD3.5 Large joint-attention shapes: every config's time, sorted.

    python benchmarks/attention_configs.py --out benchmarks/results/attention_configs_<device>.json   # CUDA
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096 + 154, 4096 + 333])
    ap.add_argument("--heads", type=int, default=38)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_configs.py needs CUDA", file=sys.stderr)
        return 2
    import triton

    from sd35fp8.fast import attention_triton as at

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4, 5, 6))
               if not (bm == 64 and w == 8)]
    tuner = triton.autotune(configs, key=["L", "HEAD_DIM", "FP8", "EXP"], do_bench=at._bench_config)(at._attn_fwd)
    project = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in at._CONFIGS}
    at._attn_fwd_tuned = tuner
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "heads": args.heads, "batch": 2, "head_dim": 64, "cases": {}}
    for length in args.lengths:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, length, args.heads, 64, device="cuda", generator=g).bfloat16() for _ in range(3))
        pre = at.quantize_qkv(q, k, v)
        tuner.cache.clear()
        at.attention_fp8(pre, torch.bfloat16)
        torch.cuda.synchronize()
        rows = sorted(((float(t[0] if isinstance(t, (list, tuple)) else t), c) for c, t in tuner.configs_timings.items()),
                      key=lambda r: r[0])
        flops = 4 * 2 * args.heads * length * length * 64
        table = [{"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "BLOCK_M": c.kwargs["BLOCK_M"],
                  "BLOCK_N": c.kwargs["BLOCK_N"], "num_warps": c.num_warps, "num_stages": c.num_stages,
                  "in_project_list": (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in project}
                 for ms, c in rows]
        result["cases"][str(length)] = table
        print(f"L = {length}: best 8")
        for r in table[:8]:
            print(f"  {r['ms']:.4f} ms {r['tflops']:6.1f} TFLOP/s  BM {r['BLOCK_M']} BN {r['BLOCK_N']} "
                  f"w {r['num_warps']} s {r['num_stages']}{' (project list)' if r['in_project_list'] else ''}")
        best_project = next(r for r in table if r["in_project_list"])
        print(f"  best of the project's list: {best_project['ms']:.4f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
