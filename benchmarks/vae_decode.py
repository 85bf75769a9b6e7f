"""The SD3 VAE decode of one 1024² image (latent 16 x 128 x 128, bf16, random weights), five ways side by side.

The whole-image benchmark (faster.py) spends ~0.10 s of its 1.72 s in the VAE decode (H100), about 5x what the
decoder's convolutions (~8 TFLOP) and GroupNorm passes need at the card's rates. Contenders:

    eager               models/vae.py as it runs today (NCHW, cudnn.benchmark off)
    cudnn_benchmark     the same with torch.backends.cudnn.benchmark = True (cuDNN times its conv algorithms)
    channels_last       weights and input in channels_last (NHWC) memory format, cudnn.benchmark on
    compiled_nchw       SD3VAE.compile_decoder (the library's form: the decoder compiled as loaded, NCHW)
    compiled            torch.compile(decoder) on channels_last (Inductor fuses GroupNorm + SiLU, picks convs)

Each is timed by triton.testing.do_bench and compared with the eager output (SQNR, dB).

    PYTHONPATH=src python benchmarks/vae_decode.py --out OUTDIR [--no-compile]
"""

from __future__ import annotations

import argparse
import time

import torch
from e2e import fill_random_  # benchmarks/ is this script's folder
from results_io import write_json

from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.vae import SD3VAE, VAEConfig


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results", help="JSON file, or a folder for the default name")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    ap.add_argument("--profile", action="store_true", help="also the eager decode's top CUDA kernels (torch.profiler)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    with torch.device("meta"):
        vae = SD3VAE(VAEConfig.sd3()).eval()
    vae.to_empty(device=dev)
    fill_random_(vae, torch.Generator(device=dev).manual_seed(1)).to(torch.bfloat16)
    z = torch.randn(1, 16, 128, 128, device=dev, generator=torch.Generator(device=dev).manual_seed(2))
    rows = []

    def run(name, fn):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = fn()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            ms = do_bench(fn, warmup=3, rep=1500)
        row = {"mode": name, "ms": ms, "first_call_s": first}
        if rows:
            row["sqnr_vs_eager_db"] = float(sqnr(rows[0]["_out"].float(), out.float()))
        row["_out"] = out
        rows.append(row)
        print(f"{name:16s} {ms:8.2f} ms  first call {first:6.1f} s  SQNR vs eager "
              f"{row.get('sqnr_vs_eager_db', float('inf')):.1f} dB", flush=True)

    torch.backends.cudnn.benchmark = False
    run("eager", lambda: vae.decode(z))
    profile = profile_eager(vae, z) if args.profile else None
    torch.backends.cudnn.benchmark = True
    run("cudnn_benchmark", lambda: vae.decode(z))
    if not args.no_compile:  # the library's form: SD3VAE.compile_decoder on the NCHW decoder as loaded
        vae.compile_decoder()
        run("compiled_nchw", lambda: vae.decode(z))
        vae.__dict__.pop("_compiled_decoder")
    vae_cl = vae.to(memory_format=torch.channels_last)  # in place: every contender below sees NHWC weights
    z_cl = z.contiguous(memory_format=torch.channels_last)
    run("channels_last", lambda: vae_cl.decode(z_cl))
    if not args.no_compile:
        dec = torch.compile(vae_cl.decoder)
        run("compiled", lambda: dec(z_cl.to(torch.bfloat16)))
    for r in rows:
        r.pop("_out")
    write_json(args.out, "vae_decode", {"shape": {"latent": [1, 16, 128, 128], "image": 1024, "dtype": "bf16"},
                                        "rows": rows, **({"eager_profile_ms": profile} if profile else {})})


def profile_eager(vae, z) -> list:
    """The eager decode's 15 costliest CUDA kernels, [(name, ms)] (one decode)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        vae.decode(z)
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 1e3) for e in prof.key_averages()), key=lambda r: -r[1])[:15]
    for name, ms in rows:
        print(f"  {ms:8.2f} ms  {name[:110]}", flush=True)
    return rows


if __name__ == "__main__":
    main()
