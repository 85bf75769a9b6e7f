"""Train, ship and evaluate a ControlNet for the shipped tiny model: Canny edge map of a scene -> the image.

    nice python -m sd35fp8.tiny.train_controlnet --out FILE            # CPU, the default recipe
    python -m sd35fp8.tiny.train_controlnet --eval-only --out FILE      # the held-out evaluation alone

The shipped file (weights/sd35fp8_tiny_controlnet_canny.safetensors, 5.9 MiB) came from, on a shared
2-core CPU (35 min, one thread; its evaluation then ran alone, benchmarks/results/tiny_controlnet_eval.json):

    OMP_NUM_THREADS=1 nice python -m sd35fp8.tiny.train_controlnet --n-train 800 --steps 1000 --batch 16
    OMP_NUM_THREADS=1 nice python -m sd35fp8.tiny.train_controlnet --eval-only --eval-n 30 --eval-steps 12

The control image is ComfyUI's Canny node output (kornia canny, thresholds 0.4 / 0.8) of the rendered
scene, so the shipped ControlNet works behind the canny template's LoadImage -> Canny chain. The
network is the SD3.5 Large form (models/controlnet.py "sd35": single-stream blocks on the base's x
embedding) with 2 layers for the base's 3 joint blocks, written in Stability's key layout with
control_type 0 (the edge image goes through the VAE as 2a - 1; the "canny" type's a*255 transform
belongs to Stability's Large checkpoints). Training: the base model (MMDiT, VAE, text towers) frozen;
SD3 rectified flow (x_t = (1-s) x0 + s eps, target eps - x0, s = shift-3 of sigmoid(N(0,1)) as the
sampler's schedule), 10 % empty captions (the uncond pass gets the control too, as
ControlNetApplyAdvanced applies it to both), AdamW, zero-initialised pos_embed_input and outputs.

Evaluation (held-out world items, detector): a case passes when every object of the scene whose edges
were given is detected with its shape within its radius of its place. Reported for the base model
alone (no control), the ControlNet in float32/BF16, and base + ControlNet in FP8 (weight_only, the
CPU mode), written to benchmarks/results/tiny_controlnet_eval.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..image_ops import canny
from ..models.controlnet import ControlNet, ControlNetConfig, hint_latent
from ..models.vae import image_to_uint8, to_model_space, to_vae_space
from . import SHIPPED_CONTROLNET, detector, world

SIZE = 128
CANNY_LOW, CANNY_HIGH = 0.4, 0.8  # ComfyUI Canny node defaults
LAYERS = 2
SHIFT = 3.0
# Stability's file names for the embedders (checkpoints/controlnet.py reads them back)
_TO_STABILITY = {"t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
                 "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
                 "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
                 "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2"}


def edge_map(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> Canny edges IMAGE [N, H, W, 3] in {0, 1} (the Canny node's output)."""
    return canny(torch.from_numpy(images).float() / 255.0, CANNY_LOW, CANNY_HIGH)


def load_base(dtype: torch.dtype = torch.float32):
    from ..pipeline import SD35Pipeline

    pipe = SD35Pipeline.from_pretrained(None, device="cpu", dtype=dtype, fp8="none")  # the shipped model
    for m in (pipe.mmdit, pipe.vae):
        m.requires_grad_(False).eval()
    return pipe


def new_controlnet(base) -> ControlNet:
    cfg = base.config
    net = ControlNet(ControlNetConfig(kind="sd35", num_layers=LAYERS, hidden_size=cfg.hidden_size,
                                      num_heads=cfg.num_heads, pooled_dim=cfg.pooled_dim, control_type=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks.", "pos_embed_input.")):
                p.zero_()  # ControlNet zero init: starts as the base model
            elif p.ndim == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
        net.t_embedder.load_state_dict(base.t_embedder.state_dict())
        net.y_embedder.load_state_dict(base.y_embedder.state_dict())
    return net


def make_data(pipe, n: int, seed: int, batch: int = 256) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, "train") for _ in range(n)]
    captions = [world.caption(s, rng) for s in scenes]
    images = np.stack([world.render(s, SIZE) for s in scenes])  # [N, H, W, 3] uint8
    edges = edge_map(images)
    cn_cfg = ControlNetConfig(kind="sd35", num_layers=1, hidden_size=64, num_heads=1, pooled_dim=1, control_type=0)
    z, hints, ctx, pool = [], [], [], []
    with torch.no_grad():
        for i in range(0, n, batch):
            img = torch.from_numpy(images[i:i + batch]).float().movedim(-1, 1) / 127.5 - 1.0
            z.append(to_model_space(pipe.vae.encode(img).float()))
            hints.append(hint_latent(edges[i:i + batch].movedim(-1, 1), pipe.vae, cn_cfg))
            c, p = pipe.text_encoder.encode_prompts(captions[i:i + batch])
            ctx.append(c.float())
            pool.append(p.float())
        empty_ctx, empty_pool = pipe.text_encoder.encode_prompts([""])
    return {"z": torch.cat(z), "hint": torch.cat(hints), "ctx": torch.cat(ctx), "pool": torch.cat(pool),
            "empty_ctx": empty_ctx.float(), "empty_pool": empty_pool.float()}


def train(pipe, net: ControlNet, data: dict, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    base = pipe.mmdit
    base.batch_invariant = False
    net.batch_invariant = False
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n = data["z"].shape[0]
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, n, (batch,), generator=g)
        z0, hint = data["z"][idx], data["hint"][idx]
        ctx, pool = data["ctx"][idx].clone(), data["pool"][idx].clone()
        drop = torch.rand(batch, generator=g) < 0.1
        ctx[drop], pool[drop] = data["empty_ctx"], data["empty_pool"]
        t = torch.sigmoid(torch.randn(batch, generator=g))
        s = SHIFT * t / (1 + (SHIFT - 1) * t)  # [B]
        eps = torch.randn(z0.shape, generator=g)
        x = (1 - s.view(-1, 1, 1, 1)) * z0 + s.view(-1, 1, 1, 1) * eps
        control = net(x, s, ctx, pool, hint, base)
        v = base(x, s, ctx, pool, control=control)
        loss = F.mse_loss(v, eps - z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {np.mean(losses[-100:]):.4f}", flush=True)
    base.batch_invariant = True
    net.batch_invariant = True
    return losses


def save_stability_layout(net: ControlNet, path: Path) -> Path:
    sd = {}
    for k, v in net.state_dict().items():
        stem, _, param = k.rpartition(".")
        sd[f"{_TO_STABILITY.get(stem, stem)}.{param}"] = v.detach().float().contiguous()
    sd["control_type"] = torch.tensor([net.config.control_type], dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "sd35fp8": "tiny ControlNet (canny edges -> image)"})
    return path


def placed(image: np.ndarray, scene: world.Scene) -> bool:
    """Every object of the scene detected with its shape within its radius of its centre."""
    dets = detector.detect(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * SIZE, obj.y * SIZE, obj.radius * SIZE
        if not any(d.shape == obj.shape and math.hypot(d.centre[0] - cx, d.centre[1] - cy) <= r for d in dets):
            return False
    return True


def generate(pipe, net: ControlNet | None, items, seed: int, steps: int, cfg: float, dtype: torch.dtype):
    from ..control import ControlApply
    from ..sampling import CFGDenoiser, Conditioning, get_sigmas, noise_scaling, prepare_noise, sample

    sigmas = get_sigmas("normal", steps, shift=SHIFT)
    scenes = [it.scene for it in items]
    edges = edge_map(np.stack([world.render(s, SIZE) for s in scenes]))
    u_ctx, u_pool = pipe.text_encoder.encode_prompts([""])
    images = []
    for i, (it, edge) in enumerate(zip(items, edges)):
        ctx, pool = pipe.text_encoder.encode_prompts([it.caption])
        control = ControlApply(net, edge[None], 1.0, vae=pipe.vae) if net is not None else None
        den = CFGDenoiser(pipe.mmdit, Conditioning(ctx, pool, control=control),
                          Conditioning(u_ctx, u_pool, control=control), cfg=cfg, dtype=dtype)
        noise = prepare_noise(seed + i, (1, 16, SIZE // 8, SIZE // 8))
        x = noise_scaling(sigmas[0], noise, torch.zeros_like(noise))
        with torch.no_grad():
            z = sample("euler", den, x, sigmas, extra_args={"seed": seed + i}, disable=True)
            images += image_to_uint8(pipe.vae.decode(to_vae_space(z.float()).to(pipe.vae.dtype)).float())
    return images


def evaluate(controlnet_path: Path, n: int, seed: int, steps: int, cfg: float) -> dict:
    from ..checkpoints.controlnet import load_controlnet, quantize_controlnet
    from ..fp8.quantize import quantize_model

    items = world.eval_items(n, seed=seed, split="heldout")
    rows = {}
    for mode in ("no_control", "float32", "bf16", "fp8_weight_only"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        pipe = load_base(dtype)
        net = None if mode == "no_control" else load_controlnet(controlnet_path, dtype=dtype)
        if mode == "fp8_weight_only":
            quantize_model(pipe.mmdit, "weight_only")
            quantize_controlnet(net, "weight_only")
        t0 = time.time()
        images = generate(pipe, net, items, seed, steps, cfg, dtype)
        ok = [placed(img, it.scene) for img, it in zip(images, items)]
        rows[mode] = {"placed": float(np.mean(ok)), "n": len(ok), "seconds": round(time.time() - t0, 1)}
        print(f"{mode:16s} placed {rows[mode]['placed']:.3f} ({sum(ok)}/{len(ok)})", flush=True)
    return {"items": f"world.eval_items({n}, seed={seed}, split='heldout')", "sampler": "euler", "steps": steps,
            "cfg": cfg, "size": SIZE, "metric": "every object detected with its shape within its radius of its "
            "place in the scene whose Canny edges were the control", "results": rows,
            "fp8_vs_bf16_points": round(100 * (rows["fp8_weight_only"]["placed"] - rows["bf16"]["placed"]), 1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m sd35fp8.tiny.train_controlnet", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(SHIPPED_CONTROLNET), help="ControlNet file to write")
    p.add_argument("--n-train", type=int, default=4000, help="training scenes")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=100, help="held-out items (0: no evaluation)")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-cfg", type=float, default=4.0)
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--result", default="benchmarks/results/tiny_controlnet_eval.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    argv = sys.argv[1:] if argv is None else list(argv)
    record: dict = {"command": "python -m sd35fp8.tiny.train_controlnet " + " ".join(argv)}
    if args.eval_only and Path(args.result).exists():  # keep the training run's record beside the new evaluation
        old = json.loads(Path(args.result).read_text())
        record = {**{k: v for k, v in old.items() if k in ("command", "train")}, "eval_command": record["command"]}
    if not args.eval_only:
        t0 = time.time()
        pipe = load_base()
        data = make_data(pipe, args.n_train, args.seed)
        print(f"data: {args.n_train} scenes in {time.time() - t0:.0f} s", flush=True)
        net = new_controlnet(pipe.mmdit)
        losses = train(pipe, net, data, args.steps, args.batch, args.lr, args.seed)
        save_stability_layout(net, out)
        record["train"] = {"n_train": args.n_train, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                           "seconds": round(time.time() - t0, 1), "final_loss_100": float(np.mean(losses[-100:])),
                           "bytes": out.stat().st_size}
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", flush=True)
    if args.eval_n:
        record["eval"] = evaluate(out, args.eval_n, args.seed, args.eval_steps, args.eval_cfg)
        record["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        record["device"] = "cpu"
        record["torch"] = torch.__version__
        Path(args.result).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.result}")
    return record


if __name__ == "__main__":
    main()
