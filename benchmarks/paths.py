"""Every road a user takes to an SD3.5 Large image, on one GPU, in one run (issue 19's "done when").

Random weights at the real Large config in one all-in-one FP8 file (MMDiT FP8 per default policy,
T5-XXL FP8 per the T5 policy, CLIP-L/G and VAE 16-bit; ComfyUI key layout, native FP8 scales),
written once as models/checkpoints/stable-diffusion-3.5-fp8.safetensors, the name the seed's
workflow (tests/data/seed-fp8-allinone.json) loads. Same parameters everywhere: that workflow's
prompt and negative, seed 42, 1024², 20 euler steps (scheduler normal), cfg 4.5, CFG batch 2.

Roads, each in its own process (a fresh process, as a user starts one; the Inductor cache dir is
shared, so compiled roads after the first find a warm cache, as a user's second start does):
    generate           SD35Pipeline.from_pretrained(file) + pipe(...) (what `sd35fp8 generate` calls)
    generate_compile   the same with compile=True (`generate --compile`)
    api                the Python API default (= generate's arguments, compile None)
    run                run_workflow(seed workflow) through PromptExecutor (what `sd35fp8 run` calls)
    server             create_app + uvicorn; executor.warmup(workflow) at start (reported apart); POST
                       /prompt of the workflow over HTTP twice; the second is the warm image
    offload_model      from_pretrained(offload="model")        (`--offload model` / `--lowvram`)
    offload_sequential from_pretrained(offload="sequential")   (`--offload sequential` / `--novram`)
Compile start-up: `compile_cold` (fresh Inductor cache dir) and `compile_warm` (second process, same
dir) load the file and run engine.warmup([(1024, 1024, 1)]) (torch.compile + CUDA graph capture).

Per road: ms per MMDiT step (median of the warm image's steps, CUDA events around each engine call),
seconds per image (warm image, wall), first image seconds (after loading: includes compile /
capture), peak GPU memory (max_memory_allocated over the warm image), load seconds. Also: the
MMDiT's weight bytes, pinned host-to-device bandwidth (measured in the same run) and the copy bound
(weight bytes / bandwidth), and images compared across roads (max |diff| of uint8 pixels).

    python benchmarks/paths.py                      # GPU: writes benchmarks/results/paths_<device>.json
    python benchmarks/paths.py --tiny --device cpu  # CPU dry run, tiny config (writes to --out)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from results_io import device_slug  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "tests" / "data" / "seed-fp8-allinone.json"
CKPT_NAME = "stable-diffusion-3.5-fp8.safetensors"
GIB = 1024 ** 3
ROADS = ("generate", "api", "run", "server", "generate_compile", "offload_model", "offload_sequential")
OFFLOAD = {"offload_model": "model", "offload_sequential": "sequential"}
RESIDENT = ("generate", "generate_compile", "api", "run", "server")


# ------------------------------------------------------------------------------------ the file
def build_file(models: Path, tiny: bool, device: torch.device) -> dict:
    """Random Large (or tiny) weights -> one all-in-one FP8 checkpoint + spiece.model beside it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from e2e import fill_random_, stack_configs  # random nets shaped like trained ones

    from sd35fp8.fp8 import quantize_model
    from sd35fp8.checkpoints.fp8_load import _patch_t5_ff
    from sd35fp8.fp8.policy_sd35 import default_policy, default_t5_policy
    from sd35fp8.models.mmdit import MMDiT, init_random_
    from sd35fp8.models.vae import SD3VAE
    from sd35fp8.text.encoders import build_clip, build_t5, init_meta_buffers
    from sd35fp8.tiny.export import PREFIXES

    t0 = time.perf_counter()
    cfgs = stack_configs(tiny)
    g = torch.Generator(device=device).manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}

    def take(prefix: str, module: torch.nn.Module, skip=()) -> None:
        for k, v in module.state_dict().items():
            if k not in skip and not k.endswith("position_ids"):
                tensors[prefix + k] = v.detach().to("cpu").contiguous()

    with torch.device("meta"):
        mmdit = MMDiT(cfgs["mmdit"]).eval()
    mmdit.to_empty(device=device)
    init_random_(mmdit, g)
    mmdit.to(torch.bfloat16)
    quantize_model(mmdit, "dynamic", policy=default_policy())
    take(PREFIXES["mmdit"], mmdit)
    del mmdit
    with torch.device("meta"):
        vae = SD3VAE(cfgs["vae"]).eval()
    vae.to_empty(device=device)
    fill_random_(vae, g).to(torch.bfloat16)
    take(PREFIXES["vae"], vae)
    del vae
    for name, module in (("clip_l", build_clip(cfgs["clip_l"], with_projection=False)),
                         ("clip_g", build_clip(cfgs["clip_g"])), ("t5xxl", build_t5(cfgs["t5"]))):
        init_meta_buffers(module, device)
        module.to_empty(device=device)
        fill_random_(module, g).to(torch.bfloat16)
        if name == "t5xxl":
            quantize_model(module, "weight_only", policy=default_t5_policy(cfgs["t5"].num_layers))
            _patch_t5_ff(module)
            take(PREFIXES[name], module, skip=("encoder.embed_tokens.weight",))
        else:
            take(PREFIXES[name], module)
        del module
    ckpt = models / "checkpoints" / CKPT_NAME
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, str(ckpt))
    train_spm(ckpt.parent / "spiece.model")
    return {"file": str(ckpt), "bytes": ckpt.stat().st_size, "seconds": time.perf_counter() - t0}


def train_spm(path: Path) -> Path:
    """A T5 SentencePiece model (no real one offline) whose pieces are the workflow's words, so its prompt
    takes about as many T5 tokens as with the real tokenizer (< 77: one 77-token T5 chunk, as in the issue)."""
    import io

    import sentencepiece as spm

    prompt = json.loads(WORKFLOW.read_text())
    texts = [prompt["6"]["inputs"]["text"], prompt["7"]["inputs"]["text"]]
    words = sorted({w.strip(",.").lower() for t in texts for w in t.split()})
    corpus = texts * 50 + [" ".join(words[i:i + 6]) for i in range(0, len(words), 3)] * 50
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=len(words) + 60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   hard_vocab_limit=False)
    path.write_bytes(buf.getvalue())
    return path


# ------------------------------------------------------------------------------------ measuring
class StepTimer:
    """CUDA events around every MMDiTEngine call (no sync inside the step); ms per call after sync."""

    def __init__(self):
        from sd35fp8.fast import MMDiTEngine

        self.pairs: list = []
        self.cpu: list[float] = []
        original = MMDiTEngine.forward
        timer = self

        def timed(engine, *args, **kwargs):
            if torch.cuda.is_available():
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = original(engine, *args, **kwargs)
                b.record()
                timer.pairs.append((a, b))
                return out
            t = time.perf_counter()
            out = original(engine, *args, **kwargs)
            timer.cpu.append((time.perf_counter() - t) * 1000)
            return out

        MMDiTEngine.forward = timed

    def reset(self) -> None:
        self.pairs, self.cpu = [], []

    def ms(self) -> list[float]:
        if self.pairs:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.pairs]
        return list(self.cpu)


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Pinned host -> device copy bandwidth in bytes/s (best of 5 copies of `nbytes`)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def workflow_params(tiny: bool) -> dict:
    prompt = json.loads(WORKFLOW.read_text())
    k = prompt["3"]["inputs"]
    size = 64 if tiny else prompt["5"]["inputs"]["width"]
    return dict(prompt=prompt["6"]["inputs"]["text"], negative_prompt=prompt["7"]["inputs"]["text"],
                num_inference_steps=2 if tiny else k["steps"], guidance_scale=k["cfg"], sampler=k["sampler_name"],
                scheduler=k["scheduler"], seed=k["seed"], width=size, height=size)


def workflow_prompt(tiny: bool) -> dict:
    prompt = json.loads(WORKFLOW.read_text())
    if tiny:
        prompt["5"]["inputs"].update(width=64, height=64)
        prompt["3"]["inputs"]["steps"] = 2
    return prompt


# ------------------------------------------------------------------------------------ one road
def road_pipeline(name: str, args, device: torch.device, timer: StepTimer) -> dict:
    from sd35fp8.pipeline import SD35Pipeline

    kw = workflow_params(args.tiny)
    t0 = time.perf_counter()
    compile_ = True if name == "generate_compile" else None
    pipe = SD35Pipeline.from_pretrained(args.file, device=device, offload=OFFLOAD.get(name, "none"),
                                        compile=compile_)
    sync(device)
    out = {"load_s": time.perf_counter() - t0, "engine": pipe.mmdit.describe(),
           "weight_bytes": pipe.mmdit.weight_bytes()}
    images = []
    for i in range(args.images):
        reset_peak(device)
        timer.reset()
        t = time.perf_counter()
        res = pipe(progress=False, **kw)
        sync(device)
        sec = time.perf_counter() - t
        images.append(np.asarray(res.images[0]))
        if i == 0:
            out["first_image_s"] = sec
        out.update(seconds_per_image=sec, peak_gib=peak_gib(device), steps_ms=timer.ms(),
                   stages_s=dict(pipe.stats.seconds))
    np.save(Path(args.work) / f"{name}.npy", images[-1])
    return out


def road_run_cli_like(args, device: torch.device, timer: StepTimer) -> dict:
    """`sd35fp8 run` = one process, one run_workflow call: first image includes loading. Warm image:
    the same executor runs the workflow again with the sampler's seed changed back and forth."""
    from sd35fp8.workflow.executor import PromptExecutor
    from sd35fp8.workflow.folders import ModelFolders
    from sd35fp8.workflow.run import run_workflow

    folders = ModelFolders(Path(args.work) / "models", output_dir=Path(args.work) / "out_run")
    wf = Path(args.work) / "workflow.json"
    wf.write_text(json.dumps(workflow_prompt(args.tiny)))
    ex = PromptExecutor(folders, device=device)  # compile None: the device's default for run/serve
    out = {"compile": ex.compile, "engine": None}
    seeds = ["3.seed=43", "3.seed=42"] * max(1, args.images // 2)  # the last (warm) image: the workflow's seed 42
    for i, s in enumerate(seeds):
        reset_peak(device)
        timer.reset()
        t = time.perf_counter()
        res = run_workflow(wf, Path(args.work) / "models", sets=[s] if s else [], device=str(device), executor=ex)
        sync(device)
        if not res.success:
            raise RuntimeError(f"run failed: {res.error}")
        sec = time.perf_counter() - t
        if i == 0:
            out["first_image_s"] = sec
            out["first_image_includes_load"] = True
        out.update(seconds_per_image=sec, peak_gib=peak_gib(device), steps_ms=timer.ms())
    out["engine"] = _executor_engine(ex)
    out["image"] = _last_png(Path(args.work) / "out_run", args.work, "run")
    return out


def _executor_engine(ex) -> str | None:
    for outputs, _ in ex._cache.values():
        for v in outputs:
            if hasattr(v, "mmdit"):
                return v.mmdit.describe()
    return None


def _last_png(folder: Path, work: str, name: str) -> str | None:
    from PIL import Image

    pngs = sorted(folder.rglob("*.png"), key=lambda p: p.stat().st_mtime)
    if not pngs:
        return None
    np.save(Path(work) / f"{name}.npy", np.asarray(Image.open(pngs[-1]).convert("RGB")))
    return pngs[-1].name


def road_server(args, device: torch.device, timer: StepTimer) -> dict:
    import requests

    sys.path.insert(0, str(ROOT / "tests"))
    from live_server import LiveServer

    from sd35fp8.server.app import create_app
    from sd35fp8.workflow.executor import PromptExecutor
    from sd35fp8.workflow.folders import ModelFolders

    work = Path(args.work)
    folders = ModelFolders(work / "models", output_dir=work / "out_server", input_dir=work / "in",
                           temp_dir=work / "tmp")
    prompt = workflow_prompt(args.tiny)
    t0 = time.perf_counter()
    ex = PromptExecutor(folders, device=device)  # compile None: the device's default for serve
    warm_s = ex.warmup(prompt)  # start-up: load + compile/capture the workflow's shape
    sync(device)
    out = {"compile": ex.compile, "startup_warmup_s": warm_s}
    app = create_app(work / "models", executor=ex, serve_frontend=False)
    with LiveServer(app) as srv:
        out["startup_s"] = time.perf_counter() - t0
        for i, seed in enumerate([43, 42, 43, 42][-max(2, args.images):]):  # the last (warm) one: seed 42
            prompt["3"]["inputs"]["seed"] = seed
            reset_peak(device)
            timer.reset()
            t = time.perf_counter()
            r = requests.post(f"{srv.url}/prompt", json={"prompt": prompt, "client_id": "paths"}, timeout=60)
            r.raise_for_status()
            pid = r.json()["prompt_id"]
            while True:
                h = requests.get(f"{srv.url}/history/{pid}", timeout=30).json()
                if pid in h and h[pid].get("status", {}).get("completed") is not None:
                    break
                time.sleep(0.005)
            sec = time.perf_counter() - t
            status = h[pid]["status"]
            if status.get("status_str") != "success":
                raise RuntimeError(f"server prompt failed: {status}")
            if i == 0:
                out["first_image_s"] = sec
            out.update(seconds_per_image=sec, peak_gib=peak_gib(device), steps_ms=timer.ms())
    out["engine"] = _executor_engine(ex)
    out["image"] = _last_png(work / "out_server", args.work, "server")
    return out


def compile_probe(args, device: torch.device, profile: bool = False) -> dict:
    """Process start-up with compile: load the file, build the engine, warm up 1024² (cold or warm cache)."""
    from sd35fp8.pipeline import SD35Pipeline

    prof = cProfile.Profile() if profile else None  # profiled start-ups are slower: a road of their own
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    pipe = SD35Pipeline.from_pretrained(args.file, device=device, compile=device.type == "cuda")
    sync(device)
    load = time.perf_counter() - t0
    kw = workflow_params(args.tiny)
    warm = pipe.warmup([(kw["width"], kw["height"], 1)])
    start = time.perf_counter() - t0
    text = io.StringIO()
    if prof:
        prof.disable()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
    try:
        from torch._dynamo.utils import compile_times
        times = compile_times(repr="str")
    except (ImportError, TypeError) as e:
        times = f"unavailable: {e}"
    return {"load_s": load, "warmup_s": warm, "start_s": start,
            "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "profile_top": text.getvalue().splitlines()[:100], "dynamo_compile_times": str(times)[:4000]}


def child(args) -> int:
    device = torch.device(args.device)
    timer = StepTimer()
    t0 = time.perf_counter()
    if args.road in ("compile_cold", "compile_warm", "compile_warm_profiled"):
        res = compile_probe(args, device, profile=args.road == "compile_warm_profiled")
    elif args.road == "run":
        res = road_run_cli_like(args, device, timer)
    elif args.road == "server":
        res = road_server(args, device, timer)
    else:
        res = road_pipeline(args.road, args, device, timer)
    steps = res.pop("steps_ms", [])
    if steps:
        res["ms_per_step"] = statistics.median(steps)
        res["step_ms_max"] = max(steps)
        res["steps"] = len(steps)
    res["process_s"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(res, default=str))
    return 0


# ------------------------------------------------------------------------------------ parent


def run_child(args, road: str, env: dict, timeout: float) -> dict:
    result = Path(args.work) / f"{road}.json"
    cmd = [sys.executable, __file__, "--child", road, "--file", args.file, "--work", args.work,
           "--device", args.device, "--result", str(result), "--images", str(args.images)]
    if args.tiny:
        cmd.append("--tiny")
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"[{road}] FAILED rc={proc.returncode}\n{tail}", flush=True)
        return {"error": tail[-1500:], "wall_s": time.perf_counter() - t}
    res = json.loads(result.read_text())
    res["wall_s"] = time.perf_counter() - t
    return res


def table(result: dict) -> str:
    lines = [f"{'road':<20}{'offload':>11}{'ms/step':>9}{'s/image':>9}{'first s':>9}{'peak GiB':>10}{'load s':>8}"]

    def f(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for name, r in result["roads"].items():
        lines.append(f"{name:<20}{r.get('offload', '-'):>11}{f(r.get('ms_per_step'), '.1f'):>9}"
                     f"{f(r.get('seconds_per_image'), '.3f'):>9}{f(r.get('first_image_s'), '.2f'):>9}"
                     f"{f(r.get('peak_gib'), '.2f'):>10}{f(r.get('load_s'), '.1f'):>8}")
    return "\n".join(lines)


def checks(result: dict) -> dict:
    roads = result["roads"]
    ok = {k: v for k, v in roads.items() if isinstance(v.get("ms_per_step"), (int, float))}
    out: dict = {}
    res = [k for k in RESIDENT if k in ok]
    if res:
        fastest = min(ok[k]["ms_per_step"] for k in res)
        out["fastest_resident_ms"] = fastest
        out["resident_within_10pct_and_85ms"] = {k: ok[k]["ms_per_step"] <= 1.1 * fastest and ok[k]["ms_per_step"] <= 85
                                                 for k in res}
        ref_img = min(ok[k]["seconds_per_image"] for k in res)
        out["resident_best_image_s"] = ref_img
        if "offload_model" in ok:
            m = ok["offload_model"]
            out["offload_model_image_ratio"] = m["seconds_per_image"] / ref_img
            out["offload_model_ok"] = m["seconds_per_image"] <= 1.3 * ref_img and (m["peak_gib"] or 0) <= 10.5
        if "offload_sequential" in ok:
            s = ok["offload_sequential"]
            out["offload_sequential_image_ratio"] = s["seconds_per_image"] / ref_img
            bound = result.get("copy_bound_ms")
            out["offload_sequential_step_vs_copy_bound"] = (s["step_ms_max"] / bound) if bound else None
            out["offload_sequential_ok"] = (s["seconds_per_image"] <= 2.5 * ref_img and (s["peak_gib"] or 0) <= 6.0
                                            and bound is not None and s["step_ms_max"] <= 1.15 * bound)
    if "server" in ok and "first_image_s" in ok["server"]:
        sv = ok["server"]
        out["server_first_vs_warm"] = sv["first_image_s"] / sv["seconds_per_image"]
    cold, warm = roads.get("compile_cold", {}), roads.get("compile_warm", {})
    if "start_s" in cold and "start_s" in warm:
        out["warm_start_vs_cold_compile"] = warm["start_s"] / max(cold["warmup_s"], 1e-9)
        out["warm_start_vs_cold_start"] = warm["start_s"] / cold["start_s"]
    return out


def compare_images(work: Path, names) -> dict:
    imgs = {n: np.load(work / f"{n}.npy") for n in names if (work / f"{n}.npy").exists()}
    if "generate" not in imgs:
        return {}
    ref = imgs["generate"].astype(np.int16)
    return {n: int(np.abs(a.astype(np.int16) - ref).max()) for n, a in imgs.items() if a.shape == ref.shape}


def parent(args) -> int:
    device = torch.device(args.device)
    start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="paths_"))
    args.work = str(work)
    cache = work / "inductor"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT / "src") + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    built = build_file(work / "models", args.tiny, device)
    args.file = built["file"]
    print(f"file: {built['bytes'] / 1e9:.2f} GB in {built['seconds']:.1f} s", flush=True)
    bw = h2d_bandwidth(device)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    result = {"device": device_slug(device), "versions": {"torch": torch.__version__, "python": platform.python_version(),
                                                          "cuda": torch.version.cuda},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": {"model": "tiny" if args.tiny else "Large", "weights": "random", "size": workflow_params(args.tiny)["width"],
                         "steps": workflow_params(args.tiny)["num_inference_steps"], "cfg": 4.5, "sampler": "euler",
                         "scheduler": "normal", "seed": 42, "cfg_batch": 2, "file_bytes": built["bytes"]},
              "how": {"generate/api/offload_*": "SD35Pipeline.from_pretrained + __call__ in a fresh process with the "
                      "arguments `sd35fp8 generate` passes (the CLI itself is not spawned)",
                      "run": "workflow.run.run_workflow (what `sd35fp8 run` calls) in a fresh process; its first "
                      "image includes loading the file",
                      "server": "create_app + uvicorn on loopback; PromptExecutor.warmup(workflow) before listening "
                      "(startup_warmup_s); POST /prompt over HTTP, first and second prompt",
                      "compile_cold/compile_warm": "from_pretrained(compile=True) + pipe.warmup([(1024,1024,1)]) in a "
                      "fresh process; cold = empty Inductor cache dir, warm = second process on the same dir"},
              "h2d_bandwidth_gbs": None if bw is None else bw / 1e9, "roads": {}}
    order = ["compile_cold", *[r for r in args.roads if r in ROADS], "compile_warm"]
    if args.profile_start:  # a third start-up under cProfile (where the warm start's seconds go)
        order.append("compile_warm_profiled")
    if device.type != "cuda":  # torch.compile of the engine needs CUDA: nothing to measure on the CPU
        order = [r for r in order if r not in ("compile_cold", "compile_warm", "compile_warm_profiled",
                                               "generate_compile")]
    out_path = Path(args.out) / f"paths_{result['device']}.json"
    for road in order:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            result["roads"][road] = {"error": f"not run: time budget ({args.budget_s} s) spent"}
            continue
        res = run_child(args, road, env, timeout=left)
        res["offload"] = OFFLOAD.get(road, "none")
        result["roads"][road] = res
        print(f"[{road}] {json.dumps({k: v for k, v in res.items() if k not in ('weight_bytes', 'error')}, default=str)[:600]}",
              flush=True)
        wb = res.get("weight_bytes")
        if wb and "mmdit_weight_bytes" not in result:
            result["mmdit_weight_bytes"] = wb["total"]
            result["mmdit_streamed_bytes"] = wb["blocks"]
            if bw:
                result["copy_bound_ms"] = wb["total"] / bw * 1000
                result["copy_bound_streamed_ms"] = wb["blocks"] / bw * 1000
        result["checks"] = checks(result)
        result["pixels_max_abs_diff_vs_generate"] = compare_images(work, list(result["roads"]))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    print(json.dumps(result["checks"], indent=1))
    print(f"wrote {out_path} in {time.perf_counter() - start:.0f} s")
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU dry run)")
    ap.add_argument("--roads", default=",".join(ROADS), type=lambda s: [r for r in s.split(",") if r])
    ap.add_argument("--images", type=int, default=2, help="images per road (the last one is the warm image)")
    ap.add_argument("--work", default=None, help="folder for the file, images, per-road JSON (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--budget-s", type=float, default=520.0, help="stop starting roads after this many seconds")
    ap.add_argument("--profile-start", action="store_true",
                    help="also profile a warm-cache start-up (cProfile top + dynamo compile times in the JSON)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        args.road = args.child
        return child(args)
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
