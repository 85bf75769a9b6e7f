"""Serving at scale: replicas under open-loop load, and one image on K processes / GPUs.

Part 1, replicas: the server behind the OpenAI route (POST /v1/images/generations, b64_json) in three
set-ups: `plain` (one process, create_app), `ray-1` (Ray Serve, 1 replica) and `ray-N` (N replicas).
Requests arrive open-loop as a Poisson process (exponential gaps, rate = --load x replicas / the plain
server's seconds per image, measured first), each in its own thread; reported: images/s (completed
requests over the time from the first arrival to the last answer), p50/p95 latency, and the Ray path's
overhead against the plain server (ray-1 vs plain images/s with all requests sent at once: "max img/s").
Part 2, one image on K ranks (scale/parallel.py): the MMDiT forward of one CFG step ([cond ; uncond],
batch 2) over K processes (K = 1: the model alone; 2: CFG parallel; 4: CFG x sequence parallel 2),
seconds per image = --steps x the median step time, and the largest |difference| to K = 1's velocity.

    python benchmarks/scale.py --tiny                  # CPU: shipped model, small counts (a few minutes)
    python benchmarks/scale.py --replicas 1 --gpus 1   # the single H200: plain vs Ray with 1 replica, K = 1
    python benchmarks/scale.py --replicas 4 --gpus 1 2 4 --config large   # a 4-GPU machine (issue 25)

The replica part serves the shipped model (the only real weights here) at --size capped to the 256 px
its position table covers (args.serve_size in the JSON); --config picks the MMDiT of part 2 (shipped,
or large/medium with random weights, 1024x1024). Writes JSON to benchmarks/results/ (scale_<device>.json;
--out to override) with device, versions and date, and prints a table.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from comfy_models import build_models_folder  # noqa: E402
from live_server import LiveServer  # noqa: E402

from sd35fp8.server import create_app  # noqa: E402
from sd35fp8.server.openai_api import checkpoint_max_side  # noqa: E402
from sd35fp8.tiny import SHIPPED_CHECKPOINT  # noqa: E402
from sd35fp8.tiny.evaluate import write_result  # noqa: E402

MODEL = "stable-diffusion-3.5-fp8"
WORDS = ["red cube", "blue ball", "green tree", "a cat", "a dog", "a house", "a boat", "a lamp"]


# ---- part 1: replicas ------------------------------------------------------------------------------
def one_request(url: str, i: int, args) -> float:
    import requests

    body = {"model": MODEL, "prompt": WORDS[i % len(WORDS)], "size": f"{args.serve_size}x{args.serve_size}",
            "steps": args.steps, "seed": i, "response_format": "b64_json", "sampler_name": "euler"}
    t0 = time.perf_counter()
    r = requests.post(f"{url}/v1/images/generations", json=body, timeout=3600)
    if not r.ok:  # the server's own message (OpenAI error shape), not only the status line
        raise requests.HTTPError(f"{r.status_code} from {url}: {r.text[:2000]}", response=r)
    base64.b64decode(r.json()["data"][0]["b64_json"])
    return time.perf_counter() - t0


def open_loop(url: str, rate: float, n: int, args, seed: int = 0) -> dict:
    """n requests with exponential gaps of mean 1/rate; latency per request and images/s."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n) if rate else np.zeros(n)  # rate None: all at once
    lat: list[float] = [0.0] * n
    errors: list[str] = []

    def fire(i: int) -> None:
        try:
            lat[i] = one_request(url, 1000 + i, args)
        except OSError as e:  # requests' errors are OSErrors
            errors.append(f"{i}: {e}")

    threads = []
    t0 = time.perf_counter()
    for i, gap in enumerate(gaps):
        time.sleep(gap)
        th = threading.Thread(target=fire, args=(i,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    done = [x for x in lat if x > 0]
    return {"rate_per_s": rate, "requests": n, "answered": len(done), "errors": errors,
            "images_per_s": len(done) / wall, "p50_s": float(np.percentile(done, 50)) if done else None,
            "p95_s": float(np.percentile(done, 95)) if done else None, "wall_s": wall}


def saturated(url: str, args) -> list[float]:
    """images/s with all --requests sent at once, --saturated-passes times (the last one is reported: the
    first pass meets cross-prompt batch sizes not seen before, which on CUDA compile their step)."""
    return [open_loop(url, None, args.requests, args)["images_per_s"] for _ in range(args.saturated_passes)]


def bench_replicas(args, models: Path, work: Path) -> list[dict]:
    print(f"replicas: the shipped model at {args.serve_size}x{args.serve_size}, {args.steps} steps")
    rows = []
    app = create_app(models, work / "plain", device=args.device, serve_frontend=False)
    with LiveServer(app, timeout=300) as srv:
        one_request(srv.url, 0, args)  # load the model
        single = statistics.median(one_request(srv.url, i + 1, args) for i in range(args.calibrate))
        print(f"plain server: {single:.3f} s per image (closed loop, {args.calibrate} requests)")
        sat = saturated(srv.url, args)
        rows.append({"setup": "plain", "replicas": 1, "closed_loop_s": single, "saturated_images_per_s": sat[-1],
                     "saturated_passes": sat, **open_loop(srv.url, args.load / single, args.requests, args)})
        print(f"plain: {rows[-1]}", flush=True)
    from sd35fp8.scale.ray_serve import create_ray_app, shutdown

    for n in args.replicas:
        app = create_ray_app(models, work / f"ray{n}", replicas=n, device=args.device, serve_frontend=False,
                             deployment={"num_cpus": args.replica_cpus} if args.replica_cpus else None)
        try:
            with LiveServer(app, timeout=600) as srv:
                for i in range(2 * n):  # load the model on every replica
                    one_request(srv.url, i, args)
                closed = statistics.median(one_request(srv.url, i + 1, args) for i in range(args.calibrate))
                sat = saturated(srv.url, args)
                rows.append({"setup": f"ray-{n}", "replicas": n, "closed_loop_s": closed,
                             "saturated_images_per_s": sat[-1], "saturated_passes": sat,
                             **open_loop(srv.url, args.load * n / single, args.requests, args)})
                print(f"ray-{n}: {rows[-1]}", flush=True)
        finally:
            shutdown()
    return rows


# ---- part 2: one image on K ranks -------------------------------------------------------------------
def _mmdit(config: str, device: torch.device):
    from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

    if config == "shipped":
        from sd35fp8.checkpoints.load import load_mmdit

        return load_mmdit(SHIPPED_CHECKPOINT, device=device, dtype=torch.float32).eval()
    cfg = {"large": MMDiTConfig.large, "medium": MMDiTConfig.medium}[config]()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = MMDiT(cfg)
    init_random_(model, torch.Generator(device).manual_seed(0))
    return model.to(dtype).eval()


def _rank(rank: int, world: int, store: str, args, out: str) -> None:
    from sd35fp8.scale.parallel import ParallelMMDiT

    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = _mmdit(args.config, device)
        c = model.config
        side = args.size // 8
        g = torch.Generator().manual_seed(1)
        dtype = model.x_embedder.proj.weight.dtype
        x = torch.randn(1, c.in_channels, side, side, generator=g).repeat(2, 1, 1, 1).to(device, dtype)  # [cond ; uncond]
        sigma = torch.full((2,), 0.7, device=device)
        ctx = torch.randn(2, 154, c.context_dim, generator=g).to(device, dtype)
        pooled = torch.randn(2, c.pooled_dim, generator=g).to(device, dtype)
        net = ParallelMMDiT(model, cfg=min(2, world)) if world > 1 else model
        times = []
        with torch.inference_mode():
            for i in range(args.warmup + args.reps):
                if cuda:
                    torch.cuda.synchronize()
                if world > 1:
                    dist.barrier()
                t0 = time.perf_counter()
                v = net(x, sigma, ctx, pooled)
                if cuda:
                    torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        if rank == 0:
            torch.save({"step_s": statistics.median(times), "v": v.float().cpu()}, out)
    finally:
        dist.destroy_process_group()


def bench_gpus(args, work: Path) -> list[dict]:
    rows, ref = [], None
    for k in args.gpus:
        out, store = str(work / f"k{k}.pt"), str(work / f"store{k}")
        mp.spawn(_rank, args=(k, store, args, out), nprocs=k, join=True)
        r = torch.load(out)
        ref = r["v"] if ref is None else ref
        rows.append({"k": k, "layout": "alone" if k == 1 else f"cfg {min(2, k)} x sp {k // min(2, k)}",
                     "step_s": r["step_s"], "image_s": args.steps * r["step_s"],
                     "max_abs_diff_vs_k1": float((r["v"] - ref).abs().max())})
    for row in rows:
        row["speedup"] = rows[0]["image_s"] / row["image_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU-sized counts (shipped model, 32x32, 2 replicas, K 1 2)")
    ap.add_argument("--replicas", type=int, nargs="*", default=[1, 2], help="Ray replica counts ([] = skip)")
    ap.add_argument("--gpus", type=int, nargs="*", default=[1, 2], help="K ranks for one image ([] = skip)")
    ap.add_argument("--config", default="shipped", choices=("shipped", "large", "medium"))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--saturated-passes", type=int, default=2, help="all-at-once passes (last one reported)")
    ap.add_argument("--calibrate", type=int, default=5)
    ap.add_argument("--load", type=float, default=0.8, help="offered load per replica, x its capacity")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--replica-cpus", type=float, default=None, help="Ray num_cpus per replica")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.tiny:
        args.size, args.steps, args.requests, args.calibrate, args.warmup, args.reps = 32, 4, 12, 3, 1, 3
        args.saturated_passes = 1
        args.replica_cpus = args.replica_cpus or 0.5
        args.device = args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        args.size = min(args.size, 128)  # the shipped model's native size; CPU runs stay small
    # the replicas serve the shipped model, whose position table covers 256x256 px (a larger size is a 400)
    args.serve_size = min(args.size, checkpoint_max_side(SHIPPED_CHECKPOINT) or args.size)
    result: dict = {"command": "python " + " ".join(sys.argv),
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        if args.replicas:
            result["replicas"] = bench_replicas(args, build_models_folder(work), work)
        if args.gpus:
            result["one_image"] = bench_gpus(args, work)
    try:
        import ray

        result["ray"] = ray.__version__
    except ImportError:
        result["ray"] = None
    print(f"\n{'setup':<8} {'replicas':>8} {'max img/s':>9} {'rate/s':>8} {'images/s':>9} {'p50 s':>8} {'p95 s':>8} "
          f"{'errors':>6}")
    for r in result.get("replicas", []):
        print(f"{r['setup']:<8} {r['replicas']:>8} {r['saturated_images_per_s']:>9.3f} {r['rate_per_s']:>8.2f} "
              f"{r['images_per_s']:>9.3f} {r['p50_s']:>8.3f} {r['p95_s']:>8.3f} {len(r['errors']):>6}")
    reps = {r["setup"]: r for r in result.get("replicas", [])}
    if "plain" in reps and "ray-1" in reps:
        result["ray_overhead"] = 1 - reps["ray-1"]["saturated_images_per_s"] / reps["plain"]["saturated_images_per_s"]
        print(f"Ray path (1 replica) vs plain server, saturated: {100 * result['ray_overhead']:+.1f} % images/s lost")
        plain_s, ray_s = reps["plain"]["closed_loop_s"], reps["ray-1"]["closed_loop_s"]
        result["ray_closed_loop_added_s"] = ray_s - plain_s
        print(f"closed loop (one request at a time): plain {plain_s:.4f} s, ray-1 {ray_s:.4f} s per image "
              f"({1000 * (ray_s - plain_s):+.1f} ms, {100 * (1 - plain_s / ray_s):+.1f} % images/s lost)")
    if result.get("one_image"):
        print(f"\n{'K':>3} {'layout':<14} {'step s':>8} {'image s':>8} {'speed-up':>8} {'max|dv|':>9}")
        for r in result["one_image"]:
            print(f"{r['k']:>3} {r['layout']:<14} {r['step_s']:>8.4f} {r['image_s']:>8.3f} {r['speedup']:>8.2f} "
                  f"{r['max_abs_diff_vs_k1']:>9.2e}")
    write_result(result, "scale" + ("_tiny" if args.tiny else ""), device, args.out)


if __name__ == "__main__":
    main()
