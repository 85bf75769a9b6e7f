"""Faster still (issue 23): FP8 vs BF16 attention in the Large step, and step caching's fidelity and speed.

    python benchmarks/faster.py tiny  [--n 48 --steps 20 28 --thresholds 0.1 0.2 ...]   # CPU is fine
    python benchmarks/faster.py tiny-attention [--n 200]   # shipped model, FP8 vs BF16 attention
    python benchmarks/faster.py large [--tiny-json benchmarks/results/faster_tiny_euler_cpu.json]   # CUDA
    python benchmarks/faster.py combine benchmarks/results/faster_<device>.json   # "cache" from the tiny JSON

`tiny`: the shipped tiny model (its defaults: euler_ancestral, cfg 4, 128 px), `--n` held-out items,
each step count uncached and at each cache threshold (same seeds): full-step ratio (model calls over
full MMDiT evaluations), mean PSNR of each cached image against its uncached image, detector score
(overall, points) delta against uncached. Writes benchmarks/results/faster_tiny_<device>.json.
`--rule input --reuse velocity` measures the earlier cache (TeaCache indicator, last velocity reused).

`large`: random-weight SD3.5 Large MMDiT (fp8 dynamic, benchmarks/paths.py's setup), 1024², CFG batch 2,
154 context tokens: step ms (CUDA graph replay, median) with BF16 attention (cuDNN SDPA) and with FP8
attention (fast/attention_triton.py), the FP8 step's SQNR against the BF16-attention step (same
inputs), the attention kernel alone (TFLOP/s, 4*B*H*L^2*D) against a large FP8 GEMM's rate, a
torch.profiler breakdown of one FP8 step, the VAE decode of one 1024² latent eager and compiled
(models/vae.py compile_decoder, as the serving road runs it), and a whole 20-step image (sampling +
the compiled decode; random weights; the text encoders' stage is in paths_<device>.json) without cache
and with the default threshold. Writes benchmarks/results/faster_<device>.json shaped as
issue 23 says: {"device", "date", "step_ms": {"bf16_attention", "fp8_attention"}, "step_sqnr_db",
"image_s": {"no_cache", "cache"}, "cache": {"full_step_ratio", "psnr_db", "score_delta_points"}}
(+ details); "cache" is copied from the tiny JSON at the default threshold.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from results_io import device_slug, versions  # benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ---------------------------------------------------------------- tiny: cache fidelity
def render(pipe, items, steps: int, threshold: float, sampler: str, seed: int, batch: int):
    """The items' images (uint8 [H, W, 3] each; batch b sampled with seed + b), the cache's call counts
    {"calls", "full"} summed over the batches, and seconds per image."""
    imgs, stats = [], {"calls": 0, "full": 0}
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, len(items), batch)):
        chunk = items[start:start + batch]
        out = pipe([it.caption for it in chunk], num_inference_steps=steps, seed=seed + b, progress=False,
                   cache_threshold=threshold, sampler=sampler)
        imgs += [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in out.images]
        for k in stats:
            stats[k] += pipe.stats.cache.get(k, 0)
    return imgs, stats, (time.perf_counter() - t0) / len(items)


def tiny(args) -> dict:
    from sd35fp8.pipeline import SD35Pipeline, shipped_model_path
    from sd35fp8 import step_cache
    from sd35fp8.step_cache import DEFAULT_CACHE_THRESHOLD
    from sd35fp8.tiny import detector, world
    from sd35fp8.tiny.evaluate import psnr

    step_cache.RULE = args.rule or step_cache.RULE  # read by every StepCache the pipeline builds
    step_cache.REUSE = args.reuse or step_cache.REUSE
    step_cache.WARMUP = step_cache.WARMUP if args.warmup is None else args.warmup
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = SD35Pipeline.from_pretrained(shipped_model_path(), device=dev)
    items = world.eval_items(args.n, seed=args.seed)
    d = pipe.defaults
    sampler = args.sampler or d.sampler

    def run(steps: int, threshold: float):
        return render(pipe, items, steps, threshold, sampler, seed=args.seed, batch=args.batch)

    rows = []
    for steps in args.steps:
        base, _, base_s = run(steps, 0.0)
        base_score = detector.aggregate(detector.score_many(base, items, workers=args.workers))["overall"]
        for th in args.thresholds:
            imgs, st, sec = run(steps, th)
            score = detector.aggregate(detector.score_many(imgs, items, workers=args.workers))["overall"]
            ps = [psnr(a, b) for a, b in zip(imgs, base)]
            ps = [min(p, 100.0) for p in ps]  # identical images: inf -> 100 dB (the mean stays finite)
            row = {"steps": steps, "threshold": th, "full_step_ratio": st["calls"] / max(1, st["full"]),
                   "psnr_db": float(np.mean(ps)), "psnr_min_db": float(np.min(ps)),
                   "score": 100 * score, "score_uncached": 100 * base_score,
                   "score_delta_points": 100 * (score - base_score), "s_per_image": sec,
                   "s_per_image_uncached": base_s}
            rows.append(row)
            print(f"steps {steps:3d} th {th:5.2f}: x{row['full_step_ratio']:.2f} fewer full steps, "
                  f"PSNR {row['psnr_db']:.1f} dB (min {row['psnr_min_db']:.1f}), score {row['score']:.1f} "
                  f"vs {row['score_uncached']:.1f} ({row['score_delta_points']:+.1f})", flush=True)
    result = {"device": device_slug(dev), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "versions": versions(), "model": "shipped tiny model", "n": args.n, "seed": args.seed,
              "sampler": sampler, "scheduler": d.scheduler, "cfg": d.cfg, "size": d.width,
              "default_threshold": DEFAULT_CACHE_THRESHOLD, "cache_rule": step_cache.RULE,
              "cache_reuse": step_cache.REUSE, "cache_warmup": step_cache.WARMUP,
              "cache_runs": step_cache.RUNS, "rows": rows}
    out = Path(args.out) if args.out else RESULTS / f"faster_tiny_{device_slug(dev)}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def tiny_attention(args) -> dict:
    """The shipped model with FP8 vs BF16 attention (same seeds): detector score delta and PSNR."""
    from sd35fp8.pipeline import SD35Pipeline, shipped_model_path
    from sd35fp8.tiny import detector, world
    from sd35fp8.tiny.evaluate import psnr

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    items = world.eval_items(args.n, seed=args.seed)
    out: dict = {"device": device_slug(dev), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "versions": versions(), "model": "shipped tiny model", "n": args.n, "steps": args.steps[0]}
    imgs = {}
    for att in args.attentions.split(","):
        pipe = SD35Pipeline.from_pretrained(shipped_model_path(), device=dev, attention=att)
        if att == "fp8" and args.keep_16bit is not None:  # instead of the shipped attention policy's blocks
            pipe.mmdit.attention_16bit_blocks = frozenset(int(b) for b in args.keep_16bit.split(",") if b)
        out[f"engine_{att}"] = pipe.mmdit.describe()
        imgs[att] = []
        for b, start in enumerate(range(0, len(items), args.batch)):
            chunk = items[start:start + args.batch]
            res = pipe([it.caption for it in chunk], num_inference_steps=args.steps[0], seed=args.seed + b,
                       progress=False)
            imgs[att] += [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in res.images]
        out[f"score_{att}"] = 100 * detector.aggregate(detector.score_many(imgs[att], items, workers=4))["overall"]
    if "bf16" not in imgs:  # the 16-bit run's score from an earlier JSON (same n, seed, steps: same items)
        out["score_bf16"] = json.loads(Path(args.bf16_json).read_text())["score_bf16"]
        out["score_bf16_from"] = args.bf16_json
    out["score_delta_points"] = out["score_fp8"] - out["score_bf16"]
    if "bf16" in imgs:
        ps = [min(psnr(a, b), 100.0) for a, b in zip(imgs["fp8"], imgs["bf16"])]
        out["psnr_db"], out["psnr_min_db"] = float(np.mean(ps)), float(np.min(ps))
    print(f"tiny attention fp8 vs bf16: score {out['score_fp8']:.1f} vs {out['score_bf16']:.1f} "
          f"({out['score_delta_points']:+.1f}), PSNR {out.get('psnr_db', float('nan')):.1f} dB "
          f"(min {out.get('psnr_min_db', float('nan')):.1f})", flush=True)
    path = Path(args.out) if args.out else RESULTS / f"faster_tiny_attention_{device_slug(dev)}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


# ---------------------------------------------------------------- large: GPU step, attention, image
def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def profile_step(eng, inputs) -> dict:
    """One eager fused step under torch.profiler -> {"groups": ms by kernel kind, "top_kernels"}."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng._forward(*inputs, ())
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    ms = lambda e: (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)) / 1000  # noqa: E731
    for e in prof.key_averages():
        g = PROFILE_GROUPS[_kind(e.key)]
        groups[g] = groups.get(g, 0.0) + ms(e)
    top = sorted(((e.key[:90], ms(e)) for e in prof.key_averages()), key=lambda r: -r[1])[:15]
    return {"groups": groups, "top_kernels": top, "by_launch_grid": _by_grid(prof)}


def _trace_events(prof) -> list:
    """A finished torch.profiler run's chrome-trace events."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as fh:
            return json.load(fh).get("traceEvents", [])


def _by_grid(prof, most: int = 40) -> list | str:
    """The profile's kernels grouped by (name, grid) from its trace: [name, grid, calls, total ms, mean us]. A row
    pass's grid is its row count, so the image stream's (8192 rows) and the context's (308) come apart."""
    try:
        events = _trace_events(prof)
        rows: dict = {}
        for ev in events:
            if ev.get("cat") != "kernel":
                continue
            key = (ev.get("name", "")[:70], str(ev.get("args", {}).get("grid")))
            n, t = rows.get(key, (0, 0.0))
            rows[key] = (n + 1, t + float(ev.get("dur", 0.0)))
        out = [[name, grid, n, t / 1000, t / n] for (name, grid), (n, t) in rows.items()]
        return sorted(out, key=lambda r: -r[3])[:most]
    except Exception as err:  # noqa: BLE001  (a trace format change must not end the benchmark)
        return f"{type(err).__name__}: {err}"


def _kind(name: str) -> str:
    """A kernel's family: attention (before the GEMMs: FA3's kernel names say sm90 and cutlass), gemm, quantise,
    row (our Triton row passes) or torch."""
    n = name.lower()
    return ("attention" if ("attn" in n or "flash" in n) else
            "gemm" if any(w in n for w in ("nvjet", "gemm", "scaled_mm", "sm90", "cutlass")) else
            "quantise" if ("quant" in n or "amax" in n) else "row" if n.startswith("_") else "torch")


# profile_step's groups (the JSON's profile_*_step_ms keys) by kernel family
PROFILE_GROUPS = {"attention": "attention", "gemm": "fp8_gemm", "quantise": "quantize_qkv",
                  "row": "elementwise/other", "torch": "elementwise/other"}


def graph_gaps(eng, inputs) -> dict:
    """One replay of the engine's captured step under torch.profiler -> its span, kernel time, the idle time
    between consecutive kernels (summed by (kind before, kind after)) and the count of kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng(*inputs)
        torch.cuda.synchronize()
    events = _trace_events(prof)
    ks = sorted(((float(e["ts"]), float(e.get("dur", 0.0)), e.get("name", "")) for e in events
                 if e.get("cat") == "kernel"), key=lambda r: r[0])
    pairs: dict = {}
    gap = 0.0
    for (t0, d0, n0), (t1, _, n1) in zip(ks, ks[1:]):
        g = max(0.0, t1 - (t0 + d0))
        gap += g
        key = f"{_kind(n0)}->{_kind(n1)}"
        c, tot = pairs.get(key, (0, 0.0))
        pairs[key] = (c + 1, tot + g)
    by_pair = sorted(([k, c, round(tot / 1000, 3), round(tot / c, 2)] for k, (c, tot) in pairs.items()),
                     key=lambda r: -r[2])
    span = (ks[-1][0] + ks[-1][1] - ks[0][0]) if ks else 0.0
    by_kind: dict = {}
    for _, d, n in ks:
        by_kind[_kind(n)] = round(by_kind.get(_kind(n), 0.0) + d / 1000, 3)
    longest = [[n[:80], round(d, 1)] for _, d, n in sorted(ks, key=lambda r: -r[1])[:8]]
    return {"span_ms": span / 1000, "kernel_ms": sum(r[1] for r in ks) / 1000, "gap_ms": gap / 1000,
            "kernels": len(ks), "by_pair": by_pair, "kernel_ms_by_kind": by_kind, "longest_us": longest,
            "note": "by_pair: [before->after, count, gap ms, mean gap us]"}


def adaln_gemv_bench(eng, reps: int) -> dict:
    """The fused adaLN matmul of one step alone (Large: [2, 2432] x [1 099 264, 2432] e4m3): cuBLAS's
    _scaled_mm (the road before the memo), the gemv kernel at a few tiles, and the memo's hit (lookup, a
    skipped gemv, the rows' copy). ms medians; GB/s of the weight read."""
    from sd35fp8.fast import kernels
    from sd35fp8.fast.ada_memo import SUGGESTED_SLOTS, AdaMemo, adaln_gemv
    from sd35fp8.fp8.scaling import sqnr

    ada, dev = eng.ada, eng.device
    w = ada["w"]
    a = torch.nn.functional.silu(torch.randn(2, w.shape[1], device=dev, dtype=torch.bfloat16))
    a8, s8 = kernels.plain_act(a, "dynamic")
    gb = w.numel() * w.element_size() / 1e9
    out: dict = {"weight_gb": gb}

    def put(name, fn):
        fn()
        ms = _median_ms(fn, reps)
        out[name] = {"ms": ms, "gb_s": gb / ms * 1e3}

    put("cublas_scaled_mm", lambda: torch._scaled_mm(a8, w.t(), scale_a=s8, scale_b=ada["ws"], bias=ada.get("b"),
                                                     out_dtype=torch.bfloat16, use_fast_accum=True))
    ref = torch._scaled_mm(a8, w.t(), scale_a=s8, scale_b=ada["ws"], bias=ada.get("b"), out_dtype=torch.bfloat16,
                           use_fast_accum=True).float()
    for bn, bk, nw in ((64, 128, 4), (128, 128, 4), (32, 256, 4), (64, 256, 8), (128, 64, 4), (256, 128, 8)):
        launch = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw}
        y = torch.empty(2, w.shape[0], device=dev, dtype=torch.bfloat16)
        fn = lambda: kernels.gemv(a8, s8.reshape(-1), w, ada["ws"], ada.get("b"), y, launch=launch)  # noqa: E731
        try:
            put(f"gemv_{bn}x{bk}_w{nw}", fn)
            out[f"gemv_{bn}x{bk}_w{nw}"]["sqnr_vs_cublas_db"] = float(sqnr(ref, y.float()))
        except Exception as err:  # noqa: BLE001
            out[f"gemv_{bn}x{bk}_w{nw}"] = f"{type(err).__name__}: {str(err)[:200]}"
    memo = AdaMemo(SUGGESTED_SLOTS, w.shape[1], w.shape[0], torch.bfloat16, torch.bfloat16, dev)
    adaln_gemv(a, ada, "dynamic", torch.bfloat16, memo)  # fills the rows: every later call hits
    put("memo_hit", lambda: adaln_gemv(a, ada, "dynamic", torch.bfloat16, memo))
    out["memo_stats"] = memo.stats()
    return out


def large_step_inputs(device: torch.device):
    """The Large step's inputs the benchmarks time: x [2, 16, 128, 128], sigma [2], context [2, 154, C], pooled
    [2, P], bf16 on `device`, seed 0 (1024², CFG batch 2, 154 context tokens)."""
    from sd35fp8.models.mmdit import MMDiTConfig

    cfg = MMDiTConfig.large()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 128, 128, generator=g).to(device, torch.bfloat16)
    sigma = torch.full((2,), 0.5, device=device)
    ctx = torch.randn(2, 154, cfg.context_dim, generator=g).to(device, torch.bfloat16)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g).to(device, torch.bfloat16)
    return x, sigma, ctx, pooled


def random_large_mmdit(device: torch.device, reference_inputs: tuple | None = None):
    """Random SD3.5 Large MMDiT, quantised fp8 dynamic with the default policy (benchmarks/paths.py's
    build_file, without writing the file) -> (model, float32 forward of the unquantised weights on
    reference_inputs or None)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from e2e import stack_configs  # noqa: E402  (random nets shaped like trained ones)

    from sd35fp8.fp8 import quantize_model
    from sd35fp8.fp8.policy_sd35 import default_policy
    from sd35fp8.models.mmdit import MMDiT, init_random_

    with torch.device("meta"):
        mmdit = MMDiT(stack_configs(False)["mmdit"]).eval()
    mmdit.to_empty(device=device)
    init_random_(mmdit, torch.Generator(device=device).manual_seed(0))
    ref = None
    if reference_inputs is not None:
        with torch.no_grad():
            ref = mmdit(*(t.float() for t in reference_inputs)).float()
    mmdit.to(torch.bfloat16)
    quantize_model(mmdit, "dynamic", policy=default_policy())
    return mmdit, ref


def large(args) -> dict:
    from sd35fp8.fast import build_engine
    from sd35fp8.fast.attention import attention_flops
    from sd35fp8.fast.attention_triton import attention_fp8, quantize_qkv, triton_attention
    from sd35fp8.fp8.scaling import sqnr
    from sd35fp8.generation import SampleSettings, sample
    from sd35fp8.sampling import Conditioning
    from sd35fp8.step_cache import DEFAULT_CACHE_THRESHOLD

    dev = torch.device("cuda")
    x, sigma, ctx, pooled = large_step_inputs(dev)
    mmdit, ref32 = random_large_mmdit(dev, (x, sigma, ctx, pooled))
    torch.cuda.empty_cache()
    res: dict = {"device": device_slug(dev), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "versions": versions(), "config": {"model": "Large", "weights": "random fp8 dynamic", "size": 1024,
                                                    "cfg_batch": 2, "context_tokens": 154}}
    from sd35fp8.fast import step as step_mod

    eng = build_engine(mmdit, dev, attention_backend="triton_fp8")

    def timed_step():
        """(the step's output captured afresh as a CUDA graph, float32; its median ms)"""
        eng.graphs.clear()
        out = eng(x, sigma, ctx, pooled).float().clone()  # capture
        eng(x, sigma, ctx, pooled)
        return out, _median_ms(lambda: eng(x, sigma, ctx, pooled), args.reps)

    def attend_with(backend):
        eng.attention_backend, eng._attn = backend, (backend if backend in step_mod.FP8_JOINT_KINDS else "sdpa")

    step_ms, outs = {}, {}
    # fp8_attention_bf16_out: the FP8 attention writing bf16 outputs that a per-token pass quantises for the proj
    # GEMMs (fast/step.py ATTN_OUT_ROWS False), against the default e4m3 outputs scaled per batch row
    for name, backend, rows in (("bf16_attention", "cudnn", True), ("fp8_attention_bf16_out", "triton_fp8", False),
                                ("fp8_attention", "triton_fp8", True)):
        step_mod.ATTN_OUT_ROWS = rows
        attend_with(backend)
        try:
            outs[name], step_ms[name] = timed_step()
        except Exception as err:  # noqa: BLE001  # the e4m3-output road failed: the JSON says so, the old road stands in
            if name != "fp8_attention":
                raise
            res["fp8_attention_rows_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(f"step fp8_attention (e4m3 outputs): {res['fp8_attention_rows_error']}", flush=True)
            step_mod.ATTN_OUT_ROWS = False
            eng.graphs.clear()
            outs[name], step_ms[name] = outs["fp8_attention_bf16_out"], step_ms["fp8_attention_bf16_out"]
        print(f"step {name}: {step_ms[name]:.2f} ms", flush=True)
    variants = res["step_ms_variants"] = {
        "fp8_attention_bf16_out": step_ms.pop("fp8_attention_bf16_out"),
        "fp8_attention_bf16_out_sqnr_db": float(sqnr(ref32, outs["fp8_attention_bf16_out"]))}

    def opt_in(name, on, off):
        """The step with an opt-in road (on() ... off()) -> variants[name], its SQNR, or the error it raised."""
        try:
            on()
            out, ms = timed_step()
            variants.update({name: ms, f"{name}_sqnr_db": float(sqnr(ref32, out))})
            print(f"step {name}: {ms:.2f} ms, SQNR {variants[f'{name}_sqnr_db']:.2f} dB", flush=True)
        except Exception as err:  # noqa: BLE001
            variants[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            print(f"step {name}: {variants[f'{name}_error']}", flush=True)
        finally:
            off()
            eng.graphs.clear()

    from sd35fp8.fast import attention_fa3

    if attention_fa3.available(dev):  # FlashAttention-3's FP8 forward in the step (opt-in kind fa3_fp8)
        opt_in("fp8_attention_fa3", lambda: attend_with("fa3_fp8"), lambda: attend_with("triton_fp8"))
    else:
        variants["fp8_attention_fa3_error"] = f"not available here ({attention_fa3.INSTALL}, sm_90)"
    # the default step again: the spread between two timings of one road in one process
    opt_in("fp8_attention_again", lambda: None, lambda: None)
    # the opt-in adaLN memo (fast/ada_memo.py) and padded proj / fc2 rows (fast/weights.py pad_output_rows), and
    # the adaLN matmul alone (benchmarks/ada_pad_step.py has them side by side without the rest)
    import os

    from sd35fp8.fast import ada_memo
    from sd35fp8.fast import weights as fast_weights

    def opt(memo: bool, pad: bool):
        os.environ[ada_memo.MEMO_ENV] = str(ada_memo.SUGGESTED_SLOTS) if memo else "0"
        os.environ[fast_weights.PAD_ENV] = "1" if pad else "0"
        eng.refresh_weights()

    opt_in("fp8_attention_ada_memo", lambda: opt(True, False), lambda: opt(False, False))
    opt_in("fp8_attention_pad_n", lambda: opt(False, True), lambda: opt(False, False))
    res["adaln_gemv"] = adaln_gemv_bench(eng, args.reps)
    print(f"adaln gemv: {res['adaln_gemv']}", flush=True)
    # where the graphed step's time goes between kernels (a CUDA-graph replay under the profiler)
    res["graph_gaps"] = {}
    for name, on, off in () if args.quick else (("fp8_attention", lambda: None, lambda: None),
                          ("fa3", lambda: attend_with("fa3_fp8"), lambda: attend_with("triton_fp8"))):
        if name == "fa3" and "fp8_attention_fa3" not in variants:
            continue
        try:
            on()
            eng.graphs.clear()
            eng(x, sigma, ctx, pooled)
            res["graph_gaps"][name] = graph_gaps(eng, (x, sigma, ctx, pooled))
            gg = res["graph_gaps"][name]
            print(f"graph gaps {name}: span {gg['span_ms']:.2f} ms, kernels {gg['kernel_ms']:.2f}, gaps {gg['gap_ms']:.2f} "
                  f"over {gg['kernels']} kernels; top {gg['by_pair'][:4]}", flush=True)
        except Exception as err:  # noqa: BLE001
            res["graph_gaps"][name] = f"{type(err).__name__}: {str(err)[:300]}"
            print(f"graph gaps {name}: {res['graph_gaps'][name]}", flush=True)
        finally:
            off()
            eng.graphs.clear()
    res["step_ms"] = step_ms
    res["step_sqnr_db"] = float(sqnr(ref32, outs["fp8_attention"]))  # vs float32 forward, unquantised weights
    res["step_sqnr_detail_db"] = {"fp8_attention_vs_float32": res["step_sqnr_db"],
                                  "bf16_attention_vs_float32": float(sqnr(ref32, outs["bf16_attention"])),
                                  "fp8_vs_bf16_attention": float(sqnr(outs["bf16_attention"], outs["fp8_attention"]))}
    print(f"step SQNR: {res['step_sqnr_detail_db']}", flush=True)

    if not args.quick:  # --quick: the step timings and the image only
        # attention kernel alone vs an FP8 GEMM, Large shapes
        H, D, L, B = 38, 64, 4096 + 154, 2
        q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
        flops = attention_flops(B, H, L, L, D)
        att = {}
        for name, fp8 in (("triton_bf16", False), ("triton_fp8", True)):
            triton_attention(q, k, v, fp8=fp8)
            ms = _median_ms(lambda: triton_attention(q, k, v, fp8=fp8), 50)
            att[name] = {"ms": ms, "tflops": flops / ms / 1e9}
        qkv8 = quantize_qkv(q, k, v)
        attention_fp8(qkv8)
        ms = _median_ms(lambda: attention_fp8(qkv8), 50)
        att["triton_fp8_kernel_only"] = {"ms": ms, "tflops": flops / ms / 1e9, "note": "without the quantise pass"}
        ms = _median_ms(lambda: quantize_qkv(q, k, v), 50)
        att["fp8_quantize_pass"] = {"ms": ms}
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ms = _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt), 50)
        att["sdpa_cudnn_bf16"] = {"ms": ms, "tflops": flops / ms / 1e9}
        M = N = K = 8192
        a8 = torch.randn(M, K, device=dev).to(torch.float8_e4m3fn)
        b8 = torch.randn(N, K, device=dev).to(torch.float8_e4m3fn)
        one = torch.ones((), device=dev)
        gemm = lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,  # noqa: E731
                                        use_fast_accum=True)
        gemm()
        gms = _median_ms(gemm, 30)
        att["fp8_gemm_8192"] = {"ms": gms, "tflops": 2 * M * N * K / gms / 1e9}
        att["fp8_attention_vs_gemm"] = att["triton_fp8_kernel_only"]["tflops"] / att["fp8_gemm_8192"]["tflops"]
        res["attention_kernel"] = att
        for kname, r in att.items():
            print(f"{kname}: {r}", flush=True)

        # where the FP8 step's time goes (eager fused step, kernels grouped by name); FA3's step too where it runs
        for key, backend in (("profile_fp8_step_ms", "triton_fp8"), ("profile_fa3_step_ms", "fa3_fp8")):
            if backend == "triton_fp8" or "fp8_attention_fa3" in variants:
                attend_with(backend)
                res[key] = profile_step(eng, (x, sigma, ctx, pooled))
                print(f"{key}:", {k: round(v, 2) for k, v in res[key]["groups"].items()}, flush=True)
        attend_with("triton_fp8")

    # whole 20-step image (sampling, CFG batch 2, + VAE decode) without / with the cache
    from e2e import fill_random_  # noqa: E402  (benchmarks/ is on sys.path: random_large_mmdit)

    from sd35fp8.generation import decode
    from sd35fp8.models.vae import SD3VAE, VAEConfig

    with torch.device("meta"):
        vae = SD3VAE(VAEConfig.sd3()).eval()
    vae.to_empty(device=dev)
    fill_random_(vae, torch.Generator(device=dev).manual_seed(1)).to(torch.bfloat16)
    # the VAE decode eager, then compiled as the serving road runs it (models/vae.py compile_decoder: server,
    # `run`, generate --compile); the image timings below decode with the compiled decoder
    z1 = torch.randn(1, 16, 128, 128, device=dev, generator=torch.Generator(device=dev).manual_seed(3)).bfloat16()
    vae_ms = {}
    for name in ("compiled",) if args.quick else ("eager", "compiled"):
        if name == "compiled":
            vae.compile_decoder()
        with torch.inference_mode():
            t0 = time.perf_counter()
            decode(vae, z1)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            vae_ms[name] = {"ms": _median_ms(lambda: decode(vae, z1), 5), "first_call_s": first}
    res["vae_decode_ms"] = vae_ms
    print(f"vae decode: {vae_ms}", flush=True)
    cond = Conditioning(ctx[:1].clone(), pooled[:1].clone())
    uncond = Conditioning(ctx[1:].clone(), pooled[1:].clone())
    latent = torch.zeros(1, 16, 128, 128, device=dev)
    th = args.threshold if args.threshold is not None else DEFAULT_CACHE_THRESHOLD
    from sd35fp8.fast.weights import auto_attention

    attend_with(auto_attention(dev, "dynamic"))  # the image on the default road: FA3 where it is installed
    eng.graphs.clear()
    res["image_attention"] = eng.attention_backend
    image_s, sampling_s, cache_large = {}, {}, {}
    for name, t in (("no_cache", 0.0), ("cache", th)):
        st = SampleSettings(steps=20, cfg=4.5, sampler="euler", scheduler="normal", shift=3.0, cache_threshold=t)
        with torch.inference_mode():
            decode(vae, sample(eng, cond, uncond, latent, st, seed=1, dtype=torch.bfloat16).to(torch.bfloat16))
            torch.cuda.synchronize()
            stats: dict = {}
            if eng.ada_memo is not None:  # (opt-in memo) the warm-up run's rows: forgotten, as for a new prompt
                eng.ada_memo.clear()
            t0 = time.perf_counter()
            z = sample(eng, cond, uncond, latent, st, seed=1, dtype=torch.bfloat16, cache_stats=stats)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            decode(vae, z.to(torch.bfloat16))
            torch.cuda.synchronize()
        image_s[name] = time.perf_counter() - t0
        sampling_s[name] = t1 - t0
        cache_large[name] = {"stats": stats, "latent": z}
    res["sampling_s"] = sampling_s
    res["image_s_note"] = ("image_s = 20 sampling steps (CFG batch 2) + VAE decode (compiled, as on the serving "
                           "road: vae_decode_ms), random weights; text encoding is not included (paths_<device>.json "
                           "has the pipeline's encode stage)")
    res["image_s"] = image_s
    st = cache_large["cache"]["stats"]
    res["large_cache"] = {"threshold": th, "stats": st,
                          "full_step_ratio": st.get("calls", 0) / max(1, st.get("full", 1)),
                          "latent_sqnr_db_vs_uncached": float(sqnr(cache_large["no_cache"]["latent"],
                                                                   cache_large["cache"]["latent"])),
                          "note": "random weights: the velocity field is not a trained one, skips are not "
                                  "representative of a real model"}
    print(f"image (20 steps + decode, {res['image_attention']}) s: {image_s}; "
          f"sampling s: {sampling_s}; "
          f"cache {res['large_cache']}", flush=True)

    if args.tiny_json and Path(args.tiny_json).exists():
        add_tiny_cache(res, Path(args.tiny_json))
    out = Path(args.out) if args.out else RESULTS / f"faster_{res['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")
    return res


def add_tiny_cache(res: dict, tiny_json: Path) -> dict:
    """res["cache"] <- the tiny table's rows at step_cache.DEFAULT_CACHE_THRESHOLD (mean over the step counts)."""
    from sd35fp8.step_cache import DEFAULT_CACHE_THRESHOLD

    tj = json.loads(tiny_json.read_text())
    tj["default_threshold"] = DEFAULT_CACHE_THRESHOLD
    pick = [r for r in tj["rows"] if abs(r["threshold"] - DEFAULT_CACHE_THRESHOLD) < 1e-9]
    if not pick:
        raise SystemExit(f"{tiny_json}: no rows at the default threshold {DEFAULT_CACHE_THRESHOLD}")
    res["cache"] = {k: float(np.mean([r[k] for r in pick])) for k in ("full_step_ratio", "psnr_db", "score_delta_points")}
    res["cache"]["per_steps"] = {r["steps"]: {k: r[k] for k in ("full_step_ratio", "psnr_db", "score_delta_points")}
                                 for r in pick}
    res["cache"]["from"] = (f"{tiny_json.name}: shipped tiny model ({tj['sampler']}, n {tj['n']}), threshold "
                            f"{tj['default_threshold']}, steps {[r['steps'] for r in pick]} (mean)")
    return res


def combine(args) -> None:
    """Fill a GPU JSON's "cache" from the tiny table (when the tiny run came after the GPU run)."""
    path = Path(args.json)
    res = add_tiny_cache(json.loads(path.read_text()), Path(args.tiny_json))
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}: cache {res['cache']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("tiny")
    t.add_argument("--n", type=int, default=48)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, nargs="+", default=[20, 28])
    t.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    t.add_argument("--device", default=None)
    t.add_argument("--sampler", default=None, help="default: the model's (euler_ancestral)")
    t.add_argument("--workers", type=int, default=1, help="detector scoring processes")
    t.add_argument("--rule", default=None, choices=("error", "input"),
                   help="step_cache rule (default: step_cache.RULE); 'input' + --reuse velocity: the earlier cache")
    t.add_argument("--reuse", default=None, choices=("linear", "velocity", "x0", "x0_linear"),
                   help="what a skipped call returns (default: step_cache.REUSE)")
    t.add_argument("--warmup", type=float, default=None,
                   help="fraction of the first evaluations always computed (default: step_cache.WARMUP)")
    t.add_argument("--out", default=None)
    ta = sub.add_parser("tiny-attention")
    ta.add_argument("--n", type=int, default=200)
    ta.add_argument("--batch", type=int, default=25)
    ta.add_argument("--seed", type=int, default=0)
    ta.add_argument("--steps", type=int, nargs=1, default=[28])
    ta.add_argument("--device", default=None)
    ta.add_argument("--attentions", default="bf16,fp8", help="bf16,fp8 or fp8 alone (with --bf16-json)")
    ta.add_argument("--bf16-json", default=None, help="an earlier tiny-attention JSON: its bf16 score")
    ta.add_argument("--keep-16bit", default=None,
                    help="blocks kept at 16-bit attention under fp8 (comma list; '' none); default: the shipped policy")
    ta.add_argument("--out", default=None)
    g = sub.add_parser("large")
    g.add_argument("--reps", type=int, default=30)
    g.add_argument("--quick", action="store_true",
                   help="the step timings and the whole image only (no profiles, graph gaps, kernel-alone timings, "
                        "eager VAE decode)")
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--tiny-json", default=str(RESULTS / "faster_tiny_euler_cpu.json"))
    g.add_argument("--out", default=None)
    c = sub.add_parser("combine")
    c.add_argument("json")
    c.add_argument("--tiny-json", default=str(RESULTS / "faster_tiny_euler_cpu.json"))
    args = ap.parse_args()
    {"tiny": tiny, "tiny-attention": tiny_attention, "large": large, "combine": combine}[args.what](args)


if __name__ == "__main__":
    main()
