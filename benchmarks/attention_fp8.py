"""Attention at SD3.5 joint-attention shapes: cuDNN / flash SDPA vs Triton BF16 / FP8 (fast/attention_triton.py).

Cases: Large (H=38) and Medium (H=24), B=2 (CFG), L = 4096 + 333 = 4429 and 4096 + 154 = 4250,
D=64, non-causal; q, k, v are views of one [B, L, 3, H, D] bf16 tensor, as the qkv matmul leaves them.
Per contender: median ms over --steps CUDA-event-timed calls after warm-up (Triton autotuning happens
in the warm-up), TFLOP/s with flops = 4*B*H*L^2*D, and SQNR (dB) against an fp32 math attention on the
first --ref-heads heads, for two inputs:
    randn     q, k, v ~ N(0, 1)                                         (logit std ~1)
    outliers  q, k: N(0, 1) with channels 7 and 39 x20, then RMS-normalised per token like SD3.5's
              qk-norm (logit std ~5); v ~ N(0, 1)
Contenders: sdpa_cudnn, sdpa_flash, triton_bf16, triton_fp8 (quantisation pass + kernel, Hadamard
rotation of q, k), triton_fp8_nohad (no rotation), triton_fp8_kernel (kernel alone on pre-quantised
inputs), triton_fp8_kernel_ftz / _split (the same with the kernel's other exponentials,
attention_triton.EXP_MODES: the MUFU without subnormal fix-up; half of the tile by a polynomial on
the FMA pipes), fp8_quant (quantisation pass alone). For the fp8 rows, `sqnr_vs_emulation_db` compares the
kernel with fp8_attention_emulated (its numerics in torch): >= ~45 dB means it computes what it claims.
Prints a table; writes JSON (device, versions, date, autotuned configs, rows) to --out.

    PYTHONPATH=src python benchmarks/attention_fp8.py --out $OUT      # H100: ~2 min, mostly autotuning
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Callable

import sys

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mmdit_parity_gpu import time_ms  # noqa: E402

from sd35fp8.fast.attention import attention_flops, backend_context, sdpa
from sd35fp8.fast.attention_triton import (EXP_ENV, attention_fp8, fp8_attention_emulated, quantize_qkv, triton,
                                           triton_attention, tuned_config)
from sd35fp8.fp8.scaling import sqnr

MODELS = {"large": 38, "medium": 24}
LENGTHS = (4096 + 333, 4096 + 154)
BATCH, HEAD_DIM = 2, 64
OUTLIER_CHANNELS = (7, 39)


def make_qkv(heads: int, length: int, outliers: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, L, H, D] bf16: views of one [B, L, 3, H, D] tensor."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(BATCH, length, 3, heads, HEAD_DIM, device="cuda", generator=g)  # [B, L, 3, H, D]
    if outliers:
        qkv[:, :, :2, :, list(OUTLIER_CHANNELS)] *= 20
        qkv[:, :, :2] /= qkv[:, :, :2].pow(2).mean(-1, keepdim=True).sqrt()  # per-token RMS norm of q, k
    qkv = qkv.bfloat16()
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


@torch.no_grad()
def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, float]:
    """fp32 math attention on the first `heads` heads -> ([B, L, heads, D], logit std)."""
    out, std = [], []
    for b in range(q.shape[0]):
        qh, kh, vh = (x[b, :, :heads].float().transpose(0, 1) for x in (q, k, v))  # [h, L, D]
        s = qh @ kh.transpose(1, 2) / math.sqrt(q.shape[-1])  # [h, L, L]
        std.append(s.std().item())
        out.append((torch.softmax(s, -1) @ vh).transpose(0, 1))  # [L, h, D]
    return torch.stack(out), statistics.mean(std)


def contenders(q, k, v) -> dict[str, Callable[[], torch.Tensor]]:
    def pinned(name):
        def run():
            with backend_context(name):
                return sdpa(q, k, v)
        return run

    pre = quantize_qkv(q, k, v)

    def with_exp(mode):
        def run():
            os.environ[EXP_ENV] = mode
            try:
                return attention_fp8(pre, q.dtype)
            finally:
                del os.environ[EXP_ENV]
        return run

    return {
        "sdpa_cudnn": pinned("cudnn"),
        "sdpa_flash": pinned("flash"),
        "triton_bf16": lambda: triton_attention(q, k, v),
        "triton_fp8": lambda: triton_attention(q, k, v, fp8=True),
        "triton_fp8_nohad": lambda: triton_attention(q, k, v, fp8=True, hadamard=False),
        "triton_fp8_kernel": lambda: attention_fp8(pre, q.dtype),
        "triton_fp8_kernel_ftz": with_exp("ftz"),
        "triton_fp8_kernel_split": with_exp("split"),
        "fp8_quant": lambda: quantize_qkv(q, k, v),
    }


def run_case(model: str, heads: int, length: int, args) -> list[dict]:
    flops = attention_flops(BATCH, heads, length, length, HEAD_DIM)
    rows = {}
    for kind in ("randn", "outliers"):
        q, k, v = make_qkv(heads, length, kind == "outliers")
        ref, logit_std = reference(q, k, v, args.ref_heads)  # [B, L, R, D]
        for name, fn in contenders(q, k, v).items():
            row = rows.setdefault(name, {"model": model, "heads": heads, "L": length, "contender": name})
            try:
                out = fn()
                if kind == "randn":  # speed does not depend on values
                    times = time_ms(fn, torch.device("cuda"), args.steps, args.warmup)
                    row.update(ms=statistics.median(times), ms_min=min(times), steps=len(times))
                    if name != "fp8_quant":
                        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            except Exception as err:  # a backend refusing a shape is a result, not a crash
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                continue
            if name == "fp8_quant":
                continue
            got = out.view(BATCH, length, heads, HEAD_DIM)[:, :, :args.ref_heads].float()
            row[f"sqnr_{kind}_db"] = sqnr(ref, got)
            row[f"logit_std_{kind}"] = logit_std
            if name in ("triton_fp8", "triton_fp8_nohad"):
                cfg = tuned_config(length, fp8=True) or {"BLOCK_N": 64}
                r = args.ref_heads
                emu = fp8_attention_emulated(q[:, :, :r], k[:, :, :r], v[:, :, :r], block_n=cfg["BLOCK_N"],
                                             hadamard=name == "triton_fp8")
                row[f"sqnr_{kind}_vs_emulation_db"] = sqnr(emu.view_as(got), got)
        del q, k, v, ref
        torch.cuda.empty_cache()
    for name in ("triton_bf16", "triton_fp8"):
        rows[name]["config"] = tuned_config(length, fp8=name == "triton_fp8")
    return list(rows.values())


def print_table(rows: list[dict]) -> None:
    cols = [("ms", "ms", 7, 3), ("TFLOP/s", "tflops", 8, 1), ("SQNR randn", "sqnr_randn_db", 11, 2),
            ("SQNR outl", "sqnr_outliers_db", 10, 2)]
    print(f"{'model':7s} {'L':>5s} {'contender':18s} " + " ".join(f"{t:>{w}s}" for t, _, w, _ in cols) + "  note")
    for r in rows:
        cells = " ".join(f"{r[k]:{w}.{d}f}" if k in r else f"{'-':>{w}s}" for _, k, w, d in cols)
        note = r.get("error", "")
        if "sqnr_randn_vs_emulation_db" in r:
            note = (f"kernel vs emulation {r['sqnr_randn_vs_emulation_db']:.1f} / "
                    f"{r.get('sqnr_outliers_vs_emulation_db', float('nan')):.1f} dB")
        print(f"{r['model']:7s} {r['L']:5d} {r['contender']:18s} {cells}  {note}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="large,medium")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--ref-heads", type=int, default=4, help="heads compared against the fp32 reference")
    ap.add_argument("--out", default="benchmarks/results", help="JSON file, or a folder for the default name")
    args = ap.parse_args()
    if not torch.cuda.is_available() or triton is None:
        raise SystemExit("attention_fp8.py needs a CUDA GPU and Triton")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true fp32
    name = torch.cuda.get_device_name()
    rows = []
    for model in args.models.split(","):
        for length in map(int, args.lengths.split(",")):
            rows += run_case(model, MODELS[model], length, args)
            print_table([r for r in rows if r["model"] == model and r["L"] == length])
    print("\nall cases:")
    print_table(rows)
    out = Path(args.out)
    if out.suffix != ".json":
        out = out / f"attention_fp8_{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "batch": BATCH, "head_dim": HEAD_DIM, "steps": args.steps, "ref_heads": args.ref_heads,
              "flops": "4*B*H*L^2*D", "outlier_channels": OUTLIER_CHANNELS, "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
