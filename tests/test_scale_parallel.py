"""One image over several processes (scale/parallel.py): CFG parallel and Ulysses sequence parallel with gloo.

Each case spawns the processes on the CPU (gloo); every rank also computes the one-process result and
the rank-0 differences come back. Tolerances (float32, only GEMM row counts differ between the layouts):
- tiny random MMDiT-X config (2 heads; 3 ranks pads them to 3): velocity within VEL_TOL (max |diff| / max |v|);
- the shipped model (3 heads: sp 2 pads them to 4) through SD35Pipeline (64x64, 4 euler steps, cfg 4): images within IMG_TOL uint8 levels.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_
from sd35fp8.scale.parallel import ParallelMMDiT
from sd35fp8.tiny import SHIPPED_CHECKPOINT

VEL_TOL = 1e-5
IMG_TOL = 2


def _init(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


def _tiny_case(rank: int, world: int, store: str, cfg: int, out: str) -> None:
    _init(rank, world, store)
    try:
        torch.manual_seed(0)
        model = init_random_(MMDiT(MMDiTConfig.tiny()), torch.Generator().manual_seed(1)).eval()
        g = torch.Generator().manual_seed(2)
        x = torch.randn(4, 16, 8, 12, generator=g)  # [2 cond ; 2 uncond], 24 image tokens
        sigma = torch.rand(4, generator=g)
        ctx, pooled = torch.randn(4, 7, 64, generator=g), torch.randn(4, 32, generator=g)
        with torch.no_grad():
            want = model(x, sigma, ctx, pooled)
            got = ParallelMMDiT(model, cfg=cfg)(x, sigma, ctx, pooled)
            got_skip = ParallelMMDiT(model, cfg=cfg)(x, sigma, ctx, pooled, skip_layers=(0,))
            want_skip = model(x, sigma, ctx, pooled, skip_layers=(0,))
        rel = max(float((got - want).abs().max() / want.abs().max()),
                  float((got_skip - want_skip).abs().max() / want_skip.abs().max()))
        if rank == 0:
            torch.save({"rel": rel, "shape": tuple(got.shape)}, out)
    finally:
        dist.destroy_process_group()


def _shipped_case(rank: int, world: int, store: str, cfgs: tuple, out: str) -> None:
    from sd35fp8.pipeline import SD35Pipeline

    _init(rank, world, store)
    try:
        pipe = SD35Pipeline.from_pretrained(str(SHIPPED_CHECKPOINT), device="cpu", compile=False)
        kw = dict(negative_prompt="blurry", num_inference_steps=4, guidance_scale=4.0, width=64, height=64,
                  seed=3, sampler="euler", progress=False)
        want = np.asarray(pipe("a red cube left of a blue ball", **kw).images[0]).astype(int)
        model, diffs = pipe.mmdit, {}
        for cfg in cfgs:
            pipe.mmdit = ParallelMMDiT(model, cfg=cfg)
            got = np.asarray(pipe("a red cube left of a blue ball", **kw).images[0]).astype(int)
            diffs[cfg] = {"max": int(np.abs(got - want).max()), "mean": float(np.abs(got - want).mean())}
        if rank == 0:
            torch.save(diffs, out)
    finally:
        dist.destroy_process_group()


def run(fn, world: int, cfg: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.pt")
        mp.spawn(fn, args=(world, os.path.join(d, "store"), cfg, out), nprocs=world, join=True)
        return torch.load(out)


@pytest.mark.parametrize("world,cfg", [(2, 2), (2, 1), (4, 2), (3, 1)], ids=["cfg2", "sp2", "cfg2xsp2", "sp3-padded-heads"])
def test_tiny_parallel_velocity_equals_one_process(world, cfg):
    r = run(_tiny_case, world, cfg)
    assert r["shape"] == (4, 16, 8, 12)
    assert r["rel"] <= VEL_TOL, r


@pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
def test_shipped_parallel_image_equals_one_process():
    """cfg 2 (CFG parallel) and cfg 1 (sequence parallel 2, 3 heads padded to 4) on 2 processes."""
    r = run(_shipped_case, 2, (2, 1))
    assert all(d["max"] <= IMG_TOL for d in r.values()), r


@pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
def test_readme_torchrun_command(tmp_path):
    """The README's torchrun line, with the shipped model for model.safetensors, on 2 CPU processes."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("torchrun ") and "sd35fp8.scale.parallel" in ln]
    argv = [str(SHIPPED_CHECKPOINT) if a == "model.safetensors" else a for a in shlex.split(line)]
    argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]  # torchrun = this python's torch.distributed.run
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cfg 2 x sequence 1 over 2 ranks" in proc.stdout
    from PIL import Image

    assert Image.open(tmp_path / "parallel.png").size == (128, 128)
