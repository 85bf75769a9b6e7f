"""One image on several processes / GPUs: CFG parallel x Ulysses sequence parallel (torch.distributed).

    dist.init_process_group("nccl")                  # torchrun: one process per GPU (gloo on the CPU)
    pipe.mmdit = ParallelMMDiT(pipe.mmdit, cfg=2)    # world = cfg x sp; every rank runs the same sampler
    image = pipe(prompt, seed=...)                   # same noise on every rank; decode on one rank only

Every rank runs the whole sampling loop with the same seed (the sampler state is tiny and identical);
only the MMDiT call is split, xDiT's layout for SD3:
- CFG parallel (`cfg` = 2): the [cond ; uncond] batch the guidance sends is split by rows; rank group
  r computes its half; one all-gather of the velocity per step. An odd batch (cfg 1, a cond-only
  skip-layer pass) is computed whole by both groups (no exchange; the halves of the GPUs idle in effect).
- Sequence parallel (`sp` = world / cfg): the image tokens are split into `sp` contiguous chunks; the
  ~154 text tokens stay whole on every rank (their projections are recomputed, cheaper than sending
  them). Attention is Ulysses: an all-to-all turns q/k/v from [B, Lx/sp, H, D] into [B, Lx, H/sp, D]
  (every image token, a slice of the heads); the text tokens' q/k/v are sliced to the same heads
  locally; after attention a second all-to-all brings the image tokens back and an all-gather over the
  heads gives the text stream all of its heads. The final layer runs on the chunk; one all-gather of
  the velocity. Needs image tokens % sp == 0; heads not divisible by sp are padded with zero heads
  (38 heads on 4 ranks: 40, 5 % more attention work).
The MMDiT's modules are used as they are (no hook in models/mmdit.py): `JointBlock` is re-run here
with the distributed attention (sp_joint_block), the same arithmetic in the same order.

Equality with one process: the same math; only GEMM row counts change (fewer tokens or rows per
rank), so float32 results differ by rounding (velocity within 1e-4 relative on CPU; images within a
few uint8 levels after a sampling run, tests/test_scale_parallel.py).

VAE decode: every rank ends with the whole latent (the velocity is all-gathered each step), so the
decode needs no transfer at all; rank 0 (`is_decoder`) keeps the image. The pipeline still decodes on
every rank (a skip for the other ranks needs a hook in the generation core: not done).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sd35fp8.errors import InputError
from sd35fp8.models.mmdit import MMDiT, batched, layer_norm, modulate, per_image, per_row

log = logging.getLogger(__name__)


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Split x into world chunks along scatter_dim, send chunk i to rank i, concatenate what comes back
    along gather_dim (Ulysses' exchange)."""
    world = dist.get_world_size(group)
    ins = [t.contiguous() for t in x.chunk(world, dim=scatter_dim)]
    outs = [torch.empty_like(t) for t in ins]
    if not _NO_ALLTOALL:
        try:
            dist.all_to_all(outs, ins, group=group)
            return torch.cat(outs, dim=gather_dim)
        except RuntimeError as e:  # gloo before torch 2.13: "Backend gloo does not support alltoall"
            if "alltoall" not in str(e):
                raise
            _NO_ALLTOALL.append(str(e))
            log.info("all_to_all unsupported here (%s): exchanging through all_gather", e)
    # every rank gathers every rank's chunks and keeps those addressed to it (world x the traffic:
    # the CPU test path only; NCCL has all_to_all)
    gathered = [torch.empty_like(torch.stack(ins)) for _ in range(world)]
    dist.all_gather(gathered, torch.stack(ins), group=group)
    rank = dist.get_rank(group)
    return torch.cat([g[rank] for g in gathered], dim=gather_dim)


_NO_ALLTOALL: list[str] = []  # set once the backend said it has no all_to_all


def _all_gather(x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    outs = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(outs, x.contiguous(), group=group)
    return torch.cat(outs, dim=dim)


def ulysses_attention(qc: torch.Tensor | None, kc: torch.Tensor | None, vc: torch.Tensor | None,
                      qx: torch.Tensor, kx: torch.Tensor, vx: torch.Tensor,
                      group: dist.ProcessGroup) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Joint attention over [text ; image] with the image tokens split over `group`.

    qc, kc, vc: [B, Lc, H, D] (whole, the same on every rank; None: image-only attention);
    qx, kx, vx: [B, Lx/sp, H, D] (this rank's chunk). Returns (text [B, Lc, H*D] or None, image
    [B, Lx/sp, H*D]), as models.mmdit.attention over the unsplit sequence would.
    """
    sp, rank = dist.get_world_size(group), dist.get_rank(group)
    B, lx, H, D = qx.shape
    pad = -H % sp  # heads not divisible by sp (Large: 38 heads on 4 ranks): zero heads, dropped after
    if pad:
        qx, kx, vx = (_pad_heads(t, pad) for t in (qx, kx, vx))
        if qc is not None:
            qc, kc, vc = (_pad_heads(t, pad) for t in (qc, kc, vc))
    h = (H + pad) // sp
    q, k, v = (_all_to_all(t, scatter_dim=2, gather_dim=1, group=group) for t in (qx, kx, vx))  # [B, Lx, h, D]
    if qc is not None:
        heads = slice(rank * h, (rank + 1) * h)
        q, k, v = (torch.cat([c[:, :, heads], t], 1) for c, t in ((qc, q), (kc, k), (vc, v)))  # [B, Lc+Lx, h, D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, h, L, D]
    out = out.transpose(1, 2)  # [B, L, h, D]
    n_ctx = 0 if qc is None else qc.shape[1]
    x_out = _all_to_all(out[:, n_ctx:], scatter_dim=1, gather_dim=2, group=group)  # [B, Lx/sp, H+pad, D]
    x_out = x_out[:, :, :H].reshape(B, lx, H * D)
    if qc is None:
        return None, x_out
    c_out = _all_gather(out[:, :n_ctx], dim=2, group=group)[:, :, :H]  # [B, Lc, H, D]: every head of the text
    return c_out.reshape(B, n_ctx, H * D), x_out


def _pad_heads(t: torch.Tensor, pad: int) -> torch.Tensor:
    """[B, L, H, D] -> [B, L, H+pad, D] with zero heads (zero q, k, v: their output is zero and dropped)."""
    return torch.cat([t, t.new_zeros(*t.shape[:2], pad, t.shape[3])], 2)


def sp_joint_block(block: nn.Module, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor, vec,
                   group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """models.mmdit.JointBlock.forward with x = this rank's image-token chunk [B, Lx/sp, C]."""
    cb, xb = block.context_block, block.x_block
    c_mods = vec(cb.adaLN_modulation, c).chunk(cb.n_mods, dim=1)  # each [B, C]
    qc, kc, vc = cb.attn.qkv_heads(modulate(layer_norm(context), c_mods[0], c_mods[1]))  # [B, Lc, H, D]
    x_mods = vec(xb.adaLN_modulation, c).chunk(xb.n_mods, dim=1)
    x_norm = layer_norm(x)
    qx, kx, vx = xb.attn.qkv_heads(modulate(x_norm, x_mods[0], x_mods[1]))  # [B, Lx/sp, H, D]
    c_attn, x_attn = ulysses_attention(qc, kc, vc, qx, kx, vx, group)

    if not cb.pre_only:
        context = torch.addcmul(context, c_mods[2].unsqueeze(1), cb.attn.proj(c_attn))
        context = torch.addcmul(context, c_mods[5].unsqueeze(1),
                                cb.mlp(modulate(layer_norm(context), c_mods[3], c_mods[4])))
    x = torch.addcmul(x, x_mods[2].unsqueeze(1), xb.attn.proj(x_attn))
    if xb.attn2 is not None:
        q2, k2, v2 = xb.attn2.qkv_heads(modulate(x_norm, x_mods[6], x_mods[7]))
        _, x_attn2 = ulysses_attention(None, None, None, q2, k2, v2, group)
        x = torch.addcmul(x, x_mods[8].unsqueeze(1), xb.attn2.proj(x_attn2))
    x = torch.addcmul(x, x_mods[5].unsqueeze(1), xb.mlp(modulate(layer_norm(x), x_mods[3], x_mods[4])))
    return context, x


def make_groups(cfg: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup, int, int]:
    """Ranks as a [cfg, sp] grid: (this rank's cfg group, its sp group, cfg index, sp index).
    Every rank must call this (new_group is collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if cfg not in (1, 2) or world % cfg:
        raise InputError(f"cfg parallel degree must be 1 or 2 and divide the world size {world}, got {cfg}")
    sp = world // cfg
    cfg_group = sp_group = None
    for s in range(sp):  # ranks with the same sp index: the cfg pair
        g = dist.new_group([c * sp + s for c in range(cfg)])
        if rank % sp == s:
            cfg_group = g
    for ci in range(cfg):  # ranks with the same cfg index: one sequence-parallel group
        g = dist.new_group([ci * sp + s for s in range(sp)])
        if rank // sp == ci:
            sp_group = g
    return cfg_group, sp_group, rank // sp, rank % sp


class ParallelMMDiT(nn.Module):
    """MMDiT's forward contract over `world = cfg x sp` processes (call it on every rank, same inputs)."""

    def __init__(self, mmdit: nn.Module, cfg: int = 1, groups: tuple | None = None):
        """groups: make_groups(cfg)'s result, made once (a server wraps every model it loads: new_group is
        collective and groups are never freed); None: made here."""
        super().__init__()
        if not dist.is_initialized():
            raise InputError("ParallelMMDiT needs torch.distributed initialised (torchrun, or init_process_group)")
        if not isinstance(mmdit, MMDiT):  # an engine (sd35fp8.fast.build_engine): its .model is the MMDiT
            mmdit = mmdit.model
        if not isinstance(mmdit, MMDiT):
            raise InputError(f"ParallelMMDiT needs an MMDiT or an engine over one, got {type(mmdit).__name__}")
        self.model = mmdit
        self.config = mmdit.config
        self.cfg = cfg
        self.cfg_group, self.sp_group, self.cfg_index, self.sp_index = groups if groups is not None else make_groups(cfg)
        self.sp = dist.get_world_size(self.sp_group)
        self.is_decoder = dist.get_rank() == 0

    def describe(self) -> str:
        return f"parallel MMDiT: cfg {self.cfg} x sequence {self.sp} over {dist.get_world_size()} ranks"

    def warmup(self, shapes, **_kwargs) -> float:
        """The engine's warm-up contract: nothing to compile or capture (the parallel forward runs eager)."""
        return 0.0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: Sequence[int] = (), control=None) -> torch.Tensor:
        if control is not None:
            raise InputError("ControlNet is not supported on several GPUs per image (--gpus-per-image); "
                             "run it on one process")
        m = self.model
        m.check_inputs(x, context, pooled, skip_layers)
        B = x.shape[0]
        # an odd batch (cfg 1: no uncond rows; a cond-only skip-layer pass) is not split by rows: both
        # cfg groups compute it whole, each over its own sequence-parallel group (same result, no exchange)
        if self.cfg > 1 and B % self.cfg == 0:
            rows = slice(self.cfg_index * B // self.cfg, (self.cfg_index + 1) * B // self.cfg)
            x, sigma, context, pooled = x[rows], sigma.reshape(-1).expand(B)[rows], context[rows], pooled[rows]
            v = self._forward_sp(x, sigma, context, pooled, skip_layers)  # [B/cfg, 16, h, w]
            return _all_gather(v, 0, self.cfg_group)
        return self._forward_sp(x, sigma, context, pooled, skip_layers)

    def _forward_sp(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                    skip_layers: Sequence[int]) -> torch.Tensor:
        m, cfg = self.model, self.config
        B, _, h, w = x.shape
        p = cfg.patch_size
        hp, wp = h // p, w // p
        if (hp * wp) % self.sp:
            raise InputError(f"sequence parallel over {self.sp} ranks needs the image tokens ({hp}x{wp}) "
                             f"divisible by {self.sp}")
        dtype = m.x_embedder.proj.weight.dtype
        t = (sigma.reshape(-1) * 1000).expand(B)
        vec, img = (per_row, per_image) if m.batch_invariant else (batched, batched)
        tokens = img(m.x_embedder, x.to(dtype)) + m.cropped_pos_embed(hp, wp).to(dtype)  # [B, hp*wp, C]
        tokens = tokens.chunk(self.sp, dim=1)[self.sp_index]  # [B, hp*wp/sp, C]
        c = vec(lambda ti, yi: m.t_embedder(ti, dtype) + m.y_embedder(yi.to(dtype)), t, pooled)  # [B, C]
        ctx = m.context_embedder(context.to(dtype))  # [B, L, C]
        skip = frozenset(skip_layers)
        for i, block in enumerate(m.joint_blocks):
            if i not in skip:
                ctx, tokens = sp_joint_block(block, ctx, tokens, c, vec, self.sp_group)
        out = _all_gather(m.final_layer(tokens, c, vec), 1, self.sp_group)  # [B, hp*wp, p*p*out]
        out = out.view(B, hp, wp, p, p, cfg.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(B, cfg.out_channels, hp * p, wp * p)
        return out.to(x.dtype)


def main(argv: list[str] | None = None) -> int:
    """torchrun --nproc-per-node K -m sd35fp8.scale.parallel MODEL PROMPT [--cfg-parallel 2] ...:
    one image on K processes (GPUs: nccl, one per local rank; CPU: gloo); rank 0 saves it."""
    import os

    from sd35fp8.pipeline import SD35Pipeline

    ap = argparse.ArgumentParser(prog="python -m sd35fp8.scale.parallel")
    ap.add_argument("model")
    ap.add_argument("prompt")
    ap.add_argument("--negative", default="")
    ap.add_argument("--cfg-parallel", type=int, default=2, choices=(1, 2))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="parallel.png")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        pipe = SD35Pipeline.from_pretrained(args.model, device=device, compile=False)
        pipe.mmdit = ParallelMMDiT(pipe.mmdit, cfg=args.cfg_parallel)
        kw = {k: v for k, v in (("num_inference_steps", args.steps), ("guidance_scale", args.cfg), ("width", args.size),
                                ("height", args.size)) if v is not None}
        out = pipe(args.prompt, negative_prompt=args.negative, seed=args.seed, progress=False, **kw)
        if pipe.mmdit.is_decoder:
            out.images[0].save(args.output)
            print(f"{pipe.mmdit.describe()}: saved {args.output}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
