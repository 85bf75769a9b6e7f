"""Train the shipped tiny SD3.5-layout model on the procedural world, export it, evaluate it.

    python -m sd35fp8.tiny.train --out DIR --seed 0     # the shipped recipe, ~12.5 min on an H100
    python -m sd35fp8.tiny.train --out V --seed 0 --vae-only      # the same in two calls of < 10 min
    python -m sd35fp8.tiny.train --out DIR --seed 0 --vae-from V/sd35fp8_tiny.safetensors \
        --spiece-from V/spiece.model     # (run 13, shipped; --deadline T: a hard wall-clock end)
    python -m sd35fp8.tiny.train --out DIR --vae-from OLD.safetensors --spiece-from OLD/spiece.model \
        --init-from OLD.safetensors --minutes-mmdit 7.5           # reuse VAE + vocabulary, continue MMDiT
    python -m sd35fp8.tiny.train --out DIR --smoke          # CPU, tiny sizes, < 60 s

Phases: (1) SentencePiece T5 vocabulary on the caption corpus; (2) render + tokenize the dataset in
worker processes (before any CUDA work: workers are forked); (3) VAE: L1 + L2 reconstruction of
latents perturbed by 10 % relative noise and EQ-VAE's scale term (--vae-eq), then an exact affine
fold of the measured per-channel latent mean/std into encoder.conv_out so
`to_model_space(encode(x))` is ~N(0, 1) under SD3's fixed constants, then a decoder-only fine-tune
on the folded latents (the fold is exact on the encoder, not on decoder.conv_in at the zero-padded
border); (4) MMDiT + the three text towers jointly, SD3 rectified flow (x_t = (1-s) x0 + s eps,
target eps - x0, s = shift(t) with t = sigmoid(N(0,1)), a fraction --sigma-uniform of t uniform in
[0, 1], shift --train-shift), 10 % empty prompts, AdamW, bf16 autocast, EMA of every trained weight
(shipped); (5) export + load back with the project's loaders; (6) held-out evaluation with the
detector over a CFG grid, defaults = best.

Reuse: --spiece-from skips (1), --vae-from skips (3) (the file's VAE is already folded; the dataset
latents are still encoded with it), --init-from starts (4) from a file's MMDiT and text towers. The
model sizes then come from those files (`TinySpec.from_checkpoint`); their sha256 go to the log.
--deadline (a time.time() value) is a hard guard: MMDiT training plans its steps to end by it and
stops at the first 50-step mark past it.

Step counts: --steps-* fix them; otherwise they come from --minutes-* and the speed of the first
steps (recorded in train_log.json: rerun with those --steps-* to repeat a run exactly).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.vae import image_to_uint8, to_model_space
from . import detector, world
from .data import Dataset, make_tokenizer, render_dataset, train_spiece
from .export import CHECKPOINT_NAME, export_checkpoint, load_back, load_component_
from .spec import TextTowers, TinySpec, build_mmdit, build_vae, param_count

LATENT_NOISE = 0.1  # decoder robustness: latent noise, relative to the batch latent std
CFG_GRID = (4.0, 6.0, 8.0)


class Clock:
    def __init__(self):
        self.t0 = time.time()
        self.marks: dict[str, float] = {}

    def now(self) -> float:
        return time.time() - self.t0

    def mark(self, name: str, since: float) -> float:
        self.marks[name] = round(time.time() - since, 2)
        return time.time()


def log(msg: str, clock: Clock) -> None:
    print(f"[{clock.now():7.1f}s] {msg}", flush=True)


STEP_GRAPH_WARMUP = 3  # eager steps (compile, allocator warm-up) before --step-graph captures the step


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_steps(step_fn, steps: int | None, minutes: float, probe: int, device: torch.device, clock: Clock,
              name: str, history: list, deadline: float | None = None, time_from: int = 10) -> tuple[int, int]:
    """Call step_fn(step, total) -> loss; returns (steps run, steps planned).

    When steps is None, total is fixed at step `probe` from the speed of steps time_from..probe (the
    first steps pay for CUDA/cuBLAS warm-up) and the time left: the minutes, or less when `deadline`
    (a time.time() value) comes first. `deadline` is also a hard guard, checked at every 50-step mark
    (where the loss read synchronises the device): past it, training stops there."""
    total = steps if steps is not None else 10**9
    start, running, step, t_from = time.time(), [], 0, None
    end = start + minutes * 60 if deadline is None else min(start + minutes * 60, deadline)
    while step < total:
        running.append(step_fn(step, total))
        step += 1
        if steps is None and step == time_from:
            _sync(device)
            t_from = time.time()
        if steps is None and step == probe:
            _sync(device)
            per = (time.time() - t_from) / (probe - time_from)
            total = max(probe + 1, probe + int((end - time.time()) / per))
            log(f"{name}: {per * 1000:.1f} ms/step -> {total} steps", clock)
        if step % 50 == 0 or step == total:
            loss = float(torch.stack(running).mean())
            running = []
            history.append([step, round(time.time() - start, 2), round(loss, 6)])
            if step % 500 == 0 or step == total:
                log(f"{name} step {step}/{total} loss {loss:.5f}", clock)
            if deadline is not None and step < total and time.time() > deadline:
                log(f"{name}: deadline reached, stopping at step {step} of {total}", clock)
                return step, total
    return step, total


# ---- VAE ------------------------------------------------------------------------------------------
def _images(data_gpu: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return data_gpu[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1]


def latent_shape_penalty(z: torch.Tensor, x: torch.Tensor, align: float, tail: float) -> torch.Tensor:
    """Keeps the latent image-like, which the diffusion model finds easier to generate.

    align: the first 3 channels follow the image's colours averaged over each latent cell (the latent
    then sits where the object is); tail: a squared penalty on values beyond 3 per-channel std
    (discourages isolated spikes that code a whole shape in one cell)."""
    loss = z.new_zeros(())
    if align > 0:
        target = F.avg_pool2d(x, x.shape[-1] // z.shape[-1])  # [B, 3, h, w]
        loss = loss + align * F.mse_loss(z[:, :3], target)
    if tail > 0:
        zn = (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), keepdim=True).detach().clamp_min(1e-4)
        loss = loss + tail * F.relu(zn.abs() - 3.0).pow(2).mean()
    return loss


def scale_equivariance_loss(decoder, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """EQ-VAE's scale term: the latent averaged over 2x2 cells must decode to the image averaged
    over 2x2 pixels (Kouzelis et al. 2025, "EQ-VAE: equivariance regularized latent space").

    A code that hides a shape in one spiky cell fails it, so the latent stays image-like: its low
    frequencies carry the image's, and a slightly smooth latent (a diffusion model's typical error)
    still decodes to the right picture. z [B, 16, h, w] (h, w even), x [B, 3, H, W] -> scalar."""
    y2 = decoder(F.avg_pool2d(z, 2)).float()  # [B, 3, H/2, W/2]
    x2 = F.avg_pool2d(x, 2)
    return F.l1_loss(y2, x2) + F.mse_loss(y2, x2)


def train_vae(spec: TinySpec, images: torch.Tensor, args, device: torch.device, clock: Clock, rec: dict):
    vae = build_vae(spec).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    n = images.shape[0]
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def make_step(params, encode_fn, finetune: bool):
        opt = torch.optim.AdamW(params, lr=args.lr_vae, betas=(0.9, 0.99), weight_decay=0.0)

        def step(i: int, total: int) -> torch.Tensor:
            for g in opt.param_groups:
                g["lr"] = lr_at(i, total, args.lr_vae, 100 if not finetune else 20)
            x = _images(images, torch.randint(0, n, (args.batch_vae,), device=device, generator=gen))
            with autocast:
                z = encode_fn(x)  # [B, 16, h, w]
                z_std = z.detach().float().std()
                noisy = z + LATENT_NOISE * z_std * torch.randn(z.shape, device=device, generator=gen).to(z.dtype)
                y = vae.decoder(noisy)
                eq = scale_equivariance_loss(vae.decoder, noisy, x) if args.vae_eq > 0 else None
            y = y.float()
            loss = F.l1_loss(y, x) + F.mse_loss(y, x) + 1e-4 * z.float().pow(2).mean()
            if eq is not None:
                loss = loss + args.vae_eq * eq
            if not finetune:
                loss = loss + latent_shape_penalty(z.float(), x, args.vae_align, args.vae_tail)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return loss.detach()

        return step

    main_steps = None if args.steps_vae is None else max(1, int(args.steps_vae * 0.8))
    rec["vae_loss"] = []
    rec["vae_steps_main"] = run_steps(make_step(list(vae.parameters()), vae.encode, False), main_steps,
                                      args.minutes_vae * 0.8, 40, device, clock, "vae", rec["vae_loss"])[0]
    stats = fold_latent_stats(vae, images, device)
    rec["vae_fold"] = stats
    log(f"vae fold: raw latent mean {stats['raw_mean']:.4f} std {stats['raw_std']:.4f}", clock)
    vae.encoder.requires_grad_(False)
    ft_steps = None if args.steps_vae is None else max(1, args.steps_vae - main_steps)
    rec["vae_finetune_loss"] = []
    rec["vae_steps_finetune"] = run_steps(
        make_step(list(vae.decoder.parameters()), lambda x: vae.encode(x).detach(), True), ft_steps,
        args.minutes_vae * 0.2, 40, device, clock, "vae-decoder", rec["vae_finetune_loss"])[0]
    vae.requires_grad_(False).eval()
    return vae


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, device: torch.device, batch: int = 512) -> torch.Tensor:
    """Raw VAE latents (float32) of every image, on `device`."""
    out = []
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, images.shape[0], batch):
            out.append(vae.encode(_images(images, torch.arange(i, min(i + batch, images.shape[0]),
                                                                device=device))).float())
    return torch.cat(out)


@torch.no_grad()
def fold_latent_stats(vae, images: torch.Tensor, device: torch.device, n: int = 8192) -> dict:
    """Fold z' = (z - m) / (s * 1.5305) + 0.0609 into encoder.conv_out (mean half; the log-variance
    half gets zero weights and a constant 10 %-noise bias), and z = (z' - 0.0609) * 1.5305 * s + m into
    decoder.conv_in, so that to_model_space(z') = (z - m) / s, per channel."""
    from ..models.vae import LATENT_SCALE, LATENT_SHIFT

    z = encode_all(vae, images[:n], device)  # [n, C, h, w]
    m = z.mean(dim=(0, 2, 3)).double()  # [C]
    s = z.std(dim=(0, 2, 3)).double().clamp_min(1e-4)  # [C]
    a = 1.0 / (s * LATENT_SCALE)  # z' = a * z + b
    b = LATENT_SHIFT - m * a
    conv_out, conv_in = vae.encoder.conv_out, vae.decoder.conv_in
    c = m.numel()
    w, bias = conv_out.weight.double(), conv_out.bias.double()
    w[:c] *= a[:, None, None, None]
    bias[:c] = bias[:c] * a + b
    w[c:] = 0.0
    bias[c:] = 2.0 * math.log(LATENT_NOISE / LATENT_SCALE)
    conv_out.weight.copy_(w.float())
    conv_out.bias.copy_(bias.float())
    # decoder.conv_in(z) = W * z + bias with z = (z' - b) / a: W' = W / a (per input channel), bias' = bias - W'.b
    wi = conv_in.weight.double()  # [O, C, 3, 3]
    wi_new = wi / a[None, :, None, None]
    bias_new = conv_in.bias.double() - (wi_new * b[None, :, None, None]).sum(dim=(1, 2, 3))
    conv_in.weight.copy_(wi_new.float())
    conv_in.bias.copy_(bias_new.float())
    zz = to_model_space(encode_all(vae, images[:n], device))
    return {"raw_mean": float(m.mean()), "raw_std": float(s.mean()), "per_channel_mean": m.tolist(),
            "per_channel_std": s.tolist(), "model_space_mean": float(zz.mean()), "model_space_std": float(zz.std())}


# ---- MMDiT + text ---------------------------------------------------------------------------------
def train_mmdit(spec: TinySpec, latents: torch.Tensor, data: Dataset, empty: tuple, args, device: torch.device,
                clock: Clock, rec: dict):
    torch.manual_seed(args.seed + 2)
    mmdit = build_mmdit(spec, torch.Generator().manual_seed(args.seed + 2))
    towers = TextTowers(spec)
    if args.init_from is not None:  # continue from a file's MMDiT and text towers (same spec)
        for module, name in ((mmdit, "mmdit"), (towers.clip_l, "clip_l"), (towers.clip_g, "clip_g"),
                             (towers.t5, "t5xxl")):
            load_component_(module, args.init_from, name)
        rec["init_from"] = file_record(args.init_from)
    mmdit, towers = mmdit.to(device), towers.to(device)
    mmdit.batch_invariant = False  # batch 256: conditioning vectors in one GEMM (models.mmdit.per_row)
    rec["params"] = {"mmdit": param_count(mmdit), "clip_l": param_count(towers.clip_l),
                     "clip_g": param_count(towers.clip_g), "t5": param_count(towers.t5)}
    params = [p for m in (mmdit, towers) for p in m.parameters()]
    step_graph = bool(args.step_graph) and device.type == "cuda"
    # --step-graph: lr and the EMA weight are device tensors, so one captured step serves every step
    lr_t = torch.tensor(args.lr, dtype=torch.float32, device=device)
    opt = torch.optim.AdamW(params, lr=lr_t if step_graph else args.lr, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=device.type == "cuda", capturable=step_graph)
    ema = [p.detach().clone() for p in params]
    ema_w = {"now": 0.0, "t": torch.zeros((), dtype=torch.float32, device=device)}  # 1 - EMA decay of the step
    ema_keep = torch.ones((), dtype=torch.float32, device=device)  # its EMA decay, as a tensor
    ids = [torch.from_numpy(a).long().to(device) for a in (data.l_ids, data.g_ids, data.t5_ids)]
    empty_ids = [torch.tensor(e, dtype=torch.long, device=device)[None] for e in empty]  # [1, 77] each
    gen = torch.Generator(device=device).manual_seed(args.seed + 3)
    n, b = latents.shape[0], args.batch
    # cache_enabled=False: autocast's weight-cast cache must not outlive a CUDA graph capture
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)
    # --compile: the step is launch-bound at this size (62 ms at batch 1024 ~ 63 ms at 512 on the H100)
    # --compile-mode reduce-overhead adds CUDA graphs (cudagraph trees, forward and backward): the step is
    # then bound by the GPU's work, not by launching ~thousands of small kernels. --step-graph instead
    # compiles without graphs and captures the whole step (forward, backward, clipping, AdamW, EMA) in one
    # CUDA graph: no Python, guards or eager optimizer kernels between the GPU's work.
    cm = "default" if step_graph else args.compile_mode
    run_mmdit, run_towers = ((torch.compile(mmdit, mode=cm), torch.compile(towers, mode=cm)) if args.compile
                             else (mmdit, towers))
    graphs = args.compile and cm in ("reduce-overhead", "max-autotune")
    mmdit.train()
    towers.train()
    # the batch of the step, written in place: the captured step reads these addresses
    toks = [torch.zeros(b, t.shape[1], dtype=torch.long, device=device) for t in ids]  # 3 x [B, 77]
    xt = torch.zeros((b,) + tuple(latents.shape[1:]), device=device)  # [B, 16, h, w]
    target = torch.zeros_like(xt)  # [B, 16, h, w] v = eps - x0
    sig = torch.zeros(b, device=device)  # [B]

    def sample_batch(i: int, total: int) -> None:
        lr, decay = lr_at(i, total, args.lr, args.warmup), min(args.ema, (1 + i) / (10 + i))
        if step_graph:
            lr_t.fill_(lr)
        else:
            for g in opt.param_groups:
                g["lr"] = lr
        ema_w["now"] = 1.0 - decay
        if step_graph:
            ema_w["t"].fill_(1.0 - decay)
            ema_keep.fill_(decay)
        idx = torch.randint(0, n, (b,), device=device, generator=gen)
        drop = torch.rand(b, device=device, generator=gen) < args.text_dropout  # [B]
        for buf, t, e in zip(toks, ids, empty_ids):
            buf.copy_(torch.where(drop[:, None], e, t[idx]))  # [B, 77]
        x0 = latents[idx]  # [B, 16, h, w] model space
        eps = torch.randn(x0.shape, device=device, generator=gen)
        t = torch.sigmoid(torch.randn(b, device=device, generator=gen))  # [B] logit-normal(0, 1)
        u = torch.rand(b, device=device, generator=gen)  # [B] uniform
        t = torch.where(torch.rand(b, device=device, generator=gen) < args.sigma_uniform, u, t)
        s = args.train_shift * t / (1 + (args.train_shift - 1) * t)  # [B] SD3 shifted sigma
        sig.copy_(s)
        xt.copy_((1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * eps)
        target.copy_(eps - x0)

    def update() -> torch.Tensor:
        """Forward, backward, clipping, AdamW, EMA on the batch buffers (grads start as None)."""
        with autocast:
            context, pooled = run_towers(*toks)
            v = run_mmdit(xt, sig, context, pooled)
        loss = F.mse_loss(v.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            live = [p.detach() for p in params]
            if step_graph:  # ema = decay * ema + (1 - decay) * p with the step's weights read from the device
                torch._foreach_mul_(ema, ema_keep)
                torch._foreach_add_(ema, torch._foreach_mul(live, ema_w["t"]))
            else:
                torch._foreach_lerp_(ema, live, ema_w["now"])
        return loss.detach()

    captured: dict = {}

    def step(i: int, total: int) -> torch.Tensor:
        sample_batch(i, total)
        if not step_graph or i < STEP_GRAPH_WARMUP:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs may be overwritten now
            opt.zero_grad(set_to_none=True)
            if not step_graph:
                return update()
            side = torch.cuda.Stream(device)  # warm-up (compile) off the default stream, as graph capture asks
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                loss = update()
            torch.cuda.current_stream(device).wait_stream(side)
            return loss
        if not captured:
            opt.zero_grad(set_to_none=True)  # backward inside the capture allocates the grads in its pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured["loss"] = update()
            captured["graph"] = graph
        captured["graph"].replay()
        return captured["loss"].clone()

    rec["mmdit_loss"] = []
    probe, time_from = (200, 50) if args.steps_mmdit is None and not args.smoke else (40, 10)
    rec["mmdit_steps"], rec["mmdit_planned_steps"] = run_steps(
        step, args.steps_mmdit, args.minutes_mmdit, probe, device, clock, "mmdit", rec["mmdit_loss"],
        deadline=args.deadline, time_from=time_from)
    rec["mmdit_stopped_by_deadline"] = rec["mmdit_steps"] < rec["mmdit_planned_steps"]
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    mmdit.eval().requires_grad_(False)
    towers.eval().requires_grad_(False)
    return mmdit, towers


# ---- evaluation -----------------------------------------------------------------------------------
def generate(mmdit, vae, text_encoder, prompts: list[str], seed: int, cfg: float, steps: int, size: int,
             device: torch.device, sampler: str = "euler", scheduler: str = "normal", batch: int = 256):
    """Images (uint8 list) through the generation core (`sd35fp8.generation.generate`, what the pipeline
    runs), `batch` prompts per call: the call starting at prompt i is seeded `seed + i`; the empty
    negative is encoded once and shared."""
    from ..generation import Components, GenerationRequest, SampleSettings, generate as run_generation

    parts = Components(mmdit=mmdit, vae=vae, text_encoder=text_encoder, device=device, dtype=torch.float32)
    settings = SampleSettings(steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler, shift=3.0)
    out = []
    for i in range(0, len(prompts), batch):
        request = GenerationRequest(prompts=prompts[i:i + batch], negatives="", settings=settings, width=size,
                                    height=size, seed=seed + i)
        out += image_to_uint8(run_generation(parts, request).pixels.float())
    return out


def evaluate(mmdit, vae, towers: TextTowers, spiece: Path, args, device: torch.device, size: int,
             clock: Clock) -> dict:
    from ..text.encoders import SD3TextEncoder

    text = SD3TextEncoder(towers.clip_l, towers.clip_g, towers.t5, tokenizer=make_tokenizer(spiece))
    items = world.heldout_prompts(args.eval_items, seed=1000 + args.seed)
    prompts = [it.caption for it in items]
    res: dict = {"n_items": len(items), "steps": args.eval_steps, "sampler": args.eval_sampler, "scheduler": "normal"}
    # reference upper bounds: the renders themselves, and their VAE round trip
    renders = [world.render(it.scene, size) for it in items]
    res["detector_on_renders"] = detector.aggregate(detector.score_many(renders, items, args.workers))
    x = torch.from_numpy(np.stack(renders)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    recon = image_to_uint8(vae.decode(vae.encode(x)).float())
    res["detector_on_vae_roundtrip"] = detector.aggregate(detector.score_many(recon, items, args.workers))
    res["cfg_grid"] = {}
    best = None
    for cfg in args.cfg_grid:
        images = generate(mmdit, vae, text, prompts, args.seed, cfg, args.eval_steps, size, device,
                          args.eval_sampler)
        agg = detector.aggregate(detector.score_many(images, items, args.workers))
        res["cfg_grid"][str(cfg)] = agg
        pc = agg["per_category"]
        key = pc.get("single", 0.0) + pc.get("two_relation", 0.0)
        log(f"eval cfg {cfg}: " + " ".join(f"{k} {v:.4f}" for k, v in pc.items())
            + " | aspects " + " ".join(f"{k} {v:.4f}" for k, v in agg["per_aspect"].items())
            + f" | overall {agg['overall']:.4f}", clock)
        if best is None or key > best[0]:
            best = (key, cfg, images)
    res["best_cfg"] = best[1]
    res["heldout"] = res["cfg_grid"][str(best[1])]
    train_items = world.eval_items(max(5, args.eval_items // 2), seed=2000 + args.seed, split="train")
    imgs = generate(mmdit, vae, text, [it.caption for it in train_items], args.seed, best[1], args.eval_steps,
                    size, device, args.eval_sampler)
    res["in_distribution"] = detector.aggregate(detector.score_many(imgs, train_items, args.workers))
    res["samples"] = best[2][:16]
    return res


# ---- main -----------------------------------------------------------------------------------------
def file_record(path: Path) -> dict:
    """Where a reused file came from: path, size, sha256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"file": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


def load_vae_from(spec: TinySpec, path: Path, device: torch.device):
    """The (already folded) VAE of an all-in-one, frozen, in float32."""
    vae = load_component_(build_vae(spec), path, "vae")
    return vae.to(device).requires_grad_(False).eval()


def _generation_defaults(spec: TinySpec, args) -> dict:
    """The file's generation defaults (metadata); cfg is replaced by the evaluation's best."""
    return {"steps": args.eval_steps, "cfg": args.cfg_grid[0], "sampler": args.eval_sampler, "scheduler": "normal",
            "shift": 3.0, "width": spec.image_size, "height": spec.image_size}


def _file_info(args, rec: dict) -> dict:
    """The file's `sd35fp8.tiny` metadata: spec, seed, and the sha256 of every reused file."""
    info = {"spec": rec["spec"], "seed": args.seed, "latent_fold": "per-channel affine folded into VAE"}
    for key in ("vae_from", "spiece_from", "init_from"):
        if key in rec:
            info[key + "_sha256"] = rec[key]["sha256"]
    return info


def _export_vae_only(spec: TinySpec, vae, spiece: Path, args, clock: Clock, rec: dict) -> dict:
    """--vae-only: the all-in-one with the trained VAE and freshly initialised MMDiT / text towers (not
    a usable model: the input of a later `--vae-from` call), and its log. No evaluation."""
    mmdit = build_mmdit(spec, torch.Generator().manual_seed(args.seed + 2))
    towers = TextTowers(spec)
    info = _file_info(args, rec) | {"vae_only": "MMDiT and text towers untrained"}
    ckpt = export_checkpoint(args.out / CHECKPOINT_NAME, mmdit, vae.float().cpu(), towers.clip_l, towers.clip_g,
                             towers.t5, _generation_defaults(spec, args), info, spiece)
    load_back(ckpt)
    rec.update(timings=clock.marks, total_s=round(clock.now(), 1), vae_only=True)
    (args.out / "train_log.json").write_text(json.dumps(rec, indent=1))
    log(f"VAE only: wrote {ckpt} in {clock.now():.1f}s (use it with --vae-from)", clock)
    return rec


RECIPE_MIX = "single=0.2,two=0.55,count=0.1,three=0.15"  # the shipped run's training mix (run 13)


def _parse_mix(text: str) -> dict[str, float]:
    """'single=0.2,two=0.55' -> a normalised world mix (argparse type: errors name the bad part)."""
    mix = {}
    for part in text.split(","):
        kind, sep, weight = part.partition("=")
        try:
            mix[kind.strip()] = float(weight)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected kind=weight pairs separated by commas, got {part!r}")
    try:
        return world.check_mix(mix)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sd35fp8.tiny.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--minutes-vae", type=float, default=3.0)
    p.add_argument("--minutes-mmdit", type=float, default=8.5,
                   help="MMDiT + text towers, compile included (default 8.5: ~12.5 min in all on an H100)")
    p.add_argument("--steps-vae", type=int, default=None)
    p.add_argument("--steps-mmdit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-images", type=int, default=150_000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batch-vae", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-vae", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--train-shift", type=float, default=1.5,
                   help="shift of the training sigma distribution (default 1.5: more high-noise samples, where the "
                        "layout is decided; 1 = none; 3 = the sampler's, little low noise)")
    p.add_argument("--sigma-uniform", type=float, default=0.15,
                   help="fraction of training t drawn uniformly in [0, 1] instead of logit-normal(0, 1)")
    p.add_argument("--vae-from", type=Path, default=None,
                   help="all-in-one whose (already folded) VAE is reused: no VAE training, no fold")
    p.add_argument("--spiece-from", type=Path, default=None, help="spiece.model to reuse instead of training one")
    p.add_argument("--init-from", type=Path, default=None,
                   help="all-in-one whose MMDiT and text towers initialise phase (4)")
    p.add_argument("--deadline", type=float, default=None,
                   help="time.time() by which MMDiT training must end (plans the steps, hard stop)")
    p.add_argument("--text-dropout", type=float, default=0.1)
    p.add_argument("--mix", type=_parse_mix, default=_parse_mix(RECIPE_MIX),
                   help=f"training scene-kind mix as kind=weight pairs (default {RECIPE_MIX}; "
                        "world.KIND_WEIGHTS, the mix of runs 1-12, is single=0.3,two=0.4,count=0.12,three=0.18)")
    p.add_argument("--relation-said", type=float, default=0.9,
                   help="fraction of two-object training captions that state their relation (default 0.9; "
                        "runs 1-12: 0.8)")
    p.add_argument("--vae-align", type=float, default=0.0,
                   help="weight of the VAE latent's colour alignment (first 3 channels ~ 8x8-averaged image)")
    p.add_argument("--vae-eq", type=float, default=1.0,
                   help="weight of the VAE's scale-equivariance term (EQ-VAE: the 2x2-averaged latent decodes "
                        "to the 2x2-averaged image; a smoother latent for the diffusion model)")
    p.add_argument("--vae-tail", type=float, default=0.0,
                   help="weight of the VAE penalty on latent values beyond 3 std (spiky codes)")
    p.add_argument("--eval-items", type=int, default=400)
    p.add_argument("--eval-steps", type=int, default=30)
    p.add_argument("--eval-sampler", default="euler_ancestral",
                   help="sampler (ComfyUI name) of the run's evaluation and of the file's defaults "
                        "(default euler_ancestral; runs 1-12: euler 20 steps)")
    p.add_argument("--cfg-grid", type=float, nargs="+", default=list(CFG_GRID))
    p.add_argument("--patch", type=int, default=None,
                   help="MMDiT patch size for a new model (default 2 as SD3.5; 1: 4x the image tokens)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the MMDiT and text towers for training (default: on CUDA)")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode with --compile --no-step-graph: reduce-overhead (default: CUDA graphs, "
                        "11.9 ms a step at batch 512 on the H100), default, max-autotune")
    p.add_argument("--step-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="on CUDA: capture the whole training step (forward, backward, clipping, AdamW, EMA) in one "
                        "CUDA graph, torch.compile mode default inside (default: with --compile; 7.4 ms a step "
                        "at batch 256 on the H100)")
    p.add_argument("--vae-only", action="store_true",
                   help="train the VAE only and write it in an all-in-one for a later --vae-from call "
                        "(splits a run into two device calls)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke run with tiny sizes (< 60 s)")
    args = p.parse_args(argv)
    if not 0.0 <= args.relation_said <= 1.0:
        p.error(f"--relation-said must be in [0, 1], got {args.relation_said}")
    from ..sampling import get_sampler
    try:
        get_sampler(args.eval_sampler)
    except InputError as e:
        p.error(f"--eval-sampler: {e}")
    if args.smoke:
        args.device, args.n_images, args.batch, args.batch_vae = "cpu", 64, 8, 4
        args.steps_vae = args.steps_vae or 3
        args.steps_mmdit = args.steps_mmdit or 3
        args.warmup, args.eval_items, args.eval_steps, args.cfg_grid = 2, 5, 2, [4.0]
        args.workers = min(args.workers, 2)
    if args.compile is None:
        args.compile = str(args.device).startswith("cuda")
    if args.step_graph is None:
        args.step_graph = args.compile
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    clock = Clock()
    spec = TinySpec.smoke() if args.smoke else TinySpec.full()
    if args.patch is not None:
        spec = spec.with_patch(args.patch)
    if args.init_from is not None:  # sizes of the model continued from
        spec = TinySpec.from_checkpoint(args.init_from, spec.image_size)
    if args.vae_from is not None:
        spec = spec.with_vae_of(TinySpec.from_checkpoint(args.vae_from, spec.image_size))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    rec: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "torch": torch.__version__}
    t = time.time()
    if args.spiece_from is not None:
        spiece = out / "spiece.model"
        if args.spiece_from.resolve() != spiece.resolve():
            shutil.copyfile(args.spiece_from, spiece)
        rec["spiece_from"] = file_record(args.spiece_from)
    else:
        spiece = train_spiece(out, spec.t5_vocab, args.seed, 2000 if args.smoke else 5000)
    import sentencepiece as spm
    spec = spec.with_t5_vocab(spm.SentencePieceProcessor(model_file=str(spiece)).get_piece_size())
    rec["spec"] = {k: v for k, v in spec.__dict__.items()}
    t = clock.mark("spiece", t)
    data = render_dataset(args.n_images, args.seed, spec.image_size, spiece, args.workers, args.mix,
                          args.relation_said)
    tok = make_tokenizer(spiece)
    from .data import token_rows
    empty = token_rows(tok, "")
    t = clock.mark("render", t)
    log(f"rendered {len(data)} images ({spec.image_size} px), T5 vocab {spec.t5_vocab}", clock)

    device = torch.device(args.device)  # first CUDA use: after the forked render workers
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 evaluation passes
    torch.backends.cudnn.allow_tf32 = True
    rec["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    images = torch.from_numpy(data.images).to(device)  # uint8 [N, H, W, 3]
    if args.vae_from is not None:
        vae = load_vae_from(spec, args.vae_from, device)
        rec["vae_from"] = file_record(args.vae_from)
    else:
        vae = train_vae(spec, images, args, device, clock, rec)
    t = clock.mark("vae", t)
    if args.vae_only:
        return _export_vae_only(spec, vae, spiece, args, clock, rec)
    latents = to_model_space(encode_all(vae, images, device))  # [N, 16, h, w]
    rec["latents_model_space"] = {"mean": float(latents.mean()), "std": float(latents.std())}
    del images
    t = clock.mark("encode", t)
    mmdit, towers = train_mmdit(spec, latents, data, empty, args, device, clock, rec)
    t = clock.mark("mmdit", t)

    defaults = _generation_defaults(spec, args)
    info = _file_info(args, rec)
    ckpt = export_checkpoint(out / CHECKPOINT_NAME, mmdit, vae, towers.clip_l, towers.clip_g, towers.t5,
                             defaults, info, spiece)
    load_back(ckpt)  # proves the layout with the project's loaders
    t = clock.mark("export", t)
    (out / "train_log.json").write_text(json.dumps(rec, indent=1))  # rewritten with the evaluation below
    res = evaluate(mmdit, vae, towers, spiece, args, device, spec.image_size, clock)
    t = clock.mark("eval", t)
    defaults["cfg"] = res["best_cfg"]
    samples = res.pop("samples")
    info["eval_heldout"] = res["heldout"]["per_category"]
    export_checkpoint(ckpt, mmdit, vae, towers.clip_l, towers.clip_g, towers.t5, defaults, info, spiece)
    grid = np.concatenate([np.concatenate(samples[r * 4:(r + 1) * 4], axis=1)
                           for r in range(len(samples) // 4)], axis=0) if len(samples) >= 4 else samples[0]
    from PIL import Image
    Image.fromarray(grid).save(out / "samples_heldout.png")
    rec.update(defaults=defaults, eval=res, timings=clock.marks, total_s=round(clock.now(), 1),
               files={p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()})
    (out / "train_log.json").write_text(json.dumps(rec, indent=1))
    log(f"done in {clock.now():.1f}s: held-out {res['heldout']['per_category']} (cfg {res['best_cfg']})", clock)
    return rec


if __name__ == "__main__":
    main()
