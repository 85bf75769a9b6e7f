"""Server throughput: images/s and latency for 1, 4, 16 concurrent clients, with and without
cross-prompt batching, through the real HTTP + WebSocket API (uvicorn on 127.0.0.1, in-process).

Model: the SHIPPED tiny model (src/sd35fp8/tiny/weights, 128x128 native) in a ComfyUI models folder
(tests/comfy_models.py), run through the seed all-in-one FP8 workflow (CheckpointLoaderSimple ->
CLIPTextEncode x2 -> KSampler euler -> VAEDecode -> SaveImage). A real SD3.5 config is too big to build
with random weights quickly, so the numbers show the serving overhead and the batching gain for a
small model, not SD3.5 Large throughput: with a large model the GPU is busier per image and the
batching gain is smaller.

Each client is closed-loop: POST /prompt, wait for its `executing: null` on /ws, repeat
(--prompts-per-client times, different seeds and texts). Modes: `batch` (max_batch 8, batch_wait_ms
20) and `nobatch` (max_batch 1). After the batch mode, a few batched prompts are re-run alone and the
pixel difference is recorded (exactness of batching on this device and FP8 mode).

    python benchmarks/server_throughput.py                 # GPU: benchmarks/results/server_throughput_<device>.json
    python benchmarks/server_throughput.py --smoke         # CPU, tiny counts, writes to a temp folder
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
import uvicorn
from PIL import Image
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from comfy_models import WORKFLOWS, build_models_folder  # noqa: E402
from live_server import LiveServer  # noqa: E402

from sd35fp8.server import create_app  # noqa: E402
from sd35fp8.workflow import ModelFolders, PromptExecutor, execution_order  # noqa: E402

WORDS = ["red", "blue", "green", "cube", "ball", "tree", "house", "cat", "dog", "star", "lamp", "boat"]
MODES = {"nobatch": {"max_batch": 1, "batch_wait_ms": 0.0}, "batch": {"max_batch": 8, "batch_wait_ms": 20.0}}


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def make_prompt(args, seed: int, text: str) -> dict:
    p = json.loads((WORKFLOWS / "seed-fp8-allinone.json").read_text())
    p["5"]["inputs"].update(width=args.size, height=args.size)
    p["3"]["inputs"].update(seed=seed, steps=args.steps, sampler_name="euler")
    p["6"]["inputs"]["text"] = text
    p["9"]["inputs"]["filename_prefix"] = "bench"
    return p


class Server(LiveServer):
    """create_app over a PromptExecutor, served on a free loopback port."""

    def __init__(self, models: Path, out: Path, device: str, max_batch: int, batch_wait_ms: float):
        self.executor = PromptExecutor(ModelFolders(models, output_dir=out, input_dir=out / "in", temp_dir=out / "t"),
                                       device=device)
        super().__init__(create_app(models, executor=self.executor, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                                    max_queue=1000, serve_frontend=False))

    def stats(self) -> dict:
        return requests.get(f"{self.url}/sd35fp8/worker", timeout=30).json()


def client(srv: Server, args, n: int, count: int, offset: int) -> list[tuple[str, float, dict]]:
    """Closed loop: post, wait for completion on /ws, repeat. -> [(prompt_id, latency s, prompt)]."""
    cid = f"bench{n}-{offset}"
    done: list[tuple[str, float, dict]] = []
    with connect(f"ws://127.0.0.1:{srv.port}/ws?clientId={cid}", max_size=None) as ws:
        for j in range(count):
            seed = offset + 1000 * n + j
            prompt = make_prompt(args, seed, f"a {WORDS[(n + j) % len(WORDS)]} {WORDS[(seed * 7) % len(WORDS)]}")
            t0 = time.perf_counter()
            r = requests.post(f"{srv.url}/prompt", json={"prompt": prompt, "client_id": cid}, timeout=60)
            r.raise_for_status()
            pid = r.json()["prompt_id"]
            while True:
                msg = ws.recv(timeout=600)
                if isinstance(msg, bytes):
                    continue
                m = json.loads(msg)
                if m["type"] == "executing" and m["data"].get("prompt_id") == pid and m["data"]["node"] is None:
                    break
            done.append((pid, time.perf_counter() - t0, prompt))
    return done


def run_level(srv: Server, args, clients: int, offset: int) -> tuple[dict, list]:
    before = srv.stats()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        per = list(pool.map(lambda n: client(srv, args, n, args.prompts_per_client, offset), range(clients)))
    wall = time.perf_counter() - t0
    runs = [x for p in per for x in p]
    hist = requests.get(f"{srv.url}/history", params={"max_items": 100000}, timeout=60).json()
    ok = sum(1 for pid, _, _ in runs if hist.get(pid, {}).get("status", {}).get("status_str") == "success")
    after = srv.stats()
    lat = sorted(x[1] for x in runs)
    delta = {k: after[k] - before[k] for k in ("runs", "prompts", "batched_runs", "batched_prompts")}
    row = {"clients": clients, "images": len(runs), "completed": ok, "seconds": round(wall, 3),
           "images_per_s": round(len(runs) / wall, 3), "latency_p50_s": round(statistics.median(lat), 4),
           "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 4),
           "mean_batch": round(delta["prompts"] / max(delta["runs"], 1), 2), **delta}
    return row, runs


def exactness(srv: Server, runs: list, n: int) -> dict:
    """Re-run up to n batched prompts alone (models stay cached) and compare pixels."""
    ex = srv.executor
    hist = requests.get(f"{srv.url}/history", params={"max_items": 100000}, timeout=60).json()
    diffs, fracs = [], []
    for pid, _, prompt in runs[:n]:
        (ui,) = hist[pid]["outputs"].values()
        img = ui["images"][0]
        served = np.asarray(Image.open(ex.folders.output_dir / img["subfolder"] / img["filename"]).convert("RGB"))
        keys = ex.node_keys(prompt, execution_order(prompt, ["9"]))
        ex.drop_cache_except({keys["4"], keys["5"]})
        res = ex.execute(copy.deepcopy(prompt), "alone")
        (ui,) = res.outputs.values()
        img = ui["images"][0]
        lone = np.asarray(Image.open(ex.folders.output_dir / img["subfolder"] / img["filename"]).convert("RGB"))
        d = np.abs(served.astype(int) - lone.astype(int))
        diffs.append(int(d.max()))
        fracs.append(round(float((d > 0).mean()), 6))
    return {"compared": len(diffs), "max_uint8_diff": diffs, "frac_pixels_differing": fracs}


HEADER = f"{'mode':8} {'clients':>7} {'images':>6} {'img/s':>8} {'p50 s':>8} {'p95 s':>8} {'mean batch':>10}"


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(f"{r['mode']:8} {r['clients']:7d} {r['images']:6d} {r['images_per_s']:8.2f} {r['latency_p50_s']:8.3f} "
              f"{r['latency_p95_s']:8.3f} {r['mean_batch']:10.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", default="1,4,16", help="comma list of concurrent client counts")
    ap.add_argument("--prompts-per-client", type=int, default=8)
    ap.add_argument("--size", type=int, default=128, help="image size (the shipped model is 128x128 native)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="nobatch,batch")
    ap.add_argument("--exact-check", type=int, default=4, help="batched prompts re-run alone for the pixel check")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: 64x64, 2 steps, clients 1,2, 2 prompts")
    ap.add_argument("--out", default=None, help="result folder (default benchmarks/results; --smoke: a temp folder)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device, args.clients, args.prompts_per_client, args.size, args.steps = "cpu", "1,2", 2, 64, 2
        args.exact_check = min(args.exact_check, 1)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="sd35fp8-bench-"))
    out_dir = Path(args.out) if args.out else (work if args.smoke else ROOT / "benchmarks" / "results")
    models = build_models_folder(work)
    levels = [int(c) for c in args.clients.split(",") if c.strip()]
    rows: list[dict] = []
    checks: dict = {}
    print(HEADER)
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        with Server(models, work / f"out-{mode}", args.device, **MODES[mode]) as srv:
            client(srv, args, 0, 1, offset=10 ** 6)  # warm-up: loads the models
            batched: list = []
            for i, clients in enumerate(levels):
                row, runs = run_level(srv, args, clients, offset=10 ** 5 * (i + 1))
                rows.append({"mode": mode, **MODES[mode], **row})
                print_rows(rows[-1:])
                batched += runs if row["batched_prompts"] else []
            if mode == "batch" and args.exact_check and batched:
                checks = exactness(srv, batched, args.exact_check)
    result = {
        "benchmark": "server_throughput",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
                     "uvicorn": uvicorn.__version__},
        "model": "shipped tiny model (sd35fp8_tiny), all-in-one FP8 checkpoint via the seed workflow; "
                 "not a real SD3.5 config",
        "config": {"size": args.size, "steps": args.steps, "sampler": "euler", "cfg": 4.5,
                   "prompts_per_client": args.prompts_per_client, "smoke": args.smoke, "modes": MODES},
        "results": rows,
        "batched_vs_alone": checks,
    }
    print("\nall images completed:", all(r["completed"] == r["images"] for r in rows))
    print("batched vs alone:", checks)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"server_throughput_{device_slug(device)}{'_smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0 if all(r["completed"] == r["images"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
