"""Where the time of one fast MMDiT step goes: CUDA kernel time by category (torch.profiler).

    python benchmarks/profile_step.py --model large --mode static --out DIR

Random weights at the real config, 1024² (latent 128), CFG batch 2, context 333 (as benchmarks/speed.py).
The compiled step runs without CUDA graphs here (the kernels are the same; graphs only remove launch
gaps, reported as the difference between wall time and summed kernel time). Categories: fp8 GEMM
(`_scaled_mm` / cuBLASLt / CUTLASS), bf16 GEMM, attention (cuDNN / flash), Triton (Inductor's fused
elementwise and our kernels), other. Prints a table and the top kernels; writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mmdit_parity_gpu import build_ours, device_slug, time_ms  # noqa: E402
from speed import make_inputs  # noqa: E402

from sd35fp8.fast import MMDiTEngine  # noqa: E402
from sd35fp8.fp8.quantize import quantize_model  # noqa: E402
from sd35fp8.models.mmdit import MMDiTConfig  # noqa: E402


OUR_ATTENTION = ("_attn_fwd", "_quant_kernel", "_amax_kernel")  # fast/attention_triton.py
OUR_ELEMENTWISE = ("_ln_modulate_kernel", "_residual_ln_modulate_kernel", "_act_rows_kernel", "_act_static_kernel",
                   "_gemv_kernel", "_dequant")  # fast/kernels.py, fp8/dequant.py


def category(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("cudnn", "fmha", "flash", "attention", "sdpa")) or n.startswith(OUR_ATTENTION):
        return "attention"
    if "triton" in n or n.startswith(OUR_ELEMENTWISE):
        return "triton"
    if any(s in n for s in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")):
        return "fp8_gemm" if any(s in n for s in ("e4m3", "fp8", "f8")) else "gemm_other"
    return "other"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="large", choices=("large", "medium"))
    ap.add_argument("--mode", default="static", choices=("weight_only", "dynamic", "static", "bf16"))
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--attention", default="auto", help="MMDiTEngine attention_backend (cudnn, triton, triton_fp8, ...)")
    ap.add_argument("--kernels", default="auto", help="MMDiTEngine kernels: auto (Inductor fuses under compile) or triton")
    ap.add_argument("--fast-accum", action=argparse.BooleanOptionalAction, default=True,
                    help="fp8 GEMMs with fast accumulation (MMDiTEngine's default)")
    ap.add_argument("--context-len", type=int, default=333)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    cfg = MMDiTConfig.large() if a.model == "large" else MMDiTConfig.medium()
    inputs = make_inputs(cfg, 2, a.context_len, 128, dev, torch.bfloat16, 1)
    with torch.inference_mode():
        model = build_ours(cfg, torch.bfloat16, dev, 0)
        mode = None if a.mode == "bf16" else a.mode
        if mode is not None:
            quantize_model(model, "dynamic")
        fast = MMDiTEngine(model, mode, compile=a.compile, cuda_graphs=False, attention_backend=a.attention,
                         kernels=a.kernels, fast_accum=a.fast_accum)
        if mode == "static":
            fast.calibrate(*inputs)
        wall = time_ms(lambda: fast(*inputs), dev, 10, 3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(a.steps):
                fast(*inputs)
            torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            rec = per_kernel[ev.name]
            rec[0] += ev.device_time_total / 1000 / a.steps  # ms per step
            rec[1] += 1
    cats: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        cats[category(name)] += ms
    kernel_ms = sum(cats.values())
    wall_ms = sorted(wall)[len(wall) // 2]
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]
    print(f"{a.model} {a.mode} compile={a.compile} ctx {a.context_len}: wall {wall_ms:.1f} ms/step (no CUDA graphs), "
          f"kernels {kernel_ms:.1f} ms")
    for c, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"  {c:<12} {ms:8.2f} ms  {100 * ms / kernel_ms:5.1f} %")
    print("top kernels (ms/step, launches/step):")
    for name, (ms, n) in top:
        print(f"  {ms:7.2f}  {n / a.steps:5.0f}  {name[:110]}")
    res = {"benchmark": "profile_step", "device": torch.cuda.get_device_name(dev),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__}, "model": a.model, "mode": a.mode, "compile": a.compile,
           "attention": a.attention, "kernels": a.kernels, "fast_accum": a.fast_accum, "context_len": a.context_len, "wall_ms_no_graphs": wall_ms,
           "kernel_ms": kernel_ms, "categories_ms": dict(cats),
           "top_kernels": [{"name": n, "ms": ms, "launches": c / a.steps} for n, (ms, c) in top]}
    a.out.mkdir(parents=True, exist_ok=True)
    tag = "".join(f"_{v}" for v in (a.kernels, a.attention) if v != "auto") + ("_acc" if a.fast_accum else "")
    path = a.out / f"profile_{a.model}_{a.mode}_{'compiled' if a.compile else 'eager'}{tag}_{device_slug(dev)}.json"
    path.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
