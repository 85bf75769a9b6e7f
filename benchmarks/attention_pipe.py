"""FP8 attention with the next key block's QK^T issued before this block's softmax (software pipelining),
against the library kernel (fast/attention_triton.py `_attn_fwd`) at Large's joint shape.

The library kernel's loop runs, per key block: QK^T (wgmma) -> wait -> softmax (exp2, row max / sum, e4m3
cast) -> P @ V (wgmma). Within a warp group the tensor cores idle during the softmax and the softmax waits
for the MMA (docs/PERF.md, sessions 21-22: the loop is bound by issue and latency together, tensor cores
busy ~30 %). Here the loop is rotated: QK^T of block j+1 is issued first, then block j's softmax and P @ V
run while it is in flight (FlashAttention-3's intra-warpgroup overlap, written in plain Triton: the wgmma
of `qk_next` is asynchronous and ptxas places its wait among block j's exponentials; see --sass). That is
`_attn_fwd` with PIPE=True (SD35FP8_ATTN_PIPE=BM,BN,warps,stages puts it in the step). The numerics are the
library's, block for block, so the outputs are compared with it directly.

    PYTHONPATH=src python benchmarks/attention_pipe.py --out OUTDIR    # CUDA: times and SQNR, JSON
    PYTHONPATH=src python benchmarks/attention_pipe.py --sass          # no GPU: compile for sm_90, count SASS
    TRITON_INTERPRET=1 PYTHONPATH=src python benchmarks/attention_pipe.py --check-cpu   # interpreter, small L
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from attention_tma import B, D, H, L, large_qkv8, write_rows  # benchmarks/ is this script's folder
import triton

from sd35fp8.fast import attention_triton as at

# (BLOCK_M, BLOCK_N, warps, stages, maxnreg): at 64 x 128 the second score tile in flight takes the kernel to ~254
# registers (2 CTAs an SM against the library's 3 at 163); maxnreg 168 asks ptxas for 3 again
CONFIGS = [(64, 128, 4, 4, None), (64, 128, 4, 3, None), (64, 128, 4, 3, 168), (64, 64, 4, 3, None),
           (64, 64, 4, 4, None), (128, 64, 8, 3, None), (128, 128, 8, 3, None)]


def launch(pre, cfg, exp: int = 1):
    """The library kernel with PIPE=True on quantize_qkv's output at tile cfg -> (fn, out [B, L, H*D] bf16)."""
    q8, k8, v8t, scale, length = pre
    bm, bn, w, s, nreg = cfg
    Bq, Hq, _, Dq = q8.shape
    extra = {} if nreg is None else {"maxnreg": nreg}
    out = torch.empty(Bq, length, Hq * Dq, device=q8.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(length, bm), Bq * Hq)

    def fn():
        return at._attn_fwd[grid](q8, k8, v8t, out, out, scale, scale, at._LOG2E / math.sqrt(Dq),
                                  *q8.stride()[:3], *k8.stride()[:3], *v8t.stride()[:2], 1, v8t.stride(2), Hq,
                                  length, 0, HEAD_DIM=Dq, FP8=True, P_SHIFT=at.P_LOG2_SCALE, OUT_FP8=False,
                                  EXP=exp, BLOCK_M=bm, BLOCK_N=bn, PIPE=True, num_warps=w, num_stages=s, **extra)
    return fn, out


def compile_offline(cfg):
    """The library kernel with PIPE=True compiled for sm_90 (no GPU), as kernel_sass.compile_attention."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, w, s, nreg = cfg
    sig = {"Q": "*fp8e4nv", "K": "*fp8e4nv", "V": "*fp8e4nv", "OC": "*bf16", "OX": "*bf16", "SCALE": "*fp32",
           "OSCALE": "*fp32", "sm_scale_log2e": "fp32"}
    sig.update({n: "i32" for n in "sqb sqh sqm skb skh skn svb svh svn svd H L LC".split()})
    cst = dict(HEAD_DIM=64, FP8=True, P_SHIFT=at.P_LOG2_SCALE, OUT_FP8=False, EXP=1, BLOCK_M=bm, BLOCK_N=bn,
               PIPE=True)
    sig.update({k: "constexpr" for k in cst})
    names = list(sig)
    aligned = "Q K V OC OX SCALE OSCALE sqb sqh sqm skb skh skn svb svh svd".split()  # svn = 1, H, L, LC odd
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    options = {"num_warps": w, "num_stages": s, **({} if nreg is None else {"maxnreg": nreg})}
    return triton.compile(ASTSource(fn=at._attn_fwd, signature=sig, constexprs=cst, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def sass_counts() -> int:
    from kernel_sass import histograms, sass

    for cfg in CONFIGS:
        text, res = sass(compile_offline(cfg))
        _, loop, n = histograms(text)
        print(cfg, res.split()[0], "loop", n, dict(list(loop.items())[:14]))
    return 0


def check_cpu() -> int:
    """Interpreter (TRITON_INTERPRET=1): the pipelined kernel against the library kernel, small shapes."""
    at._ALLOW_CPU = True
    torch.manual_seed(0)
    worst = float("inf")
    for length, (bm, bn) in ((200, (64, 64)), (333, (64, 128)), (256, (64, 64))):
        q, k, v = torch.randn(3, 1, length, 2, 64).bfloat16()
        pre = at.quantize_qkv(q, k, v)
        ref = at._attention_fp8_split(pre, 0, torch.bfloat16, None)[1]  # _CPU_CONFIG tile (64 x 64)
        fn, out = launch(pre, (bm, bn, 4, 2, None), exp=0)
        fn()
        from sd35fp8.fp8.scaling import sqnr
        db = float(sqnr(ref.float(), out.float()))
        exact = bool(torch.equal(ref, out)) if bn == 64 else None
        print(f"L {length} tile {bm}x{bn}: SQNR vs library {db:.1f} dB, identical: {exact}")
        worst = min(worst, db)
    return 0 if worst > 40 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sass", action="store_true", help="compile for sm_90 offline and count instructions")
    ap.add_argument("--check-cpu", action="store_true", help="interpreter check against the library kernel")
    args = ap.parse_args(argv)
    if args.sass:
        return sass_counts()
    if args.check_cpu:
        return check_cpu()
    from triton.testing import do_bench

    from sd35fp8.fp8.scaling import sqnr

    pre = large_qkv8()
    lib = at.attention_fp8(pre)
    flops = 4 * B * H * L * L * D
    rows = []

    def lib_row():
        row = {"kernel": "library", "tile": at.tuned_config(L, True),
               "ms": do_bench(lambda: at.attention_fp8(pre), warmup=25, rep=200)}
        print(f"library {row['tile']}: {row['ms']:.4f} ms {flops / row['ms'] / 1e9:.1f} TFLOP/s", flush=True)
        rows.append(row)

    lib_row()
    for cfg in CONFIGS:
        row = {"kernel": "pipelined", "tile": cfg}
        try:
            fn, out = launch(pre, cfg)
            fn()
            torch.cuda.synchronize()
            row.update(ms=do_bench(fn, warmup=25, rep=200), sqnr_vs_library_db=float(sqnr(lib.float(), out.float())),
                       identical=bool(torch.equal(lib, out)))
            print(f"pipelined {cfg}: {row['ms']:.4f} ms {flops / row['ms'] / 1e9:.1f} TFLOP/s SQNR vs library "
                  f"{row['sqnr_vs_library_db']:.1f} dB identical {row['identical']}", flush=True)
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            print("pipelined", cfg, row["error"], flush=True)
        rows.append(row)
    lib_row()  # again: the library's time at both ends of the run
    write_rows(args.out, "attention_pipe", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
