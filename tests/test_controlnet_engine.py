"""The ControlNet on the engine road (fast/controlnet.py ControlNetEngine) and one ControlNet call over the
batched CFG rows (sampling/guidance.py control_residuals): same results as the eager net, rows batched bit
for bit as rows alone (CPU, float32, tiny random nets)."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from test_control_apply import StubVAE  # a fixed random 8x8 patch projection

from sd35fp8.checkpoints.controlnet import quantize_controlnet
from sd35fp8.control import ControlApply, add_residuals
from sd35fp8.fast import build_engine
from sd35fp8.fast.controlnet import _ENGINES, ControlNetEngine, controlnet_engine
from sd35fp8.fast.graphs import GraphCache
from sd35fp8.fp8 import quantize_model
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.controlnet import ControlNet, ControlNetConfig
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_
from sd35fp8.sampling.guidance import CFGDenoiser, Conditioning
from sd35fp8.sampling.model_sampling import FlowMatching

# test_mmdit's "mmdit_qknorm" (that module needs diffusers; this one runs without it, e.g. on the GPU machine)
BASE = MMDiTConfig(depth=3, hidden_size=192, num_heads=3, pos_embed_max_size=8, context_dim=64, pooled_dim=32,
                   qk_norm=True)


def build(cfg: MMDiTConfig, seed: int = 0) -> MMDiT:
    return init_random_(MMDiT(cfg), torch.Generator().manual_seed(seed)).eval()


def inputs(cfg: MMDiTConfig, h: int, w: int, batch: int = 2, ctx_len: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, h, w, generator=g), torch.tensor([0.93, 0.31])[:batch],
            torch.randn(batch, ctx_len, cfg.context_dim, generator=g), torch.randn(batch, cfg.pooled_dim, generator=g))




def make_net(kind: str, seed: int = 1, layers: int = 2) -> ControlNet:
    common = dict(num_layers=layers, hidden_size=BASE.hidden_size, num_heads=BASE.num_heads,
                  pooled_dim=BASE.pooled_dim)
    if kind == "sd35":
        cfg = ControlNetConfig(kind="sd35", control_type=1, **common)
    else:  # InstantX layout with qk-norm and an MMDiT-X self-attention in layer 0
        cfg = ControlNetConfig(kind="joint", context_dim=BASE.context_dim, pos_embed_max_size=BASE.pos_embed_max_size,
                               qk_norm=True, x_block_self_attn_layers=(0,), **common)
    net = ControlNet(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("ln_q.weight", "ln_k.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.ndim > 1 else 20))
    return net.eval().requires_grad_(False)


def base_and_engine(mode: str | None):
    model = build(BASE).requires_grad_(False)
    if mode is not None:
        quantize_model(model, mode)
    return model, build_engine(copy.deepcopy(model), "cpu")


@pytest.mark.parametrize("kind", ["sd35", "joint"])
@pytest.mark.parametrize("mode", [None, "weight_only", "dynamic"])
def test_engine_outputs_match_the_eager_net(kind, mode):
    model, engine = base_and_engine(mode)
    net = make_net(kind)
    if mode is not None:
        quantize_controlnet(net, mode)
    x, sigma, context, pooled = inputs(BASE, 8, 6)
    hint = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = net.layer_outputs(x, sigma, context, pooled, hint, model)
        cn = controlnet_engine(net, engine)
        assert isinstance(cn, ControlNetEngine) and cn.fp8_mode == mode
        got = cn.layer_outputs(x, sigma, context, pooled, hint)
        control = cn(x, sigma, context, pooled, hint, strength=0.5)
        eager_control = net(x, sigma, context, pooled, hint, model, strength=0.5)
    assert len(got) == len(ref) == 2
    for a, b in zip(got, ref):
        if mode == "dynamic":  # fused per-token quantisation vs FP8Linear's: same scales, fp32 rounding apart
            assert sqnr(b, a) > 40, sqnr(b, a)
        else:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()
    assert [c is None for c in control] == [c is None for c in eager_control]
    present = [c for c in control if c is not None]
    assert len({id(c) for c in present}) == len(set(net.config.block_map(BASE.depth)) - {None})  # shared per layer


@pytest.mark.parametrize("kind", ["sd35", "joint"])
@pytest.mark.parametrize("mode", [None, "dynamic"])
def test_engine_rows_batched_equal_rows_alone(kind, mode):
    _, engine = base_and_engine(mode)
    net = make_net(kind)
    if mode is not None:
        quantize_controlnet(net, mode)
    # 16 x 12 latent (48 tokens a row) and 21 context tokens, as test_engine's batch test: with 12 image or 7
    # context tokens MKL's GEMM rounds M and 2M apart, for the eager net, the engine and the base alike (1e-6)
    x, sigma, context, pooled = inputs(BASE, 16, 12, batch=2, ctx_len=21)
    x, sigma = torch.cat([x[:1], x[:1]]), torch.cat([sigma[:1], sigma[:1]])  # a CFG pair: same x, other conds
    hint = torch.randn(1, 16, 16, 12, generator=torch.Generator().manual_seed(4))
    cn = controlnet_engine(net, engine)
    both = cn.layer_outputs(x, sigma, context, pooled, hint)
    for i in range(2):
        alone = cn.layer_outputs(x[i:i + 1], sigma[i:i + 1], context[i:i + 1], pooled[i:i + 1], hint)
        for a, b in zip(both, alone):
            assert torch.equal(a[i:i + 1], b), (i, (a[i:i + 1] - b).abs().max())


@pytest.mark.parametrize("mode", [None, "dynamic"])
def test_cfg_runs_a_shared_control_once_over_both_rows(mode, monkeypatch):
    """cond and uncond sharing one ControlApply: one ControlNet call over the 2 rows (chunks=2), the step
    bit for bit what the per-conditioning calls give; the engine road uses the ControlNetEngine."""
    _, engine = base_and_engine(mode)
    net = make_net("sd35")
    if mode is not None:
        quantize_controlnet(net, mode)
    image = torch.rand(1, 128, 96, 3, generator=torch.Generator().manual_seed(3))
    ctl = ControlApply(net, image, strength=0.8, vae=StubVAE())
    x, sigma, context, pooled = inputs(BASE, 16, 12, batch=2, ctx_len=21)  # (see above)
    x, sigma = x[:1], sigma[:1]
    ms = FlowMatching(3.0)
    d = CFGDenoiser(engine, Conditioning(context[:1], pooled[:1], control=ctl),
                    Conditioning(context[1:], pooled[1:], control=ctl), cfg=4.0, model_sampling=ms)
    calls = []
    real = ControlApply.__call__

    def spy(self, x, *args, **kwargs):
        calls.append((x.shape[0], kwargs.get("chunks", 1)))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(ControlApply, "__call__", spy)
    with torch.no_grad():
        merged = d(x, sigma)
        assert calls == [(2, 2)]
        monkeypatch.setattr(ControlApply, "batches_rows", False)
        calls.clear()
        separate = d(x, sigma)
        assert calls == [(1, 1), (1, 1)]
    assert torch.equal(merged, separate), (merged - separate).abs().max()
    assert engine in _ENGINES[net]


def test_chunks_broadcast_the_hint_per_conditioning():
    """A 2-image hint over a CFG call of 2 x 2 rows: each conditioning's rows get images 0, 1 (ComfyUI)."""
    model, engine = base_and_engine(None)
    net = make_net("sd35")
    image = torch.rand(2, 128, 96, 3, generator=torch.Generator().manual_seed(3))
    ctl = ControlApply(net, image, vae=StubVAE())
    x, sigma, context, pooled = inputs(BASE, 16, 12, batch=2, ctx_len=21)
    ms = FlowMatching(3.0)
    xx, ss = torch.cat([x, x]), torch.cat([sigma, sigma])
    cc, pp = torch.cat([context, context.flip(0)]), torch.cat([pooled, pooled.flip(0)])
    with torch.no_grad():
        both = ctl(xx, ss, cc, pp, engine, ms, chunks=2)
        first = ctl(xx[:2], ss[:2], cc[:2], pp[:2], engine, ms)
        second = ctl(xx[2:], ss[2:], cc[2:], pp[2:], engine, ms)
    for b, f, s in zip(both, first, second):
        assert torch.equal(b, torch.cat([f, s]))


def test_engine_cache_follows_the_net_and_the_base():
    _, engine = base_and_engine(None)
    net = make_net("sd35")
    cn = controlnet_engine(net, engine)
    assert controlnet_engine(net, engine) is cn
    assert len(_ENGINES[net]) == 1
    del engine, cn
    gc.collect()
    assert len(_ENGINES[net]) == 0  # the base engine went: its ControlNet engine too
    n = len(_ENGINES)
    del net
    gc.collect()
    assert len(_ENGINES) == n - 1


def test_shared_residuals_stay_shared():
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    summed = add_residuals([a, a, None], [b, b, b])
    assert summed[0] is summed[1] and torch.equal(summed[0], a + b) and summed[2] is b
    where, uniq = GraphCache.residual_inputs([a, a, None, b])
    assert where == ((0, 0), (1, 0), (3, 1)) and len(uniq) == 2 and uniq[0] is a
    t = (torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    seen = {}

    def fn(x, sigma, context, pooled, skip, control=None):
        seen["control"] = control
        return x

    GraphCache._call(fn, t + (a, b), (), where, 4)
    assert seen["control"][0] is seen["control"][1] is a and seen["control"][2] is None and seen["control"][3] is b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the Triton kernels need CUDA")
@pytest.mark.parametrize("mode", [None, "dynamic"])
def test_gpu_fused_controlnet_graphs(mode):
    """On CUDA: the graph replays the eager fused ControlNet bit for bit, rows batched equal rows alone, and
    the residuals stay close to the eager float32 net (FP8: linears and attention)."""
    model = build(BASE).requires_grad_(False)
    net = make_net("sd35")
    ref_model, ref_net = copy.deepcopy(model).cuda(), copy.deepcopy(net).cuda()
    model, net = model.to("cuda", torch.bfloat16), net.to("cuda", torch.bfloat16)
    if mode is not None:
        quantize_model(model, mode)
        quantize_controlnet(net, mode)
    engine = build_engine(model, "cuda")
    cn = controlnet_engine(net, engine)
    assert cn.graphs is not None
    x, sigma, context, pooled = (t.cuda() for t in inputs(BASE, 16, 12, batch=2, ctx_len=21))
    x, sigma = torch.cat([x[:1], x[:1]]), torch.cat([sigma[:1], sigma[:1]])
    hint = torch.randn(1, 16, 16, 12, generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        ref = ref_net.layer_outputs(x, sigma, context, pooled, hint, ref_model)
        graphed = [t.clone() for t in cn.layer_outputs(x, sigma, context, pooled, hint)]
        graphed2 = cn.layer_outputs(x, sigma, context, pooled, hint)  # replay
        bf = torch.bfloat16
        eager = cn._forward(x.to(bf), sigma, pooled.to(bf), hint.to(bf))
        alone = [t.clone() for t in cn.layer_outputs(x[1:], sigma[1:], context[1:], pooled[1:], hint)]
    for g, g2, e, a, r in zip(graphed, graphed2, eager, alone, ref):
        assert torch.equal(g, e) and torch.equal(g2, e)
        assert torch.equal(g[1:], a)
        assert sqnr(r, g.float()) > (25 if mode else 35), sqnr(r, g.float())
