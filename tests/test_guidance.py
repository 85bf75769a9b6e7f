"""CFG / skip-layer guidance: batching, the cfg==1 shortcut, the formula on x0, the SLG windows."""

from __future__ import annotations

import pytest
import torch

from sd35fp8.errors import InputError
from sd35fp8.sampling import CFGDenoiser, Conditioning, FlowMatching, SLGConfig, get_sigmas, sample


class VelocityModel:
    """Tiny deterministic stand-in for the MMDiT velocity contract; records every call."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, x, sigma, context, pooled, skip_layers=()):
        self.calls.append({"batch": x.shape[0], "skip": tuple(skip_layers), "dtype": x.dtype, "sigma": sigma.clone()})
        c = context.float().mean(dim=(1, 2)).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
        p = pooled.float().mean(dim=1).view(-1, 1, 1, 1)
        v = 0.5 * x.float() * (1 + c) + p + sigma.float().view(-1, 1, 1, 1)
        if skip_layers:
            v = v + 0.3 * len(skip_layers)
        return v.to(x.dtype)


def _cond(value, b=1, length=6):
    return Conditioning(torch.full((b, length, 8), value), torch.full((b, 4), value * 2))


def _x(b=2):
    return torch.linspace(-1, 1, b * 2 * 3 * 3).reshape(b, 2, 3, 3)


def _x0(x, sigma, cond):  # reference: x - sigma*v for one conditioning, unbatched
    model = VelocityModel()
    v = model(x, sigma, cond.context.expand(x.shape[0], -1, -1), cond.pooled.expand(x.shape[0], -1))
    return x - sigma.view(-1, 1, 1, 1) * v


def test_cfg_one_runs_only_cond():
    model = VelocityModel()
    den = CFGDenoiser(model, _cond(0.2), _cond(-0.1), cfg=1.0)
    x, sigma = _x(2), torch.full((2,), 0.7)
    out = den(x, sigma, seed=5)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 2
    torch.testing.assert_close(out, _x0(x, sigma, _cond(0.2)))


def test_cfg_batches_cond_and_uncond_in_one_call():
    model = VelocityModel()
    cond, uncond = _cond(0.2), _cond(-0.1)
    den = CFGDenoiser(model, cond, uncond, cfg=4.5)
    x, sigma = _x(2), torch.full((2,), 0.7)
    out = den(x, sigma)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 4
    c, u = _x0(x, sigma, cond), _x0(x, sigma, uncond)
    torch.testing.assert_close(out, u + 4.5 * (c - u))
    assert out.dtype == torch.float32


def test_cfg_different_context_lengths():
    model = VelocityModel()
    den = CFGDenoiser(model, _cond(0.2, length=6), _cond(-0.1, length=4), cfg=2.0)
    x, sigma = _x(1), torch.full((1,), 0.5)
    den(x, sigma)
    assert len(model.calls) == 1 and model.calls[0]["batch"] == 2  # lcm 12: still one batch
    model2 = VelocityModel()
    CFGDenoiser(model2, _cond(0.2, length=7), _cond(-0.1, length=2), cfg=2.0)(x, sigma)
    assert [c["batch"] for c in model2.calls] == [1, 1]  # lcm 14 > 4x: separate, as ComfyUI


def test_model_dtype_is_explicit():
    model = VelocityModel()
    den = CFGDenoiser(model, _cond(0.2), None, cfg=1.0, dtype=torch.bfloat16)
    out = den(_x(1), torch.full((1,), 0.5))
    assert model.calls[0]["dtype"] == torch.bfloat16 and out.dtype == torch.float32


def test_cfg_needs_uncond():
    with pytest.raises(InputError):
        CFGDenoiser(VelocityModel(), _cond(0.2), None, cfg=3.0)


def test_slg_reference_window_counts_calls():
    model = VelocityModel()
    steps = 10
    slg = SLGConfig(scale=2.5, start=0.1, end=0.5, layers=(7, 8, 9))
    den = CFGDenoiser(model, _cond(0.2), _cond(-0.1), cfg=4.0, slg=slg, steps=steps)
    x = _x(1)
    skipped_at = []
    for i in range(steps):
        n = len(model.calls)
        den(x, torch.full((1,), 1.0 - i / steps))
        if len(model.calls) - n == 2:
            skipped_at.append(i)
            assert model.calls[-1]["skip"] == (7, 8, 9) and model.calls[-1]["batch"] == 1
    assert skipped_at == [2, 3, 4]  # 0.1*10 < step < 0.5*10, as sd3_impls.SkipLayerCFGDenoiser
    # formula on the last active call
    den2 = CFGDenoiser(VelocityModel(), _cond(0.2), _cond(-0.1), cfg=4.0, slg=slg, steps=steps)
    den2.calls = 3
    sigma = torch.full((1,), 0.6)
    c, u = _x0(x, sigma, _cond(0.2)), _x0(x, sigma, _cond(-0.1))
    m = VelocityModel()
    v_skip = m(x, sigma, _cond(0.2).context, _cond(0.2).pooled, skip_layers=(7, 8, 9))
    s = x - 0.6 * v_skip
    torch.testing.assert_close(den2(x, sigma), u + 4.0 * (c - u) + 2.5 * (c - s))


def test_slg_sigma_window_like_comfyui():
    ms = FlowMatching(3.0)
    slg = SLGConfig(scale=3.0, start=0.01, end=0.15, window="sigma")
    model = VelocityModel()
    den = CFGDenoiser(model, _cond(0.2), _cond(-0.1), cfg=4.0, slg=slg, model_sampling=ms)
    hi, lo = ms.percent_to_sigma(0.01), ms.percent_to_sigma(0.15)
    for s, active in [(1.0, False), (hi + 1e-4, False), (hi - 1e-4, True), (lo + 1e-4, True), (lo - 1e-4, False)]:
        n = len(model.calls)
        den(_x(1), torch.full((1,), s))
        assert (len(model.calls) - n == 2) == active, s


def test_slg_config_validation():
    with pytest.raises(InputError):
        SLGConfig(window="bogus")
    with pytest.raises(InputError):
        CFGDenoiser(VelocityModel(), _cond(0.2), _cond(0.0), cfg=2.0, slg=SLGConfig())  # steps window needs steps


def test_denoiser_drives_a_sampler():
    model = VelocityModel()
    den = CFGDenoiser(model, _cond(0.2), _cond(-0.1), cfg=3.0)
    sigmas = get_sigmas("simple", 4)
    out = sample("euler", den, torch.randn(1, 2, 3, 3), sigmas, extra_args={"seed": 1}, disable=True)
    assert out.shape == (1, 2, 3, 3) and torch.isfinite(out).all()
    assert len(model.calls) == 4 and all(c["batch"] == 2 for c in model.calls)


def test_slg_defaults_are_the_references():
    """One place (defaults.py) holds the skip-layer guidance defaults, and they are the reference's:
    Stability-AI/sd3.5 sd3_infer.py (fbf8f48) CONFIGS["sd3.5_medium"]: steps 50, cfg 5.0, dpmpp_2m,
    shift 3.0; skip_layer_config scale 2.5, start 0.01, end 0.20, layers [7, 8, 9], cfg 4.0 with it."""
    from sd35fp8.defaults import MEDIUM

    reference = {"scale": 2.5, "start": 0.01, "end": 0.20, "layers": (7, 8, 9)}
    default = SLGConfig()
    assert {k: getattr(default, k) for k in reference} == reference and default.window == "steps"
    assert (MEDIUM.slg_scale, MEDIUM.slg_start, MEDIUM.slg_end, MEDIUM.slg_layers) == tuple(reference.values())
    assert (MEDIUM.steps, MEDIUM.cfg, MEDIUM.slg_cfg, MEDIUM.sampler, MEDIUM.shift) == (50, 5.0, 4.0, "dpmpp_2m", 3.0)


def test_slg_reference_window_at_50_steps():
    """The reference's window at Medium's 50 steps: calls 1..9 (0.01*50 < step < 0.20*50)."""
    model = VelocityModel()
    den = CFGDenoiser(model, _cond(0.2), _cond(-0.1), cfg=4.0, slg=SLGConfig(), steps=50)
    active = []
    for i in range(50):
        n = len(model.calls)
        den(_x(1), torch.full((1,), 1.0 - i / 50))
        if len(model.calls) - n == 2:
            active.append(i)
    assert active == list(range(1, 10))


def test_combined_conditioning_follows_comfyui_windows_and_weights():
    """CondSet (ConditioningCombine + ConditioningSetTimestepRange): an entry counts while sigma(end) <= sigma <=
    sigma(start) (ComfyUI get_area_and_mult on percent_to_sigma); active entries' predictions are averaged by
    strength; a step with one active entry on each side is the plain batched call."""
    from sd35fp8.sampling import CondEntry, CondSet

    ms = FlowMatching(3.0)
    cond, neg, zero = _cond(0.2), _cond(-0.1), _cond(0.0)
    split = CondSet((CondEntry(neg, 0.0, 0.1), CondEntry(zero, 0.1, 1.0)))  # the SD3 example's negative
    boundary = ms.percent_to_sigma(0.1)
    x = _x(2)
    for s, active in ((0.99, neg), (boundary + 1e-3, neg), (boundary - 1e-3, zero), (0.3, zero)):
        model = VelocityModel()
        sigma = torch.full((2,), s)
        out = CFGDenoiser(model, cond, split, cfg=3.0, model_sampling=ms)(x, sigma)
        c, u = _x0(x, sigma, cond), _x0(x, sigma, active)
        torch.testing.assert_close(out, u + 3.0 * (c - u))
        assert [call["batch"] for call in model.calls] == [4]  # one batched call, as without combining
    # overlapping entries: the strength-weighted mean of their predictions, each its own call
    both = CondSet((CondEntry(neg, 0.0, 1.0, strength=1.0), CondEntry(zero, 0.0, 1.0, strength=3.0)))
    model = VelocityModel()
    sigma = torch.full((2,), 0.5)
    out = CFGDenoiser(model, cond, both, cfg=2.0, model_sampling=ms)(x, sigma)
    u = (_x0(x, sigma, neg) * 1.0 + _x0(x, sigma, zero) * 3.0) / 4.0
    c = _x0(x, sigma, cond)
    torch.testing.assert_close(out, u + 2.0 * (c - u))
    assert len(model.calls) == 3
    # no entry active: ComfyUI's zero prediction for that side
    none = CondSet((CondEntry(neg, 0.5, 0.6),))
    out = CFGDenoiser(VelocityModel(), cond, none, cfg=2.0, model_sampling=ms)(x, torch.full((2,), 0.95))
    torch.testing.assert_close(out, 2.0 * _x0(x, torch.full((2,), 0.95), cond))
    # a lone full-range entry is the plain conditioning
    assert CondSet((CondEntry(neg),)).simple is neg and split.simple is None
