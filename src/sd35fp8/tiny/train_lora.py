"""Train the shipped LoRA: teach the shipped model the colour word "brown" (tiny/concept.py).

    # the shipped file (its exact command is in its metadata, `sd35fp8 info FILE`):
    nice python -m sd35fp8.tiny.train_lora --steps 300 --batch 4 --n-images 240 --p-new 0.75 --lr 3e-3
    # on a GPU (bf16 autocast; --minutes bounds the whole run; the file is rewritten every --save-every
    # steps and at the end, so a run killed by a time limit still leaves the last checkpoint):
    python -m sd35fp8.tiny.train_lora --device cuda --steps 4000 --batch 128 --n-images 8000 --lr 1e-3 --minutes 3.5

The base weights stay frozen. LoRA (rank --rank, alpha = rank) on every Linear of the MMDiT's joint
blocks and context embedder and on the attention and MLP Linears of CLIP-L, CLIP-G and T5, through
the same unmerged path inference uses (lora/apply.py: each layer's slot and forward hook, here with
trainable factors). Data: half the batch scenes with one brown object (single or two-object,
paraphrased captions), half the world's ordinary training scenes, so the rest of the model's
behaviour stays put. Loss: the base model's flow-matching loss (tiny/train.py: logit-normal
sigma shifted by --train-shift, text dropped 10 % of the time for CFG). The file is written in the
kohya / sd-scripts layout (`lora_unet_…`, `lora_te1_…`, `alpha`), fp16, with the command and the
loss curve in its metadata.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..lora.apply import ActiveTerm, lora_slot, remove_slot
from ..models.vae import to_model_space
from ..pipeline import shipped_model_path
from . import concept, world
from .data import SPIECE_NAME, make_tokenizer, token_rows
from .export import load_component_
from .spec import TextTowers, TinySpec, build_mmdit, build_vae

LORA_NAME = "sd35fp8_tiny_brown_lora.safetensors"
_KOHYA_PREFIX = {"mmdit": "lora_unet_", "clip_l": "lora_te1_", "clip_g": "lora_te2_", "t5xxl": "lora_te3_"}
_TEXT_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", ".q", ".k", ".v", ".o", "wi", "wo",
                "wi_0", "wi_1")


def lora_targets(mmdit: nn.Module, towers: TextTowers) -> dict[str, dict[str, nn.Linear]]:
    """component -> {our module name: Linear} that the LoRA trains."""
    mm = {n: m for n, m in mmdit.named_modules() if isinstance(m, nn.Linear)
          and (n.startswith("joint_blocks.") or n == "context_embedder")}
    out = {"mmdit": mm}
    for comp, root in (("clip_l", towers.clip_l), ("clip_g", towers.clip_g), ("t5xxl", towers.t5)):
        out[comp] = {n: m for n, m in root.named_modules() if isinstance(m, nn.Linear)
                     and ("encoder.layers." in n or "encoder.block." in n) and n.endswith(_TEXT_LEAVES)}
    return out


def attach_trainable(targets: dict[str, dict[str, nn.Linear]], rank: int, seed: int) -> list[tuple]:
    """One trainable (down, up) per layer (down ~ N(0, 1/K), up = 0: the LoRA starts as the base)."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for comp, mods in targets.items():
        for name, lin in mods.items():
            dev = lin.weight.device
            down = nn.Parameter((torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5).to(dev))
            up = nn.Parameter(torch.zeros(lin.out_features, rank, device=dev))
            lora_slot(lin)[:] = [ActiveTerm(down, up, 0, 1.0)]
            params.append((comp, name, lin, down, up))
    return params


def make_batch(rng: np.random.Generator, n: int, p_new: float, size: int):
    """n (image, caption) pairs: brown scenes with probability p_new, else world training scenes."""
    images, captions = [], []
    for _ in range(n):
        if rng.random() < p_new:
            img, cap = concept.brown_scene(rng, size)
        else:
            scene = world.sample_scene(rng, "train")
            img, cap = world.render(scene, size), world.caption(scene, rng)
        images.append(img)
        captions.append(cap)
    return np.stack(images), captions


_CHUNK = 250  # images per worker task


def _chunk(job: tuple[int, int, int, float, int]) -> tuple[np.ndarray, list[str]]:
    seed, i, n, p_new, size = job
    return make_batch(np.random.default_rng([seed, i]), n, p_new, size)


def render_data(n: int, p_new: float, size: int, seed: int, workers: int) -> tuple[np.ndarray, list[str]]:
    """n (image uint8 [n, size, size, 3], caption) pairs; chunk i from default_rng([seed, i]), so the data
    depend on the seed only, not on the number of worker processes."""
    jobs = [(seed, i, min(_CHUNK, n - i * _CHUNK), p_new, size) for i in range(-(-n // _CHUNK))]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_chunk, jobs)
    else:
        parts = [_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]]


def build_data(args, vae, tokenizer, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rendered, encoded (model-space latents, on `device`) and tokenized training set (ids on `device`)."""
    images, captions = render_data(args.n_images, args.p_new, args.size, args.seed, args.workers)
    lat = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = torch.from_numpy(images[i:i + 256]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, H, W]
            lat.append(to_model_space(vae.encode(x)))
    rows = [token_rows(tokenizer, c) for c in captions]
    ids = [torch.tensor([r[k] for r in rows], dtype=torch.long, device=device) for k in range(3)]  # 3 x [N, 77]
    return torch.cat(lat), ids


def export(params: list[tuple], path: Path, rank: int, metadata: dict) -> int:
    """kohya layout, fp16, alpha = rank (scale 1)."""
    sd = {}
    for comp, name, _, down, up in params:
        stem = _KOHYA_PREFIX[comp] + name.replace(".", "_")
        sd[stem + ".lora_down.weight"] = down.detach().half().contiguous()
        sd[stem + ".lora_up.weight"] = up.detach().half().contiguous()
        sd[stem + ".alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # a run killed while writing leaves the last whole file
    save_file(sd, str(tmp), metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()})
    os.replace(tmp, path)
    return path.stat().st_size


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m sd35fp8.tiny.train_lora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "weights" / LORA_NAME)
    ap.add_argument("--model", type=Path, default=None, help="base all-in-one (default: the shipped model)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--n-images", type=int, default=8000)
    ap.add_argument("--p-new", type=float, default=0.75, help="fraction of brown scenes in the data")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train-shift", type=float, default=1.5)
    ap.add_argument("--text-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 beats 2 on a shared machine)")
    ap.add_argument("--minutes", type=float, default=None, help="stop training this long after the start of the "
                    "run (loading and data included), then write the file (its metadata says how many steps ran)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on CUDA, float32 on the CPU)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="rendering processes")
    ap.add_argument("--save-every", type=int, default=500, help="rewrite the file every N steps (0: at the end)")
    ap.add_argument("--profile", type=int, default=0, help="profile N steps after 20 warm-up steps (torch.profiler "
                    "table on stdout), then train on")
    return ap.parse_args(argv)


def lr_at(step: int, steps: int, lr: float) -> float:
    """100 warm-up steps, then cosine to 10 %."""
    return lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(step, steps) / steps)))


def profile_steps(step_fn, n: int) -> tuple[str, list[torch.Tensor]]:
    """torch.profiler table of n training steps (CPU and CUDA time per op), and their losses."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.time()
    with profile(activities=acts) as prof:
        losses = [step_fn() for _ in range(n)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = (time.time() - t0) / n
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return f"{n} profiled steps, {wall * 1e3:.1f} ms/step wall (profiler on)\n" + prof.key_averages().table(
        sort_by=key, row_limit=15), losses


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
    model = args.model or shipped_model_path()
    spec = TinySpec.from_checkpoint(model, args.size)
    mmdit = load_component_(build_mmdit(spec, torch.Generator().manual_seed(0)), model, "mmdit").requires_grad_(False)
    # training batches: the conditioning vectors (embedders, adaLN) in one GEMM, not row by row
    # (models.mmdit.per_row: B small GEMMs and their backward each step; 0.44 s/step at batch 64 on an H200)
    mmdit.batch_invariant = False
    towers = TextTowers(spec)
    for module, name in ((towers.clip_l, "clip_l"), (towers.clip_g, "clip_g"), (towers.t5, "t5xxl")):
        load_component_(module, model, name)
    towers.requires_grad_(False).eval()
    mmdit.eval()
    mmdit.to(device)
    towers.to(device)
    vae = load_component_(build_vae(spec), model, "vae").requires_grad_(False).eval().to(device)
    tokenizer = make_tokenizer(Path(model).parent / SPIECE_NAME)
    t0 = time.time()
    latents, ids = build_data(args, vae, tokenizer, device)
    data_s = time.time() - t0
    print(f"data: {latents.shape[0]} images rendered, encoded and tokenized in {data_s:.0f} s", flush=True)
    empty = [torch.tensor(r, dtype=torch.long, device=device)[None] for r in token_rows(tokenizer, "")]  # 3 x [1, 77]
    params = attach_trainable(lora_targets(mmdit, towers), args.rank, args.seed + 1)
    trainable = [p for *_, d, u in params for p in (d, u)]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)  # on the device: no host copies per step
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    n, b = latents.shape[0], args.batch
    state = {"step": 0}

    def step_fn() -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr_at(state["step"], args.steps, args.lr)
        idx = torch.randint(0, n, (b,), generator=gen, device=device)
        drop = torch.rand(b, generator=gen, device=device) < args.text_dropout  # [B]
        toks = [torch.where(drop[:, None], e, t[idx]) for t, e in zip(ids, empty)]  # 3 x [B, 77]
        x0 = latents[idx]  # [B, 16, h, w]
        eps = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.sigmoid(torch.randn(b, generator=gen, device=device))
        s = args.train_shift * t / (1 + (args.train_shift - 1) * t)  # [B]
        xt = (1 - s)[:, None, None, None] * x0 + s[:, None, None, None] * eps
        with autocast:
            context, pooled = towers(*toks)
            v = mmdit(xt, s, context, pooled)
        loss = F.mse_loss(v.float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        state["step"] += 1
        return loss.detach()

    def record_now(train_s: float, losses: list[float], profile: str | None) -> dict:
        rec = {"command": "python -m sd35fp8.tiny.train_lora " + " ".join(sys.argv[1:] if argv is None else argv),
               "args": {k: str(v) for k, v in vars(args).items()}, "data_seconds": round(data_s, 1),
               "train_seconds": round(train_s, 1), "steps_done": len(losses), "threads": torch.get_num_threads(),
               "seconds_per_step": round(train_s / max(len(losses), 1), 4),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "loss_per_100": [round(float(np.mean(losses[i:i + 100])), 5) for i in range(0, len(losses), 100)],
               "concept": {"word": concept.NEW_COLOUR, "rgb": list(concept.NEW_RGB)},
               "base_model": Path(model).name}
        if profile:
            rec["profile_table"] = profile
        return rec

    losses: list[float] = []
    pending: list[torch.Tensor] = []
    profile = None
    t1 = time.time()
    while len(losses) + len(pending) < args.steps:
        step = len(losses) + len(pending)
        if args.minutes is not None and time.time() - start > 60 * args.minutes:
            print(f"stopped after {step} steps: --minutes {args.minutes}", flush=True)
            break
        if args.profile and step == 20:  # the profiled steps train like the others
            profile, got = profile_steps(step_fn, args.profile)
            pending += got
            print(profile, flush=True)
            continue
        pending.append(step_fn())
        if len(pending) == 50 or len(losses) + len(pending) >= args.steps:  # one host sync per 50 steps
            losses += torch.stack(pending).tolist()
            pending = []
            k = len(losses)
            print(f"step {k} loss {np.mean(losses[-100:]):.4f} lr {lr_at(k, args.steps, args.lr):.2e} "
                  f"{time.time() - t1:.0f} s ({(time.time() - t1) / k:.3f} s/step)", flush=True)
            if args.save_every and k % args.save_every == 0:
                export(params, args.out, args.rank, {"sd35fp8.lora": record_now(time.time() - t1, losses, profile)})
    if pending:
        losses += torch.stack(pending).tolist()
    train_s = time.time() - t1
    record = record_now(train_s, losses, profile)
    size = export(params, args.out, args.rank, {"sd35fp8.lora": record})
    for _, _, lin, _, _ in params:
        remove_slot(lin)
    print(f"wrote {args.out} ({size / 2 ** 20:.2f} MiB), {len(losses)} steps in {train_s:.0f} s")
    return record


if __name__ == "__main__":
    main()
