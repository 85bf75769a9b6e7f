"""Side-by-side speed of one SD3.5 MMDiT step: diffusers (eager, compile, torchao fp8) vs sd35fp8.

One program, one run, same random weights and inputs for every contender (speed does not depend on
values). Default: SD3.5 Large and Medium, 1024x1024 (latent 128), batch 2 (CFG), context 333 tokens
(77 CLIP + 256 T5, diffusers' default T5 length; ComfyUI's default is 154 = 77 + 77, measured as an
extra row). Per contender: median ms/step over >= 10 CUDA-event-timed steps after warm-up, first
call seconds (compile + CUDA-graph capture), peak memory, SQNR (dB) against our BF16 reference
module on the same inputs. Prints a table, writes JSON to <out>/speed_<device-slug>.json
(--merge adds to an existing file, so models can be run in separate processes).

    python benchmarks/speed.py                                   # H100: everything
    python benchmarks/speed.py --models large --contenders ours_dynamic_compiled,diffusers_compile
    python benchmarks/speed.py --tiny                            # CPU smoke test

End-to-end hook: with --e2e, benchmarks/e2e.py's `run_e2e(args) -> dict` (owned by the offload
work) is called and its result stored under "e2e".
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from mmdit_parity_gpu import build_diffusers, build_ours, device_slug, step_flops, sync, time_ms  # noqa: E402

from sd35fp8.fast import MMDiTEngine, enable_compile_cache  # noqa: E402
from sd35fp8.fast.attention import attention_flops, backend_context, probe_fp8_sdpa, sdpa  # noqa: E402
from sd35fp8.fp8.quantize import quantize_model  # noqa: E402
from sd35fp8.fp8.scaling import sqnr  # noqa: E402
from sd35fp8.models.mmdit import MMDiTConfig  # noqa: E402

# *_regional: torch.compile per transformer block (diffusers' "regional compilation": one graph reused by
# all 38 / 24 blocks, a fraction of the whole-model compile time)
DIFFUSERS = ["diffusers_eager", "diffusers_compile", "diffusers_torchao", "diffusers_compile_regional",
             "diffusers_torchao_regional"]
OURS_BF16 = ["ours_ref_eager", "ours_bf16_eager", "ours_bf16_compiled"]
OURS_FP8 = [f"ours_{m}_{k}" for m in ("weight_only", "dynamic", "static") for k in ("eager", "compiled")]
EXTRAS = ["ctx154", "throughput", "compile_cache", "attention"]
ALL = OURS_BF16 + DIFFUSERS + OURS_FP8 + EXTRAS
# variants of an ours_* FP8 contender, appended with '+': '+tk' keeps our Triton elementwise kernels
# inside the compiled graph (MMDiTEngine kernels="triton", the default since session 3), '+ind' lets
# Inductor fuse torch ops instead (kernels="auto"), '+fa' / '+fa8' use our Triton flash attention
# in bf16 / fp8 instead of cuDNN SDPA ('+fa8' is the default of FP8 modes on sm_89+ since session 3;
# '+cudnn' forces cuDNN SDPA), '+acc' / '+noacc' fp8 GEMMs with / without fast accumulation (default: with). E.g. ours_static_compiled+cudnn.
VARIANTS = {"tk": ("kernels", "triton"), "ind": ("kernels", "auto"), "cudnn": ("attention_backend", "cudnn"),
            "fa": ("attention_backend", "triton"),
            "fa8": ("attention_backend", "triton_fp8"), "acc": ("fast_accum", True),
            "noacc": ("fast_accum", False)}


def split_variant(name: str) -> tuple[str, dict]:
    """'ours_static_compiled+tk+fa8' -> ('ours_static_compiled', MMDiTEngine keyword arguments)."""
    base, *flags = name.split("+")
    unknown = [f for f in flags if f not in VARIANTS]
    if unknown or (flags and base not in OURS_FP8):
        raise ValueError(f"contender {name!r}: variants {unknown or flags} not understood (see VARIANTS)")
    return base, dict(VARIANTS[f] for f in flags)


class Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise Timeout()


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def measure(name: str, fn: Callable[[], torch.Tensor], ref: torch.Tensor | None, dev, args, flops: float,
            limit_s: int = 0) -> tuple[dict, torch.Tensor | None]:
    """First call (compile/capture) + timed steps; a time limit (SIGALRM) where limit_s > 0."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    resident = torch.cuda.memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    row = {"contender": name, "resident_gib": resident}
    if limit_s:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit_s)
    try:
        t0 = time.perf_counter()
        out = fn()
        sync(dev)
        row["first_call_s"] = time.perf_counter() - t0
        times = time_ms(fn, dev, args.steps, args.warmup)
    except Timeout:
        row["error"] = f"did not finish within {limit_s} s (compile + {args.steps + args.warmup} steps)"
        print(f"  {name:<26} {row['error']}", flush=True)
        return row, None
    except RuntimeError as err:  # recorded in the table and JSON; the other contenders still run
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()] or [""]
        row["error"] = f"{type(err).__name__}: {lines[0][:300]}" + (f" ... {lines[-1][:200]}" if len(lines) > 1 else "")
        print(f"  {name:<26} FAILED {row['error']}", flush=True)
        return row, None
    finally:
        if limit_s:
            signal.alarm(0)
    if limit_s and row["first_call_s"] > limit_s:  # the alarm landed inside a compile worker and was swallowed
        row["note"] = (f"first call took {row['first_call_s']:.0f} s, past the {limit_s} s limit: the alarm hit "
                       "a compile subprocess, which Inductor logged and skipped; the steps after it are timed")
    med = statistics.median(times)
    row.update(median_ms=med, min_ms=min(times), max_ms=max(times), n=len(times),
               tflops=flops / (med * 1e-3) / 1e12,
               peak_mem_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None)
    out = out.detach().float()
    if ref is not None:
        row["sqnr_db"] = sqnr(ref, out)
    print(f"  {name:<26} {med:9.2f} ms  first call {row['first_call_s']:6.1f} s  "
          f"SQNR {row.get('sqnr_db', float('nan')):6.1f} dB  peak {row['peak_mem_gib'] or 0:.1f} GiB", flush=True)
    return row, out


def make_inputs(cfg, batch, ctx_len, latent, dev, dtype, seed):
    g = torch.Generator(dev).manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g, device=dev).to(dtype)
    sigma = torch.full((batch,), 0.75, device=dev)
    ctx = torch.randn(batch, ctx_len, cfg.context_dim, generator=g, device=dev).to(dtype)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g, device=dev).to(dtype)
    return x, sigma, ctx, pooled


def attention_bench(cfg, n_tok: int, dev, args) -> dict:
    """SDPA backends at this model's joint-attention shape; the FP8 SDPA probe."""
    B, H, D = args.batch, cfg.num_heads, cfg.hidden_size // cfg.num_heads
    q, k, v = (torch.randn(B, n_tok, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    flops = attention_flops(B, H, n_tok, n_tok, D)
    res = {"tokens": n_tok, "fp8_sdpa_probe": probe_fp8_sdpa(dev)}
    ref = None
    for name in ("cudnn", "flash", "efficient"):
        try:
            with backend_context(name):
                out = sdpa(q, k, v)
                ms = statistics.median(time_ms(lambda: sdpa(q, k, v), dev, 20, 5))
        except RuntimeError as err:
            res[name] = {"error": str(err).splitlines()[0][:200]}
            continue
        ref = out.float() if ref is None else ref
        res[name] = {"ms": ms, "tflops": flops / ms / 1e9, "sqnr_vs_cudnn": sqnr(ref, out.float())}
    print(f"  attention {n_tok} tokens: " + ", ".join(
        f"{k} {v['ms']:.3f} ms ({v['tflops']:.0f} TFLOP/s)" for k, v in res.items()
        if isinstance(v, dict) and "ms" in v) + f"; fp8 SDPA: {res['fp8_sdpa_probe']}", flush=True)
    return res


def run_model(label: str, cfg: MMDiTConfig, args, dev) -> dict:
    want = set(args.contenders)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    inputs = make_inputs(cfg, args.batch, args.context_len, args.latent, dev, dtype, args.seed + 1)
    n_img = (args.latent // cfg.patch_size) ** 2
    flops = step_flops(cfg, args.batch, n_img, args.context_len)
    print(f"{label}: {cfg.describe()}\n  latent {args.latent}, batch {args.batch}, context {args.context_len}, "
          f"{flops / 1e12:.1f} TFLOP/step", flush=True)
    rows: list[dict] = []
    res: dict = {"config": cfg.describe(), "batch": args.batch, "context_len": args.context_len,
                 "latent": args.latent, "tflop_per_step": flops / 1e12, "timings": rows}
    if "attention" in want:
        res["attention"] = attention_bench(cfg, n_img + args.context_len, dev, args)
    cm = args.compile_mode
    with torch.inference_mode():
        model = build_ours(cfg, dtype, dev, args.seed)
        ref = model(*inputs).float()  # SQNR reference: our plain BF16 module
        if "ours_ref_eager" in want:
            rows.append(measure("ours_ref_eager", lambda: model(*inputs), ref, dev, args, flops)[0])
        for name, comp in (("ours_bf16_eager", False), ("ours_bf16_compiled", True)):
            if name in want:
                fast = MMDiTEngine(model, None, compile=comp, cuda_graphs=comp, compile_mode=cm)
                rows.append(measure(name, lambda f=fast: f(*inputs), ref, dev, args, flops)[0])
                del fast
                free(dev)
        t = inputs[1] * 1000
        for name in DIFFUSERS:
            if name not in want:
                continue
            try:
                dm = build_diffusers(cfg, model)
            except ImportError as err:
                rows.append({"contender": name, "error": f"diffusers not installed: {err}"})
                continue
            limit = 0
            if name.startswith("diffusers_torchao"):
                try:
                    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
                except ImportError as err:
                    rows.append({"contender": name, "error": f"torchao not installed: {err}"})
                    del dm
                    continue
                quantize_(dm, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
                limit = args.torchao_limit_s
            if name.endswith("_regional"):
                for block in dm.transformer_blocks:
                    block.compile(mode=cm)  # in place; identical blocks share one compiled graph
                run = dm
            else:
                run = torch.compile(dm, mode=cm) if name != "diffusers_eager" else dm
            step = lambda r=run: r(hidden_states=inputs[0], encoder_hidden_states=inputs[2],  # noqa: E731
                                   pooled_projections=inputs[3], timestep=t, return_dict=False)[0]
            rows.append(measure(name, step, ref, dev, args, flops, limit)[0])
            del dm, run, step
            torch._dynamo.reset()
            free(dev)
        fp8_wanted = [n for n in want if n in ("ctx154", "throughput", "compile_cache") or n.split("+")[0] in OURS_FP8]
        if fp8_wanted:
            report = quantize_model(model, "dynamic")  # in place: bf16 linears freed, policy keeps embedders
            res["quantize"] = report.describe()
            free(dev)
        for name in [c for c in args.contenders if split_variant(c)[0] in OURS_FP8]:
            base, variant = split_variant(name)
            mode, kind = base[5:].rsplit("_", 1)
            comp = kind == "compiled"
            fast = MMDiTEngine(model, mode, compile=comp, cuda_graphs=comp, compile_mode=cm, **variant)
            row_extra = {}
            if mode == "static":
                t0 = time.perf_counter()
                fast.calibrate(*inputs)
                row_extra["calibrate_s"] = time.perf_counter() - t0
                row_extra["note"] = "static scales calibrated on the benchmark inputs (one forward)"
            rows.append(measure(name, lambda f=fast: f(*inputs), ref, dev, args, flops)[0] | row_extra)
            del fast
            free(dev)
        if "compile_cache" in want and dev.type == "cuda":
            torch._dynamo.reset()  # in-process caches gone; Inductor's on-disk FX graph cache stays
            fast = MMDiTEngine(model, "dynamic", compile=True, cuda_graphs=True, compile_mode=cm)
            t0 = time.perf_counter()
            fast(*inputs)
            res["compile_cache"] = {"first_call_s_warm_disk_cache": time.perf_counter() - t0,
                                    "note": "after torch._dynamo.reset(); compare ours_dynamic_compiled first_call_s"}
            print(f"  compile from warm disk cache: {res['compile_cache']['first_call_s_warm_disk_cache']:.1f} s")
            del fast
            free(dev)
        if "ctx154" in want:
            inp = make_inputs(cfg, args.batch, 154, args.latent, dev, dtype, args.seed + 1)
            fast = MMDiTEngine(model, "dynamic", compile=dev.type == "cuda", cuda_graphs=dev.type == "cuda",
                             compile_mode=cm)
            f154 = step_flops(cfg, args.batch, n_img, 154)
            rows.append(measure("ours_dynamic_compiled_ctx154", lambda: fast(*inp), None, dev, args, f154)[0])
            del fast
            free(dev)
        if "throughput" in want:
            fast = MMDiTEngine(model, "static", compile=dev.type == "cuda", cuda_graphs=dev.type == "cuda",
                             compile_mode=cm)
            fast.calibrate(*inputs)  # per-tensor scales: the same for every batch size
            tp = {}
            for images in args.throughput_batches:
                inp = make_inputs(cfg, 2 * images, args.context_len, args.latent, dev, dtype, args.seed + 2)
                row, _ = measure(f"throughput_{images}img", lambda: fast(*inp), None, dev, args, 0.0)
                tp[str(images)] = row
                if "error" in row:
                    continue
                row["images_per_s"] = images / (args.throughput_steps * row["median_ms"] * 1e-3)
                print(f"    {images} image(s), cfg batch {2 * images}: {row['images_per_s']:.3f} images/s "
                      f"({args.throughput_steps} steps, step only)", flush=True)
            res["throughput"] = {"steps": args.throughput_steps, "cfg": True, "mode": "static compiled",
                                 "by_images": tp}
            del fast
            free(dev)
        del model
        free(dev)
    return res


def print_table(results: dict) -> None:
    print(f"\n{'model':<7} {'contender':<30} {'ms/step':>9} {'TFLOP/s':>8} {'first s':>8} {'SQNR dB':>8} "
          f"{'peak GiB':>9}")
    for label, res in results.items():
        for r in res["timings"]:
            if "error" in r:
                print(f"{label:<7} {r['contender']:<30} {r['error']}")
                continue
            sq = f"{r['sqnr_db']:.1f}" if "sqnr_db" in r else "-"
            mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
            print(f"{label:<7} {r['contender']:<30} {r['median_ms']:9.2f} {r['tflops']:8.1f} "
                  f"{r['first_call_s']:8.1f} {sq:>8} {mem:>9}")


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "diffusers", "torchao"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="large,medium")
    ap.add_argument("--contenders", default=",".join(ALL), help=f"comma list of {ALL}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--merge", action="store_true", help="add to an existing JSON in --out")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--context-len", type=int, default=333)
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--torchao-limit-s", type=int, default=240)
    ap.add_argument("--throughput-batches", default="1,2,4")
    ap.add_argument("--throughput-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny config on CPU, eager contenders only")
    ap.add_argument("--e2e", action="store_true", help="also call benchmarks/e2e.py run_e2e(args)")
    args = ap.parse_args(argv)
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(c for c in set(args.contenders) if c not in ALL and c.split("+")[0] not in OURS_FP8)
    try:
        [split_variant(c) for c in args.contenders if "+" in c]
    except ValueError as err:
        unknown.append(str(err))
    if unknown:
        print(f"error: unknown contenders {unknown}; choose from {ALL}", file=sys.stderr)
        return 2
    args.throughput_batches = [int(b) for b in args.throughput_batches.split(",")]
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        configs = {"tiny": MMDiTConfig.tiny()}
        args.latent, args.context_len = 16, 77
        args.contenders = [c for c in args.contenders
                           if "compile" not in c and not c.startswith("diffusers_torchao")]
        args.throughput_batches = [1]
    elif dev.type != "cuda":
        print("error: full-size models need a CUDA GPU; use --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    else:
        presets = {"large": MMDiTConfig.large, "medium": MMDiTConfig.medium}
        configs = {m: presets[m]() for m in args.models.split(",")}
    cache = enable_compile_cache()
    results = {label: run_model(label, cfg, args, dev) for label, cfg in configs.items()}
    print_table(results)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"speed_{device_slug(dev)}{'_tiny' if args.tiny else ''}.json"
    report = {"benchmark": "speed", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "versions": versions(), "compile_cache_dir": str(cache),
              "command": " ".join(sys.argv), "steps": args.steps, "warmup": args.warmup,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "models": {}}
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        report["models"] = old.get("models", {})
        report["previous_runs"] = old.get("previous_runs", []) + [{k: old.get(k) for k in ("command", "date")}]
    for label, res in results.items():  # merge per contender: a rerun replaces that contender's row
        prev = report["models"].get(label)
        if prev is None:
            report["models"][label] = res
            continue
        names = {r["contender"] for r in res["timings"]}
        timings = [r for r in prev["timings"] if r["contender"] not in names] + res["timings"]
        report["models"][label] = prev | {k: v for k, v in res.items() if k != "timings"} | {"timings": timings}
    if args.e2e:
        e2e_path = Path(__file__).parent / "e2e.py"
        if not e2e_path.exists():
            report["e2e"] = {"error": "benchmarks/e2e.py not present"}
        else:
            spec = importlib.util.spec_from_file_location("sd35fp8_bench_e2e", e2e_path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            report["e2e"] = mod.run_e2e(args) if hasattr(mod, "run_e2e") else {"error": "e2e.py has no run_e2e"}
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
