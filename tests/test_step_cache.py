"""Step caching (sd35fp8.step_cache) on CPU: the indicator is the first block's real qkv input, threshold 0
changes nothing, a large threshold computes only the pinned first and last evaluations (and, with the
default "error" rule, the second one: the forecast needs two), a skipped call returns the linear forecast
from the last two full velocities (exact for a velocity linear in sigma) or, with reuse "velocity", the last
full velocity, the error rule measures its forecast's error, and the option reaches the pipeline."""

from __future__ import annotations

import pytest
import torch

from sd35fp8 import generation
from sd35fp8.errors import InputError
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_
from sd35fp8.pipeline import SD35Pipeline
from sd35fp8.sampling import Conditioning, get_sigmas
from sd35fp8.step_cache import StepCache, check_threshold, extrapolate, first_block_input, relative_l1


@pytest.fixture(scope="module")
def mmdit():
    cfg = MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=16, context_dim=32, pooled_dim=48,
                      qk_norm=True)
    return init_random_(MMDiT(cfg).eval(), torch.Generator().manual_seed(0))


def _inputs(m, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 8, generator=g)
    sigma = torch.full((batch,), 0.7)
    ctx = torch.randn(batch, 5, m.config.context_dim, generator=g)
    pooled = torch.randn(batch, m.config.pooled_dim, generator=g)
    return x, sigma, ctx, pooled


def test_indicator_is_the_first_blocks_qkv_input(mmdit):
    """first_block_input equals what MMDiT.forward feeds block 0's x-stream qkv linear (a forward hook)."""
    seen = {}
    hook = mmdit.joint_blocks[0].x_block.attn.qkv.register_forward_pre_hook(lambda mod, a: seen.update(a=a[0]))
    x, sigma, ctx, pooled = _inputs(mmdit)
    with torch.no_grad():
        mmdit(x, sigma, ctx, pooled)
    hook.remove()
    got = first_block_input(mmdit, x, sigma, pooled)
    torch.testing.assert_close(got, seen["a"].float(), atol=1e-5, rtol=1e-5)


def test_relative_l1():
    a = torch.tensor([1.0, -2.0])
    assert relative_l1(a, a) == 0.0
    assert relative_l1(a * 1.1, a) == pytest.approx(0.1)


def test_thresholds_checked(mmdit):
    assert check_threshold("0.25") == 0.25
    for bad in (-0.1, float("nan"), float("inf"), "x"):
        with pytest.raises(InputError):
            check_threshold(bad)
    with pytest.raises(InputError, match="not an MMDiT"):
        StepCache(lambda *a, **k: None, 0.1, [1.0, 0.0])
    with pytest.raises(InputError, match="rule"):
        StepCache(mmdit, 0.1, [1.0, 0.0], rule="nope")
    with pytest.raises(InputError, match="reuse"):
        StepCache(mmdit, 0.1, [1.0, 0.0], reuse="nope")


class Counting:
    """An MMDiT ModelFn that counts its full evaluations."""

    def __init__(self, m):
        self.model, self.config, self.calls = m, m.config, 0

    def __call__(self, *a, **k):
        self.calls += 1
        with torch.no_grad():
            return self.model(*a, **k)


def _sample(model, threshold, steps=8, sampler="euler", stats=None):
    torch.manual_seed(0)
    x, _, ctx, pooled = _inputs(model.model, batch=1)
    cond, uncond = Conditioning(ctx, pooled), Conditioning(ctx.flip(1), pooled.flip(1))
    st = generation.SampleSettings(steps=steps, cfg=3.0, sampler=sampler, scheduler="normal",
                                   cache_threshold=threshold)
    return generation.sample(model, cond, uncond, torch.zeros(1, 16, 8, 8), st, seed=3, cache_stats=stats)


def test_threshold_zero_is_the_uncached_run(mmdit):
    m = Counting(mmdit)
    stats: dict = {}
    plain = _sample(m, 0.0, stats=stats)
    assert m.calls == 8 and stats == {}
    cache = StepCache(m, 1e-9, get_sigmas("normal", 8))  # on, but nothing is close enough to skip
    cache.inner = m
    m.calls = 0
    x, sigma, ctx, pooled = _inputs(mmdit)
    for s in (0.9, 0.8, 0.7):
        cache(x + s, torch.full((2,), s), ctx, pooled)
    assert cache.stats == {"calls": 3, "full": 3, "skipped": 0} and m.calls == 3
    assert torch.equal(plain, _sample(Counting(mmdit), 0.0))


@pytest.mark.parametrize("rule, reuse, full", [("error", "linear", 4), ("input", "velocity", 2), ("input", "linear", 2)])
def test_large_threshold_keeps_first_and_last_only(mmdit, monkeypatch, rule, reuse, full):
    """Euler with a huge threshold: the first and the last evaluation run the model (the "error" rule also
    the second, nothing to extrapolate from before, and the fourth, one skip until the forecast error has
    been measured), the others are forecast. The module's RULE / REUSE
    are the defaults generation.sample's cache gets."""
    from sd35fp8 import step_cache
    monkeypatch.setattr(step_cache, "RULE", rule)
    monkeypatch.setattr(step_cache, "REUSE", reuse)
    monkeypatch.setattr(step_cache, "WARMUP", 0.0)
    monkeypatch.setattr(step_cache, "RUNS", None)
    m = Counting(mmdit)
    stats: dict = {}
    cached = _sample(m, 1e9, steps=8, stats=stats)
    assert stats == {"calls": 8, "full": full, "skipped": 8 - full} and m.calls == full
    plain = _sample(Counting(mmdit), 0.0, steps=8)
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()


class LinearVelocity:
    """A stand-in MMDiT (the error rule never reads its blocks) whose velocity is a + b * sigma."""

    joint_blocks, x_embedder, config = (), None, None

    def __init__(self, bend: float = 0.0):
        g = torch.Generator().manual_seed(5)
        self.a, self.b = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
        self.bend, self.calls = bend, 0

    def __call__(self, x, sigma, context, pooled, skip_layers=(), **extra):
        self.calls += 1
        s = float(sigma.reshape(-1)[0])
        return self.a + self.b * s + self.bend * s * s * self.b


def test_extrapolate():
    v0, v1 = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])
    torch.testing.assert_close(extrapolate(0.6, 0.8, v1, 1.0, v0), torch.tensor([3.0, 2.0]))
    assert extrapolate(0.6, 0.8, v1, 0.8, v0) is v1


def test_error_rule_forecasts_linear_velocity_exactly():
    """A velocity linear in sigma: the forecast error measured at the third full call is 0, so every
    later call but the pinned last one is skipped, and each skipped call returns the exact velocity."""
    model = LinearVelocity()
    sig = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]
    cache = StepCache(model, 1e-3, sig, warmup=0.0, runs=None)  # defaults: rule "error", reuse "linear"
    x, ctx, pooled = torch.zeros(2, 16, 4, 4), torch.zeros(2, 3, 8), torch.zeros(2, 8)
    full = []
    for s in sig[:-1]:
        n = model.calls
        v = cache(x, torch.full((2,), s), ctx, pooled)
        full.append(model.calls > n)
        torch.testing.assert_close(v, model.a + model.b * s, atol=1e-5, rtol=1e-5)
    # 0.8: the change the forecast would add is over 1e-3, so it runs and measures kappa = 0 (to rounding)
    assert full == [True, True, True, False, False, False, True]
    assert cache.streams and next(iter(cache.streams.values())).kappa == pytest.approx(0.0, abs=1e-4)


def test_error_rule_threshold_bounds_the_estimate():
    """A bent velocity: the estimate (kappa * |(s - s1)(s - s0)| * step weight, accumulated) grows with
    the distance to the last full calls, so a small threshold skips fewer calls than a large one and 0+
    skips none."""
    counts = {}
    for th in (1e-9, 0.05, 1e9):
        model = LinearVelocity(bend=1.0)
        sig = torch.linspace(1, 0, 21)
        cache = StepCache(model, th, sig, warmup=0.0, runs=None)
        x, ctx, pooled = torch.zeros(2, 16, 4, 4), torch.zeros(2, 3, 8), torch.zeros(2, 8)
        for s in sig[:-1]:
            cache(x, torch.full((2,), float(s)), ctx, pooled)
        counts[th] = cache.stats["full"]
    assert counts[1e-9] == 20 and counts[1e9] == 4 and 4 < counts[0.05] < 20


def test_warmup_computes_the_first_fraction_of_the_schedule():
    """warmup 0.2 at 20 steps: the first 4 evaluations run the model whatever the threshold; after them the
    rule decides (a huge threshold: everything but the pinned last call is forecast)."""
    sig = torch.linspace(1, 0, 21)
    x, ctx, pooled = torch.zeros(2, 16, 4, 4), torch.zeros(2, 3, 8), torch.zeros(2, 8)
    for warmup, expect in ((0.2, [True] * 4 + [False] * 15 + [True]), (0.0, None)):
        model = LinearVelocity(bend=1.0)
        cache = StepCache(model, 1e9, sig, warmup=warmup, runs=None)
        full = []
        for s in sig[:-1]:
            n = model.calls
            cache(x, torch.full((2,), float(s)), ctx, pooled)
            full.append(model.calls > n)
        if expect is not None:
            assert full == expect
        else:
            assert full[:4] != [True] * 4 and full[-1]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="warmup"):
            StepCache(LinearVelocity(), 0.2, sig, warmup=bad)


@pytest.mark.parametrize("steps, pattern", [(20, "FFFFSFSFSSFSSFSSFSFF"), (28, "FFFFFFSFSFSFSSFSSFSSFSSFSFSF")])
def test_runs_limit_consecutive_skips_by_progress(steps, pattern):
    """warmup 0.2 and runs ((0.4, 1), (0.85, 2), (1, 1)) with a huge threshold: the first 20% computed, then
    one skip at a time until 40% of the schedule, two in a row until 85%, one at a time to the end."""
    sig = torch.linspace(1, 0, steps + 1)
    model = LinearVelocity(bend=1.0)
    cache = StepCache(model, 1e9, sig, warmup=0.2, runs=((0.4, 1), (0.85, 2), (1.0, 1)))
    x, ctx, pooled = torch.zeros(2, 16, 4, 4), torch.zeros(2, 3, 8), torch.zeros(2, 8)
    got = ""
    for s in sig[:-1]:
        n = model.calls
        cache(x, torch.full((2,), float(s)), ctx, pooled)
        got += "F" if model.calls > n else "S"
    assert got == pattern and cache.stats["full"] == pattern.count("F")
    with pytest.raises(InputError, match="runs"):
        StepCache(LinearVelocity(), 0.2, sig, runs=((1.5, 1),))


def test_x0_linear_reuse_extrapolates_the_x0_prediction():
    """reuse "x0_linear": a skipped call returns (x - x0_hat) / sigma with x0_hat on the line through the
    last two full calls' x0 = x - sigma v. A model whose x0 prediction is a + b * sigma for any x (as an
    ancestral sampler's re-noised x would give) is forecast exactly, x differing from call to call."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)

    class X0Line(LinearVelocity):
        def __call__(self, x, sigma, context, pooled, skip_layers=(), **extra):
            self.calls += 1
            s = float(sigma.reshape(-1)[0])
            return (x - a - b * s) / s

    model = X0Line()
    sig = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]
    cache = StepCache(model, 1e9, sig, reuse="x0_linear", warmup=0.0, runs=None)
    ctx, pooled = torch.zeros(2, 3, 8), torch.zeros(2, 8)
    full = []
    for k, s in enumerate(sig[:-1]):
        x = torch.randn(2, 16, 4, 4, generator=g)
        n = model.calls
        v = cache(x, torch.full((2,), s), ctx, pooled)
        full.append(model.calls > n)
        torch.testing.assert_close(v, (x - a - b * s) / s, atol=1e-4, rtol=1e-4)
    assert not all(full) and full[0] and full[-1]


def test_skip_returns_last_velocity_and_condition_change_recomputes(mmdit):
    m = Counting(mmdit)
    cache = StepCache(m, 1e9, [1.0, 0.9, 0.5, 0.1, 0.0], rule="input", reuse="velocity")  # the earlier cache
    x, _, ctx, pooled = _inputs(mmdit)
    v1 = cache(x, torch.full((2,), 1.0), ctx, pooled)  # first sigma: computed
    v2 = cache(x * 0.9, torch.full((2,), 0.9), ctx, pooled)  # skipped: the same velocity
    assert torch.equal(v1, v2) and m.calls == 1
    cache(x * 0.9, torch.full((2,), 0.5), ctx + 1, pooled)  # other conditioning: computed
    assert m.calls == 2
    cache(x, torch.full((2,), 0.5), ctx + 1, pooled, skip_layers=(1,))  # SLG pass: its own stream, first call
    assert m.calls == 3
    cache(x, torch.full((2,), 0.1), ctx + 1, pooled)  # last non-zero sigma: computed
    assert m.calls == 4 and cache.stats == {"calls": 5, "full": 4, "skipped": 1}


def test_linear_reuse_extrapolates_the_last_two_full_velocities(mmdit):
    m = Counting(mmdit)
    cache = StepCache(m, 1e9, [1.0, 0.9, 0.8, 0.5, 0.1, 0.0])
    x, _, ctx, pooled = _inputs(mmdit)
    v1 = cache(x, torch.full((2,), 1.0), ctx, pooled)  # pinned
    v2 = cache(x * 0.9, torch.full((2,), 0.9), ctx, pooled)  # computed: one full call, nothing to extrapolate
    assert m.calls == 2
    v3 = cache(x * 0.8, torch.full((2,), 0.8), ctx, pooled)  # skipped: the line through v1, v2 at 0.8
    assert m.calls == 2
    torch.testing.assert_close(v3, v2 + (v2 - v1), atol=1e-5, rtol=1e-5)


def test_pipeline_option(tiny_random_checkpoint):
    """cache_threshold reaches the generation core through the pipeline (engine road) and reports counts."""
    path, _ = tiny_random_checkpoint
    pipe = SD35Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    kw = dict(num_inference_steps=6, guidance_scale=3.0, sampler="euler", width=32, height=32, seed=2, progress=False)
    plain = pipe("a red circle", **kw)
    assert pipe.stats.cache == {}
    cached = pipe("a red circle", cache_threshold=1e9, **kw)
    assert pipe.stats.cache == {"calls": 6, "full": 4, "skipped": 2}
    assert cached.latents.shape == plain.latents.shape and not torch.equal(cached.latents, plain.latents)
    with pytest.raises(InputError, match="cache threshold"):
        pipe("a red circle", cache_threshold=-1, **kw)
