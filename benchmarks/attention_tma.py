"""FP8 attention with TMA loads (tensor descriptors), with and without Triton's Hopper warp specialization,
against the library kernel (fast/attention_triton.py `_attn_fwd`, cp.async loads) at Large's joint shape.

The library kernel's loop over key blocks spends ~30 of its ~480 instructions a tile on addresses and
cp.async (LDGSTS); it is bound by issue and latency together (docs/PERF.md, sessions 21-22). Here the K and V
tiles come by TMA (one thread issues a whole [BLOCK_N, D] copy), and `warp_specialize=True` on the loop asks
Triton to split loads and math over warp groups (its Hopper pass needs TMA loads; on cp.async loads it
fails to compile). Same numerics as the library's FP8 path (quantize_qkv's layouts and scales, P * 256 cast
to e4m3, exp2 by ex2.approx.ftz), so the outputs are compared with it directly.

    PYTHONPATH=src python benchmarks/attention_tma.py --out OUTDIR       # CUDA: times and SQNR, JSON
    PYTHONPATH=src python benchmarks/attention_tma.py --sass             # no GPU: compile for sm_90, count SASS
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from results_io import write_json  # benchmarks/ is this script's folder
import triton
import triton.language as tl

from sd35fp8.fast import attention_triton as at

B, H, L, D = 2, 38, 4429, 64
CONFIGS = [(64, 128, 4, 3, False), (64, 128, 4, 4, False), (128, 128, 8, 3, False), (64, 128, 4, 3, True),
           (128, 128, 8, 3, True), (128, 64, 8, 3, True)]


@triton.jit
def _attn_fwd_tma(desc_q, desc_k, desc_v, OUT, SCALE, sm_scale_log2e, H, L, Lp,
                  HEAD_DIM: tl.constexpr, P_SHIFT: tl.constexpr, WS: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One [BLOCK_M] query tile of one (b, h); q, k [B*H*Lp, D] and v^T [B*H*D, Lp] by descriptors; out
    [B, L, H*D] bf16."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row0 = bh * Lp
    q = desc_q.load([row0 + start_m * BLOCK_M, 0])  # [BM, D]
    qk_scale = sm_scale_log2e * tl.load(SCALE + bh) * tl.load(SCALE + tl.num_programs(1) + bh)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (L // BLOCK_N) * BLOCK_N
    for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WS):
        k = desc_k.load([row0 + start_n, 0])  # [BN, D]
        qk = tl.dot(q, k.T)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = at._exp2_ftz(qk * qk_scale - (m_ij - P_SHIFT)[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = desc_v.load([bh * HEAD_DIM, start_n])  # [D, BN]
        acc = tl.dot(p.to(tl.float8e4nv), vt.T, acc * alpha[:, None])
        m_i = m_ij
    if n_full < L:  # the tail block, keys >= L masked
        offs_n = n_full + tl.arange(0, BLOCK_N)
        k = desc_k.load([row0 + n_full, 0])
        qk = tl.where((offs_n < L)[None, :], tl.dot(q, k.T), float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = at._exp2_ftz(qk * qk_scale - (m_ij - P_SHIFT)[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = desc_v.load([bh * HEAD_DIM, n_full])
        acc = tl.dot(p.to(tl.float8e4nv), vt.T, acc * alpha[:, None])
    out = acc / l_i[:, None] * tl.load(SCALE + 2 * tl.num_programs(1) + bh)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    hd = H * HEAD_DIM
    tl.store(OUT + b.to(tl.int64) * L * hd + offs_m[:, None] * hd + h * HEAD_DIM + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_m < L)[:, None])


def launch(pre, cfg):
    from triton.tools.tensor_descriptor import TensorDescriptor

    q8, k8, v8t, scale, length = pre
    bm, bn, w, s, ws = cfg
    Bq, Hq, Lp, Dq = q8.shape
    out = torch.empty(Bq, length, Hq * Dq, device=q8.device, dtype=torch.bfloat16)
    dq = TensorDescriptor.from_tensor(q8.view(Bq * Hq * Lp, Dq), [bm, Dq])
    dk = TensorDescriptor.from_tensor(k8.view(Bq * Hq * Lp, Dq), [bn, Dq])
    dv = TensorDescriptor.from_tensor(v8t.reshape(Bq * Hq * Dq, Lp), [Dq, bn])
    grid = (triton.cdiv(length, bm), Bq * Hq)

    def fn():
        return _attn_fwd_tma[grid](dq, dk, dv, out, scale, at._LOG2E / math.sqrt(Dq), Hq, length, Lp, HEAD_DIM=Dq,
                                   P_SHIFT=at.P_LOG2_SCALE, WS=ws, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    return fn, out


def compile_offline(cfg):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, w, s, ws = cfg
    sig = {"desc_q": f"tensordesc<fp8e4nv[{bm}, 64]>", "desc_k": f"tensordesc<fp8e4nv[{bn}, 64]>",
           "desc_v": f"tensordesc<fp8e4nv[64, {bn}]>", "OUT": "*bf16", "SCALE": "*fp32", "sm_scale_log2e": "fp32",
           "H": "i32", "L": "i32", "Lp": "i32"}
    cst = dict(HEAD_DIM=64, P_SHIFT=at.P_LOG2_SCALE, WS=ws, BLOCK_M=bm, BLOCK_N=bn)
    sig.update({k: "constexpr" for k in cst})
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ("OUT", "SCALE", "Lp")}
    return triton.compile(ASTSource(fn=_attn_fwd_tma, signature=sig, constexprs=cst, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": w, "num_stages": s})


def sass_counts() -> int:
    from kernel_sass import histograms, sass

    for cfg in CONFIGS:
        try:
            text, res = sass(compile_offline(cfg))
            _, loop, n = histograms(text)
            print(cfg, res.split()[0], "loop", n, dict(list(loop.items())[:14]))
        except Exception as err:  # noqa: BLE001
            print(cfg, "failed:", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    return 0


def large_qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Large's joint q, k, v [B, L, H, D] bf16 (B, L, H, D above) with outlier channels and per-token RMS norm."""
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, L, 3, H, D, device="cuda", generator=g)
    qkv[:, :, :2, :, [7, 39]] *= 20  # outlier channels, then per-token RMS norm (as attention_fp8.py)
    qkv[:, :, :2] /= qkv[:, :, :2].pow(2).mean(-1, keepdim=True).sqrt()
    return qkv.bfloat16().unbind(2)


def large_qkv8() -> at.QKV8:
    """large_qkv(), quantised (quantize_qkv)."""
    return at.quantize_qkv(*large_qkv())


def write_rows(out: str, stem: str, rows: list[dict]) -> None:
    """rows (each timed one with its TFLOP/s added) -> JSON under out."""
    flops = 4 * B * H * L * L * D
    for r in rows:
        if "ms" in r:
            r["tflops"] = flops / r["ms"] / 1e9
    write_json(out, stem, {"shape": {"B": B, "H": H, "L": L, "D": D}, "rows": rows})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sass", action="store_true", help="compile for sm_90 offline and count instructions")
    args = ap.parse_args(argv)
    if args.sass:
        return sass_counts()
    from triton.testing import do_bench

    from sd35fp8.fp8.scaling import sqnr

    torch.backends.cuda.matmul.allow_tf32 = False
    pre = large_qkv8()
    lib = at.attention_fp8(pre)
    flops = 4 * B * H * L * L * D
    rows = [{"kernel": "library (cp.async)", "tile": at.tuned_config(L, True),
             "ms": do_bench(lambda: at.attention_fp8(pre), warmup=25, rep=200)}]
    print(f"library: {rows[0]['ms']:.4f} ms {flops / rows[0]['ms'] / 1e9:.1f} TFLOP/s", flush=True)
    for cfg in CONFIGS:
        row = {"kernel": "tma" + (" + warp_specialize" if cfg[4] else ""), "tile": cfg[:4]}
        try:
            fn, out = launch(pre, cfg)
            fn()
            torch.cuda.synchronize()
            row.update(ms=do_bench(fn, warmup=25, rep=200), sqnr_vs_library_db=sqnr(lib.float(), out.float()))
            print(f"{row['kernel']:26s} {cfg[:4]} {row['ms']:.4f} ms {flops / row['ms'] / 1e9:.1f} TFLOP/s "
                  f"SQNR vs library {row['sqnr_vs_library_db']:.1f} dB", flush=True)
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            print(row["kernel"], cfg, row["error"], flush=True)
        rows.append(row)
    write_rows(args.out, "attention_tma", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
