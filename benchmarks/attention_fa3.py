"""FlashAttention-3's FP8 forward (a library kernel: the `tokenspeed-fa3` wheel, `flash_attn_interface`) against our
FP8 attention kernel (fast/attention_triton.py) at Large's joint shape, for issue 23's "a library kernel if one
installs here and beats it".

Our kernel runs at ~548 TFLOP/s on the H100 (0.70 ms at B 2, H 38, L 4429, D 64) and is bound by issue and latency
inside each warp group (docs/PERF.md, sessions 21-23); FA3 overlaps the softmax of one warp group with the MMAs of
another (ping-pong) and within a warp group, which Triton 3.6 does not give on sm_90. Both get the same e4m3 inputs:
q and k Hadamard-rotated, q, k, v quantised with one scale per (batch, head) (quantize_qkv's numerics; FA3 takes
them as q / k / v descale [B, H]). Timed: each attention kernel alone (triton.testing.do_bench), and FA3 BF16 for
reference; accuracy: SQNR of each output against float32 attention on the same bf16 q, k, v.

The wheel (63 MB, CUDA 13, torch's stable C ABI) is not on the device image, and does not fit a device call beside
the tracked tree (~43 MB; the two share 64 MiB): carry its files instead, the big one compressed:

    bash benchmarks/fa3_carry.sh        # here: the wheel's files into carry/fa3, its 300 MB .so as 23 MB of xz
    # on the device (benchmarks/gpu_fa3.sh): source benchmarks/fa3_setup.sh; python benchmarks/attention_fa3.py
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from attention_tma import B, D, H, L, large_qkv, write_rows  # benchmarks/ is this script's folder

from sd35fp8.fast import attention_triton as at


def fa3_fp8_inputs(q, k, v):
    """quantize_qkv's numerics in BSHD layout for FA3: (q8, k8, v8 [B, L, H, D] e4m3, descales [B, H] each)."""
    x8, scales = at.quantize_qkv_reference(q, k, v)
    return [t.contiguous() for t in x8], [s.reshape(s.shape[0], s.shape[2]).contiguous() for s in scales]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    from sd35fp8.fp8.scaling import sqnr

    q, k, v = large_qkv()
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
    ref = ref.transpose(1, 2).reshape(B, L, H * D)  # float32
    rows = []
    pre = at.quantize_qkv(q, k, v)
    ours = at.attention_fp8(pre)
    rows.append({"kernel": "ours FP8 (Triton)", "tile": at.tuned_config(L, True),
                 "ms": do_bench(lambda: at.attention_fp8(pre), warmup=25, rep=200),
                 "sqnr_vs_fp32_db": float(sqnr(ref, ours.float()))})
    try:
        import flash_attn_interface as fa3
    except ImportError as err:
        print(f"flash_attn_interface not importable ({err}): see this file's docstring", file=sys.stderr)
        write_rows(args.out, "attention_fa3", rows)
        return 2
    (q8, k8, v8), (sq, sk, sv) = fa3_fp8_inputs(q, k, v)
    scale = 1.0 / math.sqrt(D)
    # the same codes as views of a [B, H, L, D] layout (how a quantise pass writing per-head tiles lays them out)
    q8h, k8h, v8h = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q8, k8, v8))
    for name, fn in (
        ("FA3 FP8", lambda: fa3.flash_attn_func(q8, k8, v8, softmax_scale=scale, q_descale=sq, k_descale=sk,
                                                v_descale=sv)),
        ("FA3 FP8 BHLD views", lambda: fa3.flash_attn_func(q8h, k8h, v8h, softmax_scale=scale, q_descale=sq,
                                                           k_descale=sk, v_descale=sv)),
        ("FA3 BF16", lambda: fa3.flash_attn_func(q, k, v, softmax_scale=scale)),
    ):
        row = {"kernel": name}
        try:
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            torch.cuda.synchronize()
            row.update(ms=do_bench(fn, warmup=25, rep=200),
                       sqnr_vs_fp32_db=float(sqnr(ref, out.float().reshape(B, L, H * D))))
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        rows.append(row)
    flops = 4 * B * H * L * L * D
    for r in rows:
        print(f"{r['kernel']:20s} " + (f"{r['ms']:.4f} ms {flops / r['ms'] / 1e9:6.1f} TFLOP/s SQNR vs fp32 "
                                       f"{r['sqnr_vs_fp32_db']:.2f} dB" if "ms" in r else r["error"]), flush=True)
    write_rows(args.out, "attention_fa3", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
