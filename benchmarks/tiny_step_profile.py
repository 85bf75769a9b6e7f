"""Where the tiny model's training step spends its time: wall time per step against GPU kernel time
per step (torch.profiler), for the training code of `sd35fp8.tiny.train` unchanged (train_mmdit with
its compile settings). A GPU busy fraction well under 1 means the step is bound by the host
(Python, launches, graph replays), not by the GPU. Writes JSON to benchmarks/results/.

    python benchmarks/tiny_step_profile.py --batch 512 --steps 300 --profile-steps 30
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sd35fp8.models.vae import to_model_space
from sd35fp8.tiny import train
from sd35fp8.tiny.data import make_tokenizer, render_dataset, token_rows
from sd35fp8.tiny.spec import TinySpec

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "sd35fp8" / "tiny" / "weights"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[512])
    p.add_argument("--steps", type=int, default=300, help="steps before profiling (compile, warm-up)")
    p.add_argument("--profile-steps", type=int, default=30)
    p.add_argument("--n-images", type=int, default=20_000)
    p.add_argument("--compile-mode", default="reduce-overhead")
    p.add_argument("--step-graph", action="store_true",
                   help="train's --step-graph (the whole step in one CUDA graph)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    clock = train.Clock()
    src, spiece = WEIGHTS / "sd35fp8_tiny.safetensors", WEIGHTS / "spiece.model"
    spec = TinySpec.from_checkpoint(src, 128)
    data = render_dataset(a.n_images, 0, spec.image_size, spiece, 16)
    empty = token_rows(make_tokenizer(spiece), "")
    device = torch.device("cuda")
    images = torch.from_numpy(data.images).to(device)
    latents = to_model_space(train.encode_all(train.load_vae_from(spec, src, device), images, device))
    del images
    result = {"benchmark": "tiny_step_profile", "device": torch.cuda.get_device_name(device),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__}, "compile_mode": a.compile_mode,
              "step_graph": a.step_graph, "batches": {}}

    for batch in a.batch:
        rec: dict = {}

        def run_steps(step_fn, steps, minutes, probe, device, clock, name, history, deadline=None, time_from=10):
            for i in range(a.steps):
                step_fn(i, a.steps + a.profile_steps)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(a.steps, a.steps + 50):
                step_fn(i, a.steps + a.profile_steps + 50)
            torch.cuda.synchronize()
            rec["wall_ms_per_step"] = (time.perf_counter() - t0) / 50 * 1000
            # host cost alone: the GPU sleeps ~1 s first, so the CPU enqueues 10 steps without waiting
            torch.cuda._sleep(2_000_000_000)
            t0 = time.perf_counter()
            for i in range(a.steps + 50, a.steps + 60):
                step_fn(i, a.steps + a.profile_steps + 60)
            rec["host_ms_per_step"] = (time.perf_counter() - t0) / 10 * 1000
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for i in range(a.steps + 50, a.steps + 50 + a.profile_steps):
                    step_fn(i, a.steps + a.profile_steps + 50)
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]  # kernels, memcpy
            gpu_us = sum(e.self_device_time_total for e in events)
            rec["gpu_ms_per_step"] = gpu_us / 1000 / a.profile_steps
            rec["gpu_busy_fraction"] = rec["gpu_ms_per_step"] / rec["wall_ms_per_step"]
            top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:25]
            rec["top_kernels"] = [{"name": e.key[:120], "count": e.count // a.profile_steps,
                                   "ms_per_step": e.self_device_time_total / 1000 / a.profile_steps} for e in top]
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
            return a.steps + 50 + a.profile_steps, a.steps + 50 + a.profile_steps

        args = train.parse_args(["--out", str(a.out), "--batch", str(batch), "--compile",
                                 "--compile-mode", a.compile_mode] + (["--step-graph"] if a.step_graph else []))
        saved = train.run_steps
        train.run_steps = run_steps
        try:
            train.train_mmdit(spec, latents, data, empty, args, device, clock, rec)
        finally:
            train.run_steps = saved
        rec.pop("mmdit_loss", None)
        result["batches"][str(batch)] = rec
        train.log(f"batch {batch}: wall {rec['wall_ms_per_step']:.2f} ms/step, host {rec['host_ms_per_step']:.2f}, GPU {rec['gpu_ms_per_step']:.2f} "
                  f"ms/step (busy {rec['gpu_busy_fraction']:.2f})", clock)
        torch._dynamo.reset()
    a.out.mkdir(parents=True, exist_ok=True)
    tag = "_step_graph" if a.step_graph else ""
    path = a.out / f"tiny_step_profile_{torch.cuda.get_device_name(device).lower().replace(' ', '-')}{tag}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
