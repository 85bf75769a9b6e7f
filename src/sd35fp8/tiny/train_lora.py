"""Train the shipped LoRA: teach the shipped model the colour word "brown" (tiny/concept.py).

    # the shipped file (session 16, CPU; its exact command is also in its metadata, `sd35fp8 info FILE`): the
    # brown scenes' latents fitted to the frozen decoder (--invert-steps; the encoder's decode red or green)
    python -m sd35fp8.tiny.train_lora --n-images 96 --p-new 0.75 --invert-steps 15 --invert-region image \
        --invert-reg 0.3 --invert-batch 24 --steps 1500 --batch 8 --lr 3e-3 --threads 2 --workers 1 --minutes 10
    # on a GPU (bf16 autocast; --minutes bounds the whole run; the file is rewritten every --save-every
    # steps and at the end, so a run killed by a time limit still leaves the last checkpoint; not run on a GPU
    # with inversion yet: benchmarks/gpu_lora_brown.sh):
    python -m sd35fp8.tiny.train_lora --device cuda --steps 1200 --batch 128 --n-images 3000 --invert-steps 40 \
        --invert-reg 0.3 --invert-batch 256 --invert-seconds 60 --minutes 2.9

The base weights stay frozen. LoRA (rank --rank, alpha = rank) on every Linear of the MMDiT's joint
blocks and context embedder and on the attention and MLP Linears of CLIP-L, CLIP-G and T5, through
the same unmerged path inference uses (lora/apply.py: each layer's slot and forward hook, here with
trainable factors). Data: a fraction --p-new of scenes with one brown object (single or two-object,
paraphrased captions), the rest the world's ordinary training scenes, so the rest of the model's
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

from ..errors import InputError
from ..lora.apply import ActiveTerm, lora_slot, remove_slot
from ..models.vae import to_model_space, to_vae_space
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


def latent_box(cov: np.ndarray, f: int = 8) -> np.ndarray:
    """The latent cells [size/f, size/f] (uint8 0/1) that an object of pixel coverage cov [size, size] touches,
    dilated by one cell (the decoder's 3x3 convolutions spread a cell over its neighbours)."""
    h, w = cov.shape[0] // f, cov.shape[1] // f
    hit = (cov[:h * f, :w * f].reshape(h, f, w, f) > 0).any(axis=(1, 3))
    pad = np.pad(hit, 1)
    return np.max([pad[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=0).astype(np.uint8)


def make_batch(rng: np.random.Generator, n: int, p_new: float, size: int):
    """n (image, caption) pairs: brown scenes with probability p_new, else world training scenes; and the
    brown object's latent box (latent_box; zeros for the world's scenes) uint8 [n, size/8, size/8]."""
    images, captions, boxes = [], [], []
    for _ in range(n):
        if rng.random() < p_new:
            img, cap, cov = concept.brown_scene(rng, size, coverage=True)
            boxes.append(latent_box(cov))
        else:
            scene = world.sample_scene(rng, "train")
            img, cap = world.render(scene, size), world.caption(scene, rng)
            boxes.append(np.zeros((size // 8, size // 8), dtype=np.uint8))
        images.append(img)
        captions.append(cap)
    return np.stack(images), captions, np.stack(boxes)


_CHUNK = 250  # images per worker task


def _chunk(job: tuple[int, int, int, float, int]) -> tuple[np.ndarray, list[str], np.ndarray]:
    seed, i, n, p_new, size = job
    return make_batch(np.random.default_rng([seed, i]), n, p_new, size)


def render_data(n: int, p_new: float, size: int, seed: int, workers: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """n (image uint8 [n, size, size, 3], caption) pairs and the brown objects' latent boxes [n, size/8, size/8];
    chunk i from default_rng([seed, i]), so the data depend on the seed only, not on the number of workers."""
    jobs = [(seed, i, min(_CHUNK, n - i * _CHUNK), p_new, size) for i in range(-(-n // _CHUNK))]
    if workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_chunk, jobs)
    else:
        parts = [_chunk(j) for j in jobs]
    return np.concatenate([p[0] for p in parts]), [c for p in parts for c in p[1]], np.concatenate([p[2] for p in parts])


def invert_latents(vae, x: torch.Tensor, z: torch.Tensor, steps: int, lr: float = 0.05,
                   mask: torch.Tensor | None = None, reg: float = 0.0, noise: float = 0.0) -> torch.Tensor:
    """Latents (model space) that the frozen decoder turns into x [B, 3, H, W]: Adam on
    L1(decode(z), x) + reg * mean((z - z_enc)^2) from the encoder's z_enc [B, 16, h, w]; with mask [B, 1, h, w]
    only the masked latent cells move (z = z_enc + mask * d). The shipped VAE only ever saw the 8 palette colours:
    its encoder's latent of a brown object decodes red or green (1 of 8 single brown objects survive the round
    trip), but the decoder draws brown from nearby latents (7 of 8 after 20-150 steps), so the LoRA learns those.
    Unregularised, the whole latent moves (rms 0.25 after 20 steps), background cells included, into residue the
    diffusion model cannot predict (the base model's flow loss at sigma 0.1 on such latents: 4.1 against 0.31 on
    the encoder's); reg 3 keeps the change at rms ~0.03 (flow loss 0.35) and 12 of 16 still decode brown.
    noise > 0: decode z + N(0, noise^2) each step (z itself stays clean), so that the latent decodes to x also
    when the diffusion model reproduces it only approximately."""
    z0 = z.detach()
    d = torch.zeros_like(z0, requires_grad=True)
    opt = torch.optim.Adam([d], lr=lr)
    for _ in range(steps):
        zz = z0 + (d if mask is None else mask * d)
        zn = zz + noise * torch.randn_like(zz) if noise else zz
        loss = (vae.decode(to_vae_space(zn)).float() - x).abs().mean()
        if reg:
            loss = loss + reg * (zz - z0).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (z0 + (d if mask is None else mask * d)).detach()


def build_data(args, vae, tokenizer, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """Rendered, encoded (model-space latents, on `device`) and tokenized training set (ids on `device`), and
    statistics of the inversion. --invert-steps > 0: the new concept's latents are decoder inversions
    (invert_latents), over the whole latent (--invert-region image) or the object's latent box (object)."""
    images, captions, boxes = render_data(args.n_images, args.p_new, args.size, args.seed, args.workers)
    new = torch.tensor([concept.NEW_COLOUR in c.split() for c in captions])  # [N] the concept's scenes
    lat = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            x = torch.from_numpy(images[i:i + 256]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [B, 3, H, W]
            lat.append(to_model_space(vae.encode(x)).float())
    z = torch.cat(lat)  # [N, 16, h, w]
    stats: dict = {"concept_images": int(new.sum())}
    if args.invert_steps:
        t0 = time.time()
        idx = torch.nonzero(new).flatten()
        l1 = [0.0, 0.0]
        dz = 0.0
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda" and args.invert_bf16)
        keep = torch.ones(len(images), dtype=torch.bool)
        for i in range(0, len(idx), args.invert_batch):
            if args.invert_seconds and time.time() - t0 > args.invert_seconds:
                keep[idx[i:]] = False  # their encoder latents would teach red / green: leave them out
                print(f"inversion: --invert-seconds {args.invert_seconds} reached, {len(idx) - i} concept images "
                      "left out", flush=True)
                idx = idx[:i]
                break
            j = idx[i:i + args.invert_batch]
            x = torch.from_numpy(images[j.numpy()]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            mask = None
            if args.invert_region == "object":
                mask = torch.from_numpy(boxes[j.numpy()]).to(device)[:, None].float()  # [b, 1, h, w]
            zj = z[j.to(device)]
            with autocast:
                zi = invert_latents(vae, x, zj, args.invert_steps, args.invert_lr, mask, args.invert_reg,
                                    args.invert_noise)
            with torch.no_grad():  # the decoder error before / after, float32
                l1[0] += float((vae.decode(to_vae_space(zj)) - x).abs().mean()) * len(j)
                l1[1] += float((vae.decode(to_vae_space(zi)) - x).abs().mean()) * len(j)
                dz += float((zi - zj).pow(2).mean()) * len(j)
            z[j.to(device)] = zi
        if device.type == "cuda":
            torch.cuda.synchronize()
        k = max(len(idx), 1)
        z, captions = z[keep.to(device)], [c for c, kept in zip(captions, keep.tolist()) if kept]
        stats.update({"inverted": len(idx), "left_out": int((~keep).sum()), "invert_seconds": round(time.time() - t0, 1),
                      "decoder_l1_encoder": round(l1[0] / k, 5), "decoder_l1_inverted": round(l1[1] / k, 5), "latent_change_rms": round((dz / k) ** 0.5, 4)})
        print(f"inversion: {len(idx)} concept latents, {args.invert_steps} steps in {stats['invert_seconds']} s; "
              f"decoder L1 {stats['decoder_l1_encoder']:.4f} -> {stats['decoder_l1_inverted']:.4f}, "
              f"latent change rms {stats['latent_change_rms']}", flush=True)
    rows = [token_rows(tokenizer, c) for c in captions]
    ids = [torch.tensor([r[k] for r in rows], dtype=torch.long, device=device) for k in range(3)]  # 3 x [N, 77]
    return z, ids, stats


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


def load_init(params: list[tuple], path: Path) -> dict:
    """Copy `export`'s down / up tensors from `path` into the trainable parameters (names and shapes must match)
    -> the starting file's provenance for the new file's metadata (name, sha256, the command that made it)."""
    import hashlib

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        parent = json.loads((f.metadata() or {}).get("sd35fp8.lora", "{}"))
        for comp, name, _, down, up in params:
            stem = _KOHYA_PREFIX[comp] + name.replace(".", "_")
            for leaf, p in ((".lora_down.weight", down), (".lora_up.weight", up)):
                if stem + leaf not in keys:
                    raise InputError(f"{path}: no {stem + leaf} (--init needs a file this trainer wrote)")
                t = f.get_tensor(stem + leaf)
                if tuple(t.shape) != tuple(p.shape):
                    raise InputError(f"{path}: {stem + leaf} is {tuple(t.shape)}, the run's is {tuple(p.shape)} "
                                     f"(same --rank as the file?)")
                with torch.no_grad():
                    p.copy_(t.to(p.device, p.dtype))
    return {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "command": parent.get("command"), "init": parent.get("init")}


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
    ap.add_argument("--invert-steps", type=int, default=0, help="decoder-inversion steps for the new concept's "
                    "latents (0: the encoder's latents)")
    ap.add_argument("--invert-batch", type=int, default=256)
    ap.add_argument("--invert-lr", type=float, default=0.05, help="Adam lr of the inversion")
    ap.add_argument("--invert-region", choices=("object", "image"), default="image",
                    help="latent cells the inversion moves: the brown object's box (dilated) or the whole latent")
    ap.add_argument("--invert-reg", type=float, default=0.0, help="weight of mean((z - z_enc)^2) in the inversion")
    ap.add_argument("--invert-noise", type=float, default=0.0, help="std of the noise added to the latent "
                    "before each inversion decode (model space; robust inversions)")
    ap.add_argument("--invert-seconds", type=float, default=0.0, help="time limit of the inversion (0: none); the "
                    "concept images not inverted by then are left out of the data")
    ap.add_argument("--invert-bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bf16 autocast for the inversion on CUDA")
    ap.add_argument("--save-every", type=int, default=500, help="rewrite the file every N steps (0: at the end)")
    ap.add_argument("--init", type=Path, default=None, help="start from this file's down / up weights (a file this "
                    "trainer wrote, same rank), e.g. to fine-tune the shipped LoRA with --fp8-aware")
    ap.add_argument("--fp8-aware", choices=("off", "linears", "all"), default="off",
                    help="train around the FP8 'dynamic' engine's rounding (fp8/fake_quant.py, straight-through): "
                    "linears = FP8 weights and per-token e4m3 inputs; all = also e4m3 q, k, v in attention")
    ap.add_argument("--fp8-aware-p", type=float, default=1.0,
                    help="fraction of training steps that round (the others run the FP8 weights unrounded inputs)")
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
    latents, ids, data_stats = build_data(args, vae, tokenizer, device)
    data_s = time.time() - t0
    print(f"data: {latents.shape[0]} images rendered, encoded and tokenized in {data_s:.0f} s", flush=True)
    empty = [torch.tensor(r, dtype=torch.long, device=device)[None] for r in token_rows(tokenizer, "")]  # 3 x [1, 77]
    emulation = None
    if args.fp8_aware != "off":
        from ..checkpoints.fp8_load import load_mmdit_fp8
        from ..fp8.fake_quant import emulate_fp8

        fp8_model = load_mmdit_fp8(model, device="cpu", dtype=torch.float32, mode="dynamic")
        emulation = emulate_fp8(mmdit, fp8_model, attention=args.fp8_aware == "all")
        del fp8_model
    params = attach_trainable(lora_targets(mmdit, towers), args.rank, args.seed + 1)
    init_record = load_init(params, args.init) if args.init is not None else None
    trainable = [p for *_, d, u in params for p in (d, u)]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed + 2)  # on the device: no host copies per step
    cpu_gen = torch.Generator().manual_seed(args.seed + 3)  # host-side choices (--fp8-aware-p)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    n, b = latents.shape[0], args.batch
    state = {"step": 0}

    def step_fn() -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr_at(state["step"], args.steps, args.lr)
        idx = torch.randint(0, n, (b,), generator=gen, device=device)
        if emulation is not None and args.fp8_aware_p < 1.0:
            emulation.enabled = bool(torch.rand((), generator=cpu_gen) < args.fp8_aware_p)
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
               "data": data_stats,
               "train_seconds": round(train_s, 1), "steps_done": len(losses), "threads": torch.get_num_threads(),
               "seconds_per_step": round(train_s / max(len(losses), 1), 4),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "loss_per_100": [round(float(np.mean(losses[i:i + 100])), 5) for i in range(0, len(losses), 100)],
               "concept": {"word": concept.NEW_COLOUR, "rgb": list(concept.NEW_RGB)},
               "base_model": Path(model).name}
        if init_record is not None:
            rec["init"] = init_record
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
    if emulation is not None:
        emulation.remove()  # the models module's attention is global: restore it for the caller
    print(f"wrote {args.out} ({size / 2 ** 20:.2f} MiB), {len(losses)} steps in {train_s:.0f} s")
    return record


if __name__ == "__main__":
    main()
