"""The engine's cached step (CUDA graphs, torch.compile) follows LoRA changes: a swap, a strength change,
an unload, a merge. A CUDA graph freezes what it read at capture (the LoRA terms of every slot), so
fast/graphs.py keys graphs on MMDiTEngine.lora_state; on CPU a fake capture freezes the slots the same
way, and the GPU-only test replays real graphs against the eager step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd35fp8.fast import MMDiTEngine
from sd35fp8.fast.graphs import GraphCache, _Graph, no_state
from sd35fp8.fp8.quantize import quantize_model
from sd35fp8.lora import LoraSet
from sd35fp8.lora.files import parse_lora
from sd35fp8.models.mmdit import MMDiTConfig

from mmdit_cases import build, inputs

CFG = MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=8, context_dim=64, pooled_dim=32,
                  qk_norm=True, x_block_self_attn_layers=(0,))


def random_lora(model: nn.Module, seed: int, rank: int = 4, name: str = "l"):
    """A kohya-layout LoRA on every joint-block Linear (adaLN included), parsed like a file."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in model.named_modules():
        if n.startswith("joint_blocks.") and (isinstance(m, nn.Linear) or type(m).__name__ == "FP8Linear"):
            stem = "lora_unet_" + n.replace(".", "_")
            sd[stem + ".lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            sd[stem + ".lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
            sd[stem + ".alpha"] = torch.tensor(float(rank))
    return parse_lora(sd, f"<{name}>", CFG.depth, name)


class FrozenCache(GraphCache):
    """GraphCache whose 'capture' freezes the engine's LoRA slots as a CUDA graph does: a replay runs
    the step with the slots as they were at capture (and the inputs copied in)."""

    def __init__(self, engine: MMDiTEngine, keyed: bool = True, max_states: int = 8):
        super().__init__(engine._forward, engine.lora_state if keyed else no_state, max_states=max_states)
        self.engine = engine
        self.captures = 0

    def capture(self, tensors, skip, where=(), depth=0):
        self.captures += 1
        frozen = [list(s) for s in self.engine.lora_slots]
        static = tuple(t.clone() for t in tensors)
        out = torch.empty(0)
        engine, fn = self.engine, self.fn

        class Replay:
            def replay(self_inner):
                now = [list(s) for s in engine.lora_slots]
                for s, f in zip(engine.lora_slots, frozen):
                    s[:] = f
                try:
                    res = fn(*static, skip)
                finally:
                    for s, n in zip(engine.lora_slots, now):
                        s[:] = n
                g.output.resize_(res.shape).copy_(res)

        g = _Graph(Replay(), static, out)
        return g


def _setup():
    model = build(CFG)
    loras = LoraSet({"mmdit": model})
    loras.load(random_lora(model, 1, name="a"), "a", strength=None)
    loras.load(random_lora(model, 2, name="b"), "b", strength=None)
    return model, loras


@torch.no_grad()
def test_graph_key_follows_lora_swaps_strengths_and_unload() -> None:
    model, loras = _setup()
    engine = MMDiTEngine(model, fp8_mode=None)
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    engine.graphs = cache = FrozenCache(engine)
    unkeyed = FrozenCache(engine, keyed=False)
    runs = [{}, {"a": 1.0}, {"b": 1.0}, {"a": 0.5}, {"a": 1.0, "b": 0.5}, {"a": 1.0}, {}]
    outs = []
    for active in runs:
        loras.set_active(active)
        eager = engine._forward(x, sigma.reshape(-1), context, pooled, ())
        got = engine(x, sigma, context, pooled)
        stale, _ = unkeyed(x, sigma.reshape(-1), context, pooled, ())
        assert torch.equal(got, eager), active
        outs.append((active, got, stale))
    # the unkeyed cache (the bug) replays the first capture (no LoRA) for every set
    assert all(torch.equal(stale, outs[0][1]) for _, _, stale in outs)
    assert not torch.equal(outs[1][1], outs[0][1]) and not torch.equal(outs[1][1], outs[2][1])
    # five distinct sets captured; going back to {"a": 1} and to {} replays (same placed factors)
    assert cache.captures == 5 and len(cache.graphs) == 5
    loras.load(random_lora(model, 3, name="c"), "c", strength=None)
    loras.unload()  # all adapters gone: the slots empty, the no-LoRA graph again
    assert engine.lora_state()[0] == ()
    assert torch.equal(engine(x, sigma, context, pooled), outs[0][1]) and cache.captures == 5
    loras.load(random_lora(model, 1, name="a"), "a")  # loaded again after unload: the engine still sees it
    assert torch.equal(engine(x, sigma, context, pooled), outs[1][1])


def test_graph_cache_keeps_terms_alive_and_drops_least_recent() -> None:
    calls = []
    state = {"tag": ("x",), "keep": object()}

    class Fake(GraphCache):
        def capture(self, tensors, skip, where=(), depth=0):
            calls.append(self.key(tensors, skip, where, self.state()[0]))

            class R:
                def replay(self):
                    pass
            return _Graph(R(), tuple(t.clone() for t in tensors), torch.zeros(1))

    cache = Fake(lambda *a: None, lambda: (state["tag"], state["keep"]), max_graphs=2)
    t = (torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    assert cache(*t, ())[1] and not cache(*t, ())[1]
    kept = state["keep"]
    assert next(iter(cache.graphs.values())).keep is kept
    state.update(tag=("y",), keep=object())
    assert cache(*t, ())[1]
    state["tag"] = ("x",)
    assert not cache(*t, ())[1]  # ("x",) used last: ("y",) is now the least recent
    state["tag"] = ("z",)
    assert cache(*t, ())[1] and len(cache.graphs) == 2
    assert [k[-1] for k in cache.graphs] == [("x",), ("z",)]
    cache.pool = "a pool handle"
    cache.clear()  # all graphs gone: the pool goes too (a capture into a freed pool asserts in CUDA)
    assert not cache.graphs and cache.pool is None


@torch.no_grad()
def test_graph_cache_keeps_graphs_of_at_most_max_states_lora_sets() -> None:
    """Each LoRA set's graphs keep its fused packs (a weight copy) alive: past max_states sets, the least
    recently used set's graphs all go before the new set's capture; the no-LoRA graphs never count."""
    state = {"tag": ()}

    class Fake(GraphCache):
        def capture(self, tensors, skip, where=(), depth=0):
            class R:
                def replay(self):
                    pass
            return _Graph(R(), tuple(t.clone() for t in tensors), torch.zeros(1))

    cache = Fake(lambda *a: None, lambda: (state["tag"], None), max_states=2)
    t1 = (torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1))
    t2 = (torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    for tag in ((), ("a",), ("b",), ("a",)):  # two shapes each
        state["tag"] = tag
        cache(*t1, ())
        cache(*t2, ())
    assert sorted({k[-1] for k in cache.graphs}) == [(), ("a",), ("b",)] and len(cache.graphs) == 6
    state["tag"] = ("c",)
    assert cache(*t1, ())[1]  # ("b",) was the least recent set: both its graphs dropped
    assert sorted({k[-1] for k in cache.graphs}) == [(), ("a",), ("c",)] and len(cache.graphs) == 5
    state["tag"] = ("a",)
    assert not cache(*t2, ())[1]


def test_merge_refreshes_the_engine_without_being_told() -> None:
    """fuse / unfuse through the LoraSet (no refresh_weights call): the FP8 engine re-reads the
    requantised weights and scales and drops its graphs; unfuse restores the base step exactly."""
    model = build(CFG)
    quantize_model(model, mode="dynamic")
    loras = LoraSet({"mmdit": model})
    loras.load(random_lora(model, 1, name="a"), "a")
    engine = MMDiTEngine(model, fp8_mode="dynamic")
    engine.graphs = cache = FrozenCache(engine)
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    loras.set_active({})
    base = engine(x, sigma, context, pooled)
    loras.set_active({"a": 1.0})
    unmerged = engine(x, sigma, context, pooled)
    assert cache.captures == 2
    loras.fuse()
    merged = engine(x, sigma, context, pooled)
    assert cache.captures == 3 and len(cache.graphs) == 1  # refreshed: the graphs dropped, one new capture
    fresh = MMDiTEngine(model, fp8_mode="dynamic")(x, sigma, context, pooled)
    assert torch.equal(merged, fresh)
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()) < 0.1
    loras.unfuse()
    loras.set_active({})
    assert torch.equal(engine(x, sigma, context, pooled), base)


@torch.no_grad()
def test_compiled_block_follows_lora_changes() -> None:
    """torch.compile of the per-block function (the engine's compile=True path; dynamo guards, eager
    backend on CPU): a swap or strength change re-traces instead of reusing the old LoRA."""
    model, loras = _setup()
    engine = MMDiTEngine(model, fp8_mode=None)
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(engine._block_fn, backend="eager", fullgraph=True)
    eager_fn = engine._block_fn
    for active in [{}, {"a": 1.0}, {"b": 1.0}, {"a": 0.5}, {}]:
        loras.set_active(active)
        engine._block_fn = eager_fn
        expect = engine._forward(x, sigma, context, pooled, ())
        engine._block_fn = compiled
        got = engine._forward(x, sigma, context, pooled, ())
        assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5), active
    engine._block_fn = eager_fn


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_cuda_graphs_follow_lora_swaps() -> None:
    model, loras = _setup()
    engine = MMDiTEngine(model.to(torch.bfloat16).cuda(), fp8_mode=None, cuda_graphs=True, device="cuda")
    loras.dtype = torch.bfloat16
    x, sigma, context, pooled = (t.cuda() for t in inputs(CFG, 8, 8))
    x, context, pooled = x.bfloat16(), context.bfloat16(), pooled.bfloat16()
    outs = {}
    for active in [{}, {"a": 1.0}, {"b": 1.0}, {"a": 0.5}, {"a": 1.0}, {}]:
        loras.set_active(active)
        got = engine(x, sigma, context, pooled)
        expect = engine._forward(x, sigma.reshape(-1), context, pooled, ())
        assert torch.equal(got, expect), active
        outs[str(active)] = got
    assert not torch.equal(outs["{}"], outs["{'a': 1.0}"])
    assert len(engine.graphs.graphs) == 4
    loras.set_active({"a": 1.0})
    loras.fuse()  # the engine refreshes its weights and drops its graphs (and their pool) by itself
    merged = engine(x, sigma, context, pooled)
    assert torch.equal(merged, engine._forward(x, sigma.reshape(-1), context, pooled, ()))
    loras.unfuse()
    assert torch.equal(engine(x, sigma, context, pooled), engine._forward(x, sigma.reshape(-1), context, pooled, ()))
