"""Kernel-level costs of the fused LoRA road (lora/fused.py) at the Large config, 1024^2, CFG batch 2:
the down kernel (kernels.lora_down_fp8) over a sweep of tile configs and with fp8 down factors, and the
K-augmented `_scaled_mm` against the base GEMM (R = 64 spare columns, or R padded to 128).

    python benchmarks/lora_kernels.py --out benchmarks/results/lora_kernels_<device>.json   # CUDA only
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from sd35fp8.tiny.evaluate import write_result

HIDDEN, MLP = 2432, 9728
LAYERS = {"qkv": (3 * HIDDEN, HIDDEN), "proj": (HIDDEN, HIDDEN), "fc1": (MLP, HIDDEN), "fc2": (HIDDEN, MLP)}
ROWS = {"context": 2 * 333, "image": 2 * 4096}


def bench(fn, reps: int = 50, calls: int = 10) -> float:
    """Median GPU ms of one fn() call, as the engine's CUDA graphs run it: `calls` calls captured in one
    CUDA graph (after warm-up, so autotuning is done), replayed `reps` times between CUDA events, / calls.
    Events around a single eager call would also time the CPU's launch (the autotuner's Python dispatch,
    the split-K workspace allocation: tens of microseconds), which the graphed step never pays; the
    2026-12-05 H100 sweep was timed that way and its `project` column is inflated by it."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / calls)
    ts.sort()
    return ts[len(ts) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("lora_kernels.py needs CUDA", file=sys.stderr)
        return 2
    import triton
    import triton.language as tl

    from sd35fp8.fast import kernels

    @triton.jit
    def down_kernel(A, D, INVB, M, K, LDA, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    FP8_D: tl.constexpr):
        pid = tl.program_id(0)
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, R)
        mmask = rm < M
        row = A + rm[:, None].to(tl.int64) * LDA
        acc = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            a = tl.load(row + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            d = tl.load(D + rr[:, None] * K + rk[None, :], mask=kmask[None, :], other=0.0)
            if FP8_D:
                acc = tl.dot(a, tl.trans(d), acc)
            else:
                acc = tl.dot(a.to(tl.bfloat16), tl.trans(d), acc)
        h = acc * tl.load(INVB + rr)[None, :]
        h = tl.minimum(tl.maximum(h, -448.0), 448.0)
        tl.store(row + K + rr[None, :], h.to(tl.float8e4nv), mask=mmask[:, None])

    @triton.jit
    def down_partial_kernel(A, D, P, M, K, LDA, KCHUNK, R: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        # split-K: program (i, s) sums columns [s KCHUNK, (s + 1) KCHUNK) of rows tile i into P[s] [M, R] fp32
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
            a = tl.load(row + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            d = tl.load(D + rr[:, None] * K + rk[None, :], mask=kmask[None, :], other=0.0)
            acc = tl.dot(a.to(tl.bfloat16), tl.trans(d), acc)
        tl.store(P + sid.to(tl.int64) * M * R + rm[:, None] * R + rr[None, :], acc, mask=mmask[:, None])

    @triton.jit
    def down_finish_kernel(P, A, INVB, M, K, LDA, S, R: tl.constexpr, BLOCK_M: tl.constexpr):
        pid = tl.program_id(0)
        rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = tl.arange(0, R)
        mmask = rm < M
        h = tl.zeros((BLOCK_M, R), dtype=tl.float32)
        for s in range(0, S):
            h += tl.load(P + s * M * R + rm[:, None] * R + rr[None, :], mask=mmask[:, None], other=0.0)
        h = h * tl.load(INVB + rr)[None, :]
        h = tl.minimum(tl.maximum(h, -448.0), 448.0)
        tl.store(A + rm[:, None].to(tl.int64) * LDA + K + rr[None, :], h.to(tl.float8e4nv), mask=mmask[:, None])

    def split_k(a, k, d, invb, splits, bm, bk, nw, ns, ws):
        m, r = a.shape[0], d.shape[0]
        chunk = triton.cdiv(triton.cdiv(k, splits), bk) * bk
        s = triton.cdiv(k, chunk)
        down_partial_kernel[(triton.cdiv(m, bm), s)](a, d, ws, m, k, a.stride(0), chunk, R=r, BLOCK_M=bm,
                                                     BLOCK_K=bk, num_warps=nw, num_stages=ns)
        down_finish_kernel[(triton.cdiv(m, 32),)](ws, a, invb, m, k, a.stride(0), s, R=r, BLOCK_M=32, num_warps=4)

    dev = torch.device("cuda")
    r = args.rank
    res: dict = {"rank": r, "down": {}, "gemm": {}}
    bw = None
    x = torch.empty(1 << 28, device=dev, dtype=torch.uint8)
    t = bench(lambda: x.clone())
    bw = 2 * x.numel() / (t * 1e-3) / 1e9  # GB/s read + write
    res["copy_gb_s"] = bw
    del x
    tot = {}
    for (rname, m), (lname, (n, k)) in itertools.product(ROWS.items(), LAYERS.items()):
        name = f"{rname}/{lname}"
        a = (torch.randn(m, k + r, device=dev) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        d = torch.randn(r, k, device=dev, dtype=torch.bfloat16) * 0.02
        invb = torch.full((r,), 1.0 / (0.02 * k ** 0.5 * 160 / 16), device=dev)
        d8 = (d.float() / (d.float().abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn)
        row = {"floor_ms": (m * (k + r) + r * k * 2) / bw / 1e6,  # bytes moved / copy GB/s
               "project": bench(lambda: kernels.lora_down_fp8(a, k, d, invb))}
        for bm, bk, nw, ns in itertools.product((32, 64, 128), (64, 128), (4,), (3, 4)):
            for fp8d in (False, True):
                dd = d8 if fp8d else d
                key = f"{'fp8' if fp8d else 'bf16'} bm{bm} bk{bk} w{nw} s{ns}"
                try:
                    row[key] = bench(lambda: down_kernel[(triton.cdiv(m, bm),)](
                        a, dd, invb, m, k, a.stride(0), R=r, BLOCK_M=bm, BLOCK_K=bk, FP8_D=fp8d,
                        num_warps=nw, num_stages=ns), reps=20)
                except Exception as e:  # noqa: BLE001  (out of shared memory etc.)
                    row[key] = None
        ws = torch.empty(16 * m * r, device=dev, dtype=torch.float32)
        kernels.lora_down_fp8(a, k, d, invb)
        ref = a[:, k:].float().clone()
        for splits, bm, bk, nw, ns in itertools.product((2, 4, 8, 16), (32, 64), (128,), (4,), (3,)):
            key = f"split{splits} bm{bm} bk{bk} w{nw} s{ns}"
            try:
                row[key] = bench(lambda: split_k(a, k, d, invb, splits, bm, bk, nw, ns, ws), reps=20)
                err = (a[:, k:].float() - ref).abs().max().item()
                if err > 0.15 * ref.abs().max().item():  # one e4m3 step at the top of the range: 32 of 448
                    row[key + " error"] = err
                    row[key] = None
            except Exception:  # noqa: BLE001
                row[key] = None
        best = {p: min(((v, kk) for kk, v in row.items() if kk.startswith(p) and isinstance(v, float)),
                       default=None) for p in ("bf16", "fp8", "split")}
        row["best"] = best
        res["down"][name] = row
        print(f"{name:16s} down: project {row['project']*1e3:7.1f} us  best bf16 {best['bf16'][0]*1e3:7.1f} us "
              f"({best['bf16'][1]})  best fp8 {best['fp8'][0]*1e3:7.1f} us ({best['fp8'][1]})  "
              f"floor {row['floor_ms']*1e3:6.1f} us", flush=True)
        w = (torch.randn(n, k + 128, device=dev) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        sa = torch.rand(m, 1, device=dev) + 0.5
        sb = torch.rand(1, n, device=dev) + 0.5
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
        a128 = (torch.randn(m, k + 128, device=dev) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        g = {}
        for extra in (0, 64, 128):
            aa = a128[:, :k + extra].contiguous()
            ww = w[:, :k + extra].contiguous()
            g[f"k+{extra}"] = bench(lambda: torch._scaled_mm(aa, ww.t(), scale_a=sa, scale_b=sb, bias=bias,
                                                             out_dtype=torch.bfloat16, use_fast_accum=True))
        res["gemm"][name] = g
        print(f"{name:16s} gemm: " + "  ".join(f"{kk} {v*1e3:7.1f} us" for kk, v in g.items()), flush=True)
        write_result(dict(res), "lora_kernels", dev, args.out)  # after every shape: a timeout keeps the rest
        for kk in ("project", "best_bf16", "best_fp8", "best_split", "gemm0", "gemm64", "gemm128"):
            v = {"project": row["project"], "best_bf16": best["bf16"][0], "best_fp8": best["fp8"][0],
                 "best_split": best["split"][0],
                 "gemm0": g["k+0"], "gemm64": g["k+64"], "gemm128": g["k+128"]}[kk]
            tot[kk] = tot.get(kk, 0.0) + v * 38
    res["per_step_ms_38_blocks"] = tot
    print("per step (38 blocks, ms): " + "  ".join(f"{k} {v:.2f}" for k, v in tot.items()))
    write_result(res, "lora_kernels", dev, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
