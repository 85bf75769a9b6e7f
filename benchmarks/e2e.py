"""Whole-image cost of SD3.5 Large: time and peak GPU memory for offload none / model / sequential.

Builds the real-config stack with random weights directly on the GPU (meta -> to_empty -> random):
MMDiT Large (FP8 dynamic), VAE sd3 (bf16), CLIP-L, CLIP-G (bf16), T5-XXL (FP8). One image =
encode prompt + negative (77 CLIP tokens each, T5 --t5-len tokens), --steps euler steps with CFG
(batch 2) via sd35fp8.sampling, VAE decode, uint8 image. Per stage: seconds and peak
torch.cuda.max_memory_allocated. Modes run in order none -> model -> sequential in one process;
`none_fast` uses sd35fp8.fast.step.MMDiTEngine (compile + CUDA graphs) when that module exists.

    python benchmarks/e2e.py                              # GPU, writes benchmarks/results/e2e_<device>.json
    python benchmarks/e2e.py --modes none_fast --out /tmp # the compiled step alone
    python benchmarks/e2e.py --tiny                       # CPU smoke test (tiny configs)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from results_io import device_slug  # benchmarks/ is this script's folder
from torch import nn
from transformers import CLIPTextConfig, T5Config

from sd35fp8.checkpoints.fp8_load import _patch_t5_ff
from sd35fp8.fp8 import Policy, quantize_model
from sd35fp8.fp8.policy_sd35 import default_t5_policy
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_
from sd35fp8.models.vae import SD3VAE, VAEConfig, image_to_uint8, to_vae_space
from sd35fp8.offload import (
    GIB,
    ModelOffload,
    SequentialOffload,
    keep_token_embeddings_on_cpu,
    peak_memory_report,
    stream_t5_blocks,
    use_tiled_decode,
)
from sd35fp8.pipeline import StageStats
from sd35fp8.sampling import CFGDenoiser, Conditioning, FlowMatching, get_sigmas, prepare_noise, sample
from sd35fp8.text.encoders import SD3TextEncoder, build_clip, build_t5, init_meta_buffers

MODES = ("none", "model", "sequential", "none_fast")
TARGETS = {"none": {"seconds": 1.9, "peak_gib": 15.5}, "none_fast": {"seconds": 1.9, "peak_gib": 15.5},
           "model": {"peak_gib": 10.5}, "sequential": {"peak_gib": 6.0}}
SMALL_CARD = 8 * 10 ** 9  # the budget sequential offload is meant for


# ------------------------------------------------------------------------------------ configs
def clip_config(hidden: int, layers: int, act: str, inter: int) -> CLIPTextConfig:
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=inter, projection_dim=hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    cfg._attn_implementation = "sdpa"
    return cfg


def t5_config(d_model: int, layers: int, heads: int, d_ff: int, vocab: int) -> T5Config:
    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers, num_heads=heads,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                   layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                   use_cache=False, pad_token_id=0, eos_token_id=1)
    cfg._attn_implementation = "eager"
    return cfg


def stack_configs(tiny: bool) -> dict:
    if tiny:
        return {"mmdit": MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=16, context_dim=128,
                                     pooled_dim=128, qk_norm=True),
                "vae": VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1),
                "clip_l": clip_config(64, 2, "quick_gelu", 128), "clip_g": clip_config(64, 2, "gelu", 128),
                "t5": t5_config(128, 2, 2, 256, 32128)}
    return {"mmdit": MMDiTConfig.large(), "vae": VAEConfig.sd3(),
            "clip_l": clip_config(768, 12, "quick_gelu", 3072), "clip_g": clip_config(1280, 32, "gelu", 5120),
            "t5": t5_config(4096, 24, 64, 10240, 32128)}


# ------------------------------------------------------------------------------------ building
@torch.no_grad()
def fill_random_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random weights shaped like a trained net's: N(0, 1/fan_in) matrices, norms ~1, small biases."""
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        if p.ndim >= 2:
            std = 1.0 if "embed" in name or "shared" in name else 1.0 / math.sqrt(p[0].numel())
            p.copy_(noise * std)
        elif "norm" in name or name.endswith("layer_norm.weight"):
            p.copy_(1.0 + 0.05 * noise)
        else:
            p.copy_(0.02 * noise)
    return module


def build_stack(args, device: torch.device, dtype: torch.dtype) -> dict:
    """All models on `device` with random weights; MMDiT FP8 dynamic, T5 FP8 (--t5-fp8)."""
    cfgs = stack_configs(args.tiny)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        mmdit, vae = MMDiT(cfgs["mmdit"]).eval(), SD3VAE(cfgs["vae"]).eval()
    mmdit.to_empty(device=device)
    init_random_(mmdit, g)
    mmdit.to(dtype)
    q_mmdit = quantize_model(mmdit, args.mmdit_fp8)
    del vae.encoder  # txt2img decodes only; the encoder would be dead weight in the resident budget
    vae.encoder = None
    vae.to_empty(device=device)
    fill_random_(vae, g).to(dtype)
    clip_l, clip_g = build_clip(cfgs["clip_l"], with_projection=False), build_clip(cfgs["clip_g"])
    t5 = build_t5(cfgs["t5"])
    for m in (clip_l, clip_g, t5):
        init_meta_buffers(m, device)  # CLIP position_ids; to_empty would leave them uninitialised
        ids = {n: b.clone() for n, b in m.named_buffers() if n.endswith("position_ids")}
        m.to_empty(device=device)
        fill_random_(m, g).to(dtype)
        for n, b in ids.items():
            m.get_submodule(n.rpartition(".")[0]).position_ids = b
    t5.encoder.embed_tokens.weight = t5.shared.weight
    t5_policy = Policy(keep=()) if args.t5_all_fp8 else default_t5_policy(t5.config.num_layers)
    q_t5 = quantize_model(t5, args.t5_fp8, policy=t5_policy)
    _patch_t5_ff(t5)
    cpu_tables = 0
    if args.cpu_token_embeddings and device.type == "cuda":  # as the pipeline does on CUDA
        cpu_tables = sum(keep_token_embeddings_on_cpu(m) for m in (clip_l, clip_g, t5))
    encoder = SD3TextEncoder(clip_l, clip_g, t5, context_dim=cfgs["mmdit"].context_dim, out_dtype=torch.float32)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    return {"mmdit": mmdit, "vae": vae, "encoder": encoder, "t5": t5,
            "quant": {"mmdit": q_mmdit.describe(), "t5": q_t5.describe(),
                      "token_tables_on_cpu_gib": cpu_tables / GIB}}


def token_rows(seed: int, t5_len: int) -> dict:
    """One prompt's token dict with the real lengths: 77 CLIP-L, 77 CLIP-G, t5_len T5 ids."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(300, 40000, (12,), generator=g).tolist()
    clip = [49406] + words + [49407] * (77 - len(words) - 1)
    t5 = torch.randint(5, 32000, (12,), generator=g).tolist() + [1]
    return {"l": [clip], "g": [clip], "t5": t5 + [0] * (t5_len - len(t5))}


class CalibrateOnFirstCall:
    """MMDiTEngine in static mode: calibrate its scales on the first call's inputs, then run it."""

    def __init__(self, fast):
        self.fast, self.amax = fast, None

    def __call__(self, x, sigma, context, pooled, **kw):
        if self.amax is None:
            self.amax = self.fast.calibrate(x, sigma, context, pooled)
        return self.fast(x, sigma, context, pooled, **kw)


# ------------------------------------------------------------------------------------ one image
@contextmanager
def stage(stats: StageStats, name: str, device: torch.device):
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
        stats.peak_bytes[name] = torch.cuda.max_memory_allocated(device)
    stats.seconds[name] = time.perf_counter() - start


@torch.inference_mode()
def one_image(stack: dict, runner, offload: ModelOffload | None, args, device, dtype, tiled: bool,
              batch_encode: bool = False) -> StageStats:
    stats = StageStats()
    place = offload.on_device if offload is not None else (lambda m: nullcontext(m))
    with stage(stats, "encode", device):
        with place(stack["encoder"]) as enc:
            if batch_encode:  # prompt + negative in one batch, as the pipeline's compiled path does
                each = enc.encode_each([token_rows(s, args.t5_len) for s in (1, 2)])
            else:  # one call each, as the eager pipeline and ComfyUI's CLIPTextEncode nodes do
                each = [enc.encode_each([token_rows(s, args.t5_len)])[0] for s in (1, 2)]
            conds = [Conditioning(c.to(device, dtype), p.to(device, dtype)) for c, p in each]
    shape = (1, 16, args.size // 8, args.size // 8)
    ms = FlowMatching(3.0)
    sigmas = get_sigmas("sgm_uniform", args.steps, shift=3.0, sampler="euler").to(device)
    x = ms.noise_scaling(sigmas[0], prepare_noise(0, shape).to(device), torch.zeros(shape, device=device))
    with stage(stats, "sampling", device):
        with place(stack["mmdit"]):
            den = CFGDenoiser(runner, conds[0], conds[1], cfg=args.cfg, steps=args.steps, model_sampling=ms,
                              dtype=dtype)
            z = to_vae_space(ms.inverse_noise_scaling(sigmas[-1], sample("euler", den, x, sigmas, disable=True)))
    with stage(stats, "vae_decode", device):
        with place(stack["vae"]) as vae:
            img = vae.decode_tiled(z) if tiled else vae.decode(z)
            image_to_uint8(img)
    return stats


def run_mode(mode: str, stack: dict, args, device, dtype) -> dict:
    """Prepare the stack for `mode` (moves weights), time warm-up + repeats; returns the mode's record."""
    offload, runner, note = None, stack["mmdit"], ""
    if mode == "model":
        offload = ModelOffload(device)
        for name in ("mmdit", "encoder", "vae"):
            offload.register(stack[name], name)
    elif mode == "sequential":
        runner = SequentialOffload(stack["mmdit"], device, prefetch=args.prefetch)
        stream_t5_blocks(stack["t5"], device, prefetch=args.prefetch)
        offload = ModelOffload(device)
        for name in ("encoder", "vae"):
            offload.register(stack[name], name)
        stack["mmdit"] = runner
        note = runner.describe()
    elif mode == "none_fast":
        from sd35fp8.fast.step import MMDiTEngine

        runner = MMDiTEngine(stack["mmdit"], fp8_mode=args.fast_fp8 or args.mmdit_fp8, compile=True, cuda_graphs=True,
                           attention_backend=args.fast_attention, fast_accum=args.fast_accum)
        note = runner.describe()
        if runner.fp8_mode == "static":
            runner = CalibrateOnFirstCall(runner)
            note += "; static scales calibrated on the first denoising call (sigma 1) of the warm-up image"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if mode == "sequential":
        tiled = use_tiled_decode(args.size, args.size)
    elif mode.startswith("none") and args.card_gib:  # decode as the pipeline would on that card
        tiled = use_tiled_decode(args.size, args.size, budget_bytes=int(0.9 * args.card_gib * GIB),
                                 resident_bytes=resident)
        note = (note + "; " if note else "") + (f"decode as on a {args.card_gib:g} GiB card: "
                                                 f"{'tiled' if tiled else 'full'}")
    else:
        tiled = False
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        one_image(stack, runner, offload, args, device, dtype, tiled, mode == "none_fast")
    warm_s = time.perf_counter() - t0
    runs = [one_image(stack, runner, offload, args, device, dtype, tiled, mode == "none_fast")
            for _ in range(args.repeats)]
    totals = [sum(r.seconds.values()) for r in runs]
    best = runs[totals.index(statistics.median_low(totals))]
    peaks = {k: max(r.peak_bytes.get(k, 0) for r in runs) for k in best.seconds}
    rec = {"mode": mode, "seconds": statistics.median(totals), "all_seconds": totals,
           "stage_seconds": best.seconds, "stage_peak_gib": {k: v / GIB for k, v in peaks.items()},
           "peak_gib": max(peaks.values()) / GIB if device.type == "cuda" else None,
           "resident_gib": resident / GIB, "warmup_seconds": warm_s, "tiled_decode": tiled, "note": note}
    if mode == "sequential":
        rec["streamed_gib_per_image"] = runner.streamer.bytes_streamed / GIB / (args.warmup + args.repeats)
    target = TARGETS.get(mode, {})
    rec["targets"] = target
    rec["met"] = ({k: (rec["seconds"] if k == "seconds" else rec["peak_gib"]) <= v for k, v in target.items()}
                  if device.type == "cuda" else None)
    print(f"\n[{mode}] {note}\n" + peak_memory_report(StageStats(best.seconds, peaks)), flush=True)
    return rec


@torch.inference_mode()
def vae_sweep(vae: SD3VAE, device, dtype, sizes=(1024, 1536, 2048)) -> list[dict]:
    """Full vs tiled decode: seconds and activation peak above the weights, per image size."""
    out = []
    with ModelOffload(device).on_device(vae):
        base = torch.cuda.memory_allocated(device)
        for size in sizes:
            z = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=dtype)
            for kind in ("full", "tiled"):
                fn = vae.decode if kind == "full" else vae.decode_tiled
                fn(z)
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                t = time.perf_counter()
                fn(z)
                torch.cuda.synchronize(device)
                rec = {"size": size, "kind": kind, "seconds": time.perf_counter() - t,
                       "activation_gib": (torch.cuda.max_memory_allocated(device) - base) / GIB}
                rec["bytes_per_pixel"] = rec["activation_gib"] * GIB / size ** 2
                out.append(rec)
                print(f"vae decode {size}x{size} {kind:5s}: {rec['seconds']:.3f} s, "
                      f"{rec['activation_gib']:.2f} GiB above weights", flush=True)
            del z
            torch.cuda.empty_cache()
    return out


def step_tflop(cfg: MMDiTConfig, size: int, ctx_len: int, batch: int = 2) -> float:
    """Matmul FLOPs of one MMDiT forward (linears + attention), TFLOP."""
    n_img = (size // 16) ** 2
    tokens = batch * (n_img + ctx_len)
    linear = 2 * cfg.num_params(include_pos_embed=False) * tokens
    attn = 4 * batch * (n_img + ctx_len) ** 2 * cfg.hidden_size * cfg.depth
    return (linear + attn) / 1e12


# ------------------------------------------------------------------------------------ entry points


def run_e2e(args) -> dict:
    """Build the stack, run each of args.modes; returns the JSON-able result (see module docstring)."""
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("e2e.py needs a CUDA GPU (use --tiny on the CPU)")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown modes {bad}; choose from {MODES}")
    if "none_fast" in modes and importlib.util.find_spec("sd35fp8.fast.step") is None:
        print("none_fast skipped: sd35fp8/fast/step.py does not exist", flush=True)
        modes.remove("none_fast")
    if "none_fast" in modes and modes.index("none_fast") > 0 and modes[modes.index("none_fast") - 1] != "none":
        raise SystemExit("none_fast needs resident models: run it first or right after none")
    t = time.perf_counter()
    stack = build_stack(args, device, dtype)
    build_s = time.perf_counter() - t
    result = {
        "benchmark": "e2e", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
                     "transformers": __import__("transformers").__version__},
        "config": {"size": args.size, "steps": args.steps, "cfg": args.cfg, "t5_len": args.t5_len,
                   "mmdit_fp8": args.mmdit_fp8, "t5_fp8": args.t5_fp8, "prefetch": args.prefetch,
                   "warmup": args.warmup, "repeats": args.repeats, "tiny": args.tiny, "sampler": "euler",
                   "scheduler": "sgm_uniform"},
        "quantization": stack["quant"], "build_seconds": build_s,
        "mmdit_step_tflop": step_tflop(stack["mmdit"].config, args.size, 154 + args.t5_len - 77),
        "modes": {},
    }
    for mode in modes:
        result["modes"][mode] = run_mode(mode, stack, args, device, dtype)
    if args.vae_sweep and device.type == "cuda":
        result["vae_sweep"] = vae_sweep(stack["vae"], device, dtype)
    return result


def table(result: dict) -> str:
    lines = [f"{'mode':<12}{'s/image':>9}{'peak GiB':>10}{'resident':>10}  encode / sampling / decode (s | GiB)  met"]
    for m, r in result["modes"].items():
        ss, sp = r["stage_seconds"], r["stage_peak_gib"]
        per = " / ".join(f"{ss[k]:.2f}|{sp.get(k, 0):.1f}" for k in ss)
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"{m:<12}{r['seconds']:>9.3f}{peak:>10}{r['resident_gib']:>10.2f}  {per}  {r['met']}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny configs")
    ap.add_argument("--modes", default="none,model,sequential")
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024; tiny 64)")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default 20; tiny 2)")
    ap.add_argument("--cfg", type=float, default=4.5)
    ap.add_argument("--t5-len", type=int, default=77, help="T5 tokens: 77 (ComfyUI) or 256")
    ap.add_argument("--mmdit-fp8", default="dynamic", choices=("weight_only", "dynamic"))
    ap.add_argument("--fast-attention", default="auto",
                    help="none_fast: MMDiTEngine attention_backend (auto: our FP8 kernel in the FP8 matmul modes on "
                         "sm_89+, else cuDNN SDPA; cudnn; triton_fp8)")
    ap.add_argument("--fast-fp8", default=None, choices=("weight_only", "dynamic", "static"),
                    help="none_fast: MMDiTEngine's fp8 mode (default --mmdit-fp8; static calibrates on the first call)")
    ap.add_argument("--fast-accum", action=argparse.BooleanOptionalAction, default=True,
                    help="none_fast: fp8 GEMMs with fast accumulation (MMDiTEngine's default)")
    ap.add_argument("--t5-fp8", default="weight_only", choices=("weight_only", "dynamic"))
    ap.add_argument("--t5-all-fp8", action="store_true",
                    help="every T5 Linear FP8 (default: the shipped T5 policy keeps the measured least robust 16-bit)")
    ap.add_argument("--card-gib", type=float, default=0,
                    help="none modes: choose full or tiled VAE decode as the pipeline would on a card with this "
                         "much memory (90 %% usable); 0: always full")
    ap.add_argument("--cpu-token-embeddings", action=argparse.BooleanOptionalAction, default=True,
                    help="text encoders' token tables in CPU memory, as the pipeline does on CUDA")
    ap.add_argument("--prefetch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vae-sweep", action="store_true", help="also time full vs tiled VAE decode at 1-2k px")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1024)
    args.steps = args.steps or (2 if args.tiny else 20)
    if args.tiny:
        args.mmdit_fp8 = args.t5_fp8 = "weight_only"
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 1)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run_e2e(args)
    print("\n" + table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_tiny" if args.tiny else ""
    modes = "" if args.modes == "none,model,sequential" else "_" + args.modes.replace(",", "-")
    path = out / f"e2e_{device_slug(torch.device('cpu' if args.tiny else 'cuda'))}{suffix}{modes}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
