"""ControlNet residuals on the engine (fast/step.py MMDiTEngine.forward(control=)): the fused step adds
each joint block's residual to the x stream as MMDiT.forward does, on every offload road; CUDA graphs
key on which blocks get a residual (the residuals are graph inputs)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from sd35fp8.errors import InputError
from sd35fp8.fast import build_engine
from sd35fp8.fast.graphs import GraphCache
from sd35fp8.fp8 import quantize_model
from sd35fp8.models.controlnet import ControlNet, ControlNetConfig
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

CUDA = torch.cuda.is_available()
TINY_X = MMDiTConfig.tiny()  # MMDiT-X (attn2 in block 0)
TINY = dataclasses.replace(TINY_X, depth=3, x_block_self_attn_layers=())


def _model(cfg: MMDiTConfig, seed: int = 0) -> MMDiT:
    return init_random_(MMDiT(cfg), torch.Generator().manual_seed(seed)).eval().requires_grad_(False)


def _inputs(cfg: MMDiTConfig, batch: int = 2, device="cpu"):
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(batch, cfg.in_channels, 16, 12, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 21, cfg.context_dim, generator=g), torch.randn(batch, cfg.pooled_dim, generator=g))
    return tuple(a.to(device) for a in args)


def _residuals(cfg: MMDiTConfig, batch: int = 2, missing: int = 1, device="cpu") -> list:
    """One residual [B, hp*wp, C] per joint block, None at block `missing` (a ControlNet shorter than the base)."""
    g = torch.Generator().manual_seed(2)
    tokens = (16 // cfg.patch_size) * (12 // cfg.patch_size)
    return [None if i == missing else torch.randn(batch, tokens, cfg.hidden_size, generator=g).to(device)
            for i in range(cfg.depth)]


@pytest.mark.parametrize("cfg", [TINY_X, TINY], ids=["mmdit-x", "mmdit"])
@pytest.mark.parametrize("offload", ["none", "model", "sequential"])
def test_engine_control_equals_mmdit_control(cfg, offload):
    model = _model(cfg)
    args, control = _inputs(cfg), _residuals(cfg)
    with torch.no_grad():
        ref = model(*args, control=control)
        ref_skip = model(*args, skip_layers=(0,), control=control)
        plain = model(*args)
        engine = build_engine(model, "cpu", offload=offload)
        out = engine(*args, control=control)
        out_skip = engine(*args, skip_layers=(0,), control=control)
        out_none = engine(*args, control=[None] * cfg.depth)
    assert not torch.allclose(ref, plain, atol=1e-3)  # the residuals matter
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (out - ref).abs().max()
    assert torch.allclose(out_skip, ref_skip, rtol=1e-4, atol=1e-5)  # a skipped block adds nothing
    assert torch.allclose(out_none, plain, rtol=1e-4, atol=1e-5)


def test_engine_control_from_a_controlnet_fp8_weight_only():
    """A real ControlNet's residuals (models/controlnet.py) on an FP8 weight-only engine: same as the
    plain MMDiT forward over the same FP8 weights."""
    cfg = TINY
    model = _model(cfg)
    quantize_model(model, "weight_only")
    net = ControlNet(ControlNetConfig(kind="sd35", num_layers=2, hidden_size=cfg.hidden_size,
                                      num_heads=cfg.num_heads, pooled_dim=cfg.pooled_dim, control_type=0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x, sigma, context, pooled = _inputs(cfg)
    hint = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        control = net(x, sigma, context, pooled, hint, model)
        assert len(control) == cfg.depth and any(r is not None for r in control)
        ref = model(x, sigma, context, pooled, control=control)
        engine = build_engine(copy.deepcopy(model), "cpu")
        assert engine.fp8_mode == "weight_only"
        out = engine(x, sigma, context, pooled, control=control)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), (out - ref).abs().max()


def test_engine_control_is_checked_like_mmdit():
    cfg = TINY
    engine = build_engine(_model(cfg), "cpu")
    args = _inputs(cfg)
    with pytest.raises(InputError, match="one residual"):
        engine(*args, control=_residuals(cfg)[:2])
    bad = _residuals(cfg)
    bad[0] = bad[0][:, :5]
    with pytest.raises(InputError, match="control residuals"):
        engine(*args, control=bad)


def test_graph_cache_keys_on_the_control_blocks():
    """The key of a call with residuals differs from the plain call's and names the blocks given one;
    the captured function is called with the control list rebuilt in block order."""
    t = (torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4, 5), torch.zeros(2, 6))
    r = torch.ones(2, 7)
    assert GraphCache.key(t, ()) != GraphCache.key(t + (r,), (), (0,))
    assert GraphCache.key(t + (r,), (), (0,)) != GraphCache.key(t + (r,), (), (2,))
    seen = {}

    def fn(x, sigma, context, pooled, skip, control=None):
        seen["control"] = control
        return x

    GraphCache._call(fn, t + (r,), (), (2,), 3)
    assert seen["control"][:2] == [None, None] and seen["control"][2] is r
    GraphCache._call(fn, t, (), (), 0)
    assert seen["control"] is None


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need CUDA")
def test_gpu_graphs_replay_with_control():
    cfg = TINY_X
    model = _model(cfg).to("cuda")
    args, control = _inputs(cfg, device="cuda"), _residuals(cfg, device="cuda")
    with torch.no_grad():
        eager = build_engine(copy.deepcopy(model), "cuda", cuda_graphs=False)
        engine = build_engine(model, "cuda")
        assert engine.graphs is not None
        plain = engine(*args)
        out = engine(*args, control=control)
        other = [None if r is None else 2 * r for r in control]
        out2 = engine(*args, control=other)  # same graph, new residuals copied in
        assert len(engine.graphs.graphs) == 2
        assert torch.equal(out, eager(*args, control=control)) and torch.equal(out2, eager(*args, control=other))
        assert torch.equal(plain, eager(*args)) and not torch.equal(plain, out)
