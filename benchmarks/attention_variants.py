"""FP8 attention: how P's e4m3 codes are made (fast/attention_triton.py `P8_MODES`), at Large's joint shape.

Per score the FP8 kernel spends one MUFU ex2 and half a cvt.rn.satfinite.e4m3x2, both on the SM's
16-lanes-a-clock unit, which bounds a head-64 tile (docs/PERF.md, session 21). The int mode makes the codes
from the exponentials' bits on the integer pipes instead (`_e4m3_codes`: per 4 scores 4 LEA + 3 PRMT);
alternate does so for every second key block. This program times the library kernel (`_attn_fwd`, FP8
path) in each mode and several block configs at B 2, H 38, L 4429, D 64 (one Large joint attention) on
q, k, v with outlier channels and qk RMS-norm quantised by `quantize_qkv`.

Each row: median ms (triton.testing.do_bench), TFLOP/s (4 B H L^2 D), SQNR against fp32 attention on the
first --ref-heads heads and against `fp8_attention_emulated(p8=mode)`. Prints a table, the SASS opcode
counts of each mode's loop (benchmarks/kernel_sass.py) and the best config per mode; writes JSON (device,
versions, date, rows) to --out.

    PYTHONPATH=src python benchmarks/attention_variants.py --out OUTDIR     # H100: ~2 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
from pathlib import Path

import torch

from sd35fp8.fast.attention_triton import (P8_MODES, P_LOG2_SCALE, _LOG2E, _attn_fwd, fp8_attention_emulated,
                                           quantize_qkv, triton)
from sd35fp8.fp8.scaling import sqnr

B, H, L, D = 2, 38, 4429, 64
CONFIGS = [(64, 128, 4, 4), (64, 128, 4, 3), (64, 128, 4, 2), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]


def run_mode(pre, p8: int, cfg: tuple[int, int, int, int]):
    """A launcher of the library kernel on pre-quantised inputs in P8 mode p8 with one config, and its output."""
    q8, k8, v8t, scale, length = pre
    bm, bn, w, s = cfg
    oc = torch.empty(B, 0, H * D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(B, length, H * D, device="cuda", dtype=torch.bfloat16)
    grid = (triton.cdiv(length, bm), B * H)
    sv = (*v8t.stride()[:2], 1, v8t.stride(2))

    def fn():
        return _attn_fwd[grid](q8, k8, v8t, oc, out, scale, scale, _LOG2E / math.sqrt(D), *q8.stride()[:3],
                               *k8.stride()[:3], *sv, H, length, 0, HEAD_DIM=D, FP8=True, P_SHIFT=P_LOG2_SCALE,
                               OUT_FP8=False, EXP=1, P8=p8, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    return fn, out


def reference(q, k, v, heads: int) -> torch.Tensor:
    """fp32 attention on the first `heads` heads -> [B, L, heads*D]."""
    q, k, v = (t[:, :, :heads].float().transpose(1, 2) for t in (q, k, v))  # [B, h, L, D]
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v
    return o.transpose(1, 2).reshape(B, q.shape[2], heads * D)


def main() -> None:
    from kernel_sass import histograms, sass  # benchmarks/ is this script's folder
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="JSON file, or a folder for the default name")
    ap.add_argument("--ref-heads", type=int, default=4)
    ap.add_argument("--modes", default=",".join(P8_MODES))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, L, 3, H, D, device="cuda", generator=g)
    qkv[:, :, :2, :, [7, 39]] *= 20  # outlier channels, then per-token RMS norm (as attention_fp8.py)
    qkv[:, :, :2] /= qkv[:, :, :2].pow(2).mean(-1, keepdim=True).sqrt()
    qkv = qkv.bfloat16()
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    pre = quantize_qkv(q, k, v)
    r = args.ref_heads
    ref = reference(q, k, v, r)
    flops = 4 * B * H * L * L * D
    rows, loops, emus = [], {}, {}
    print(f"{'mode':10s} {'BM':>4s} {'BN':>4s} {'w':>2s} {'s':>2s} {'ms':>7s} {'TFLOP/s':>8s} {'SQNR ref':>9s} {'vs emu':>7s}")
    for name in args.modes.split(","):
        p8 = P8_MODES[name]
        for cfg in CONFIGS:
            row = {"mode": name, "BLOCK_M": cfg[0], "BLOCK_N": cfg[1], "num_warps": cfg[2], "num_stages": cfg[3]}
            try:
                fn, out = run_mode(pre, p8, cfg)
                compiled = fn()
                torch.cuda.synchronize()
                ms = do_bench(fn, warmup=25, rep=200)
                got = out.view(B, L, H, D)[:, :, :r].reshape(B, L, r * D).float()
                key = (cfg[1], name)
                if key not in emus:
                    emus[key] = fp8_attention_emulated(q[:, :, :r], k[:, :, :r], v[:, :, :r], block_n=cfg[1],
                                                       p8=name).view_as(got)
                try:
                    text, res = sass(compiled)
                    _, loop, n_loop = histograms(text)
                except Exception as err:  # noqa: BLE001  (counts are extra; the timing stands)
                    res, loop, n_loop = f"sass: {type(err).__name__}", {}, 0
                row.update(ms=ms, tflops=flops / ms / 1e9, sqnr_ref_db=sqnr(ref, got),
                           sqnr_emulation_db=sqnr(emus[key], got), resources=res, loop_instructions=n_loop)
                loops.setdefault(f"{name} {cfg}", loop)
                print(f"{name:10s} {cfg[0]:4d} {cfg[1]:4d} {cfg[2]:2d} {cfg[3]:2d} {ms:7.4f} {row['tflops']:8.1f} "
                      f"{row['sqnr_ref_db']:9.2f} {row['sqnr_emulation_db']:7.2f}  {res.split()[0]} loop {n_loop}",
                      flush=True)
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                print(name, cfg, row["error"], flush=True)
            rows.append(row)
    best = {}
    for row in rows:
        if "ms" in row and (row["mode"] not in best or row["ms"] < best[row["mode"]]["ms"]):
            best[row["mode"]] = row
    print("\nbest config per mode:")
    for name, row in best.items():
        print(f"{name:10s} {row['ms']:.4f} ms {row['tflops']:.1f} TFLOP/s  SQNR {row['sqnr_ref_db']:.2f} dB "
              f"(vs emulation {row['sqnr_emulation_db']:.1f})  {row['BLOCK_M']} x {row['BLOCK_N']}, "
              f"{row['num_warps']} warps, {row['num_stages']} stages")
    dev = torch.cuda.get_device_name()
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / f"attention_variants_{re.sub(r'[^a-z0-9]+', '-', dev.lower()).strip('-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                               "versions": {"torch": torch.__version__, "triton": triton.__version__,
                                            "cuda": torch.version.cuda},
                               "shape": {"B": B, "H": H, "L": L, "D": D}, "rows": rows, "best": best,
                               "loop_sass": loops}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
