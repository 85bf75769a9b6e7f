"""The CFG++ samplers (euler_cfg_pp, euler_ancestral_cfg_pp, dpmpp_2s_ancestral_cfg_pp, dpmpp_2m_cfg_pp,
res_multistep_cfg_pp, res_multistep_ancestral_cfg_pp, gradient_estimation_cfg_pp).

Each runs through a real CFGDenoiser (capture_uncond) over a toy velocity model and is compared with a
transcription, written below, of ComfyUI's own function (comfy/k_diffusion/sampling.py of comfyanonymous/ComfyUI
02159d814dee609a, the CONST branches; `model.inner_model...model_sampling` read as the flow model, noise_scale 1.0
for SD3). The transcriptions get their uncond prediction as ComfyUI does: a post-CFG function
(set_model_options_post_cfg_function) that a ComfyUI-like guider calls with {"denoised", "uncond_denoised", ...},
the guider computing cond / uncond by calling the toy model directly and combining them with ComfyUI's
cfg_function, uncond + (cond - uncond) * cfg on x0 = x - sigma * v, at cfg 1 too (disable_cfg1_optimization).
Flow schedules with shift 3; the same seed for the per-step noise; agreement to float32 rounding.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from sd35fp8.errors import InputError
from sd35fp8.sampling import (
    SAMPLERS,
    CFGDenoiser,
    Conditioning,
    FlowMatching,
    get_sigmas,
    sample,
)
from sd35fp8.sampling.inpaint import MaskedDenoiser, prepare_mask

from comfy_ksampling import sample_named, c_default_noise_sampler, c_to_d, c_get_ancestral_step, c_set_model_options_post_cfg_function, c_res_multistep, c_sample_gradient_estimation, start, tiny_mmdit

CFG_PP = ["euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_2m_cfg_pp",
          "res_multistep_cfg_pp", "res_multistep_ancestral_cfg_pp", "gradient_estimation_cfg_pp"]
DETERMINISTIC = ["euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "gradient_estimation_cfg_pp"]


# ------------------------------------------------------------------ toy velocity model and conditionings
def toy(x, sigma, context, pooled, skip_layers=(), **_):
    """A velocity model [n, C, H, W] of (x, sigma, context [n, L, D], pooled [n, P]); nonlinear in x and sigma."""
    s = sigma.reshape(-1, 1, 1, 1)
    return (torch.tanh(x * context.mean(dim=(1, 2))[:, None, None, None]) + pooled.mean(1)[:, None, None, None]
            + 0.3 * torch.sin(2 * x) * s)


def text(v):
    return Conditioning(torch.full((1, 4, 8), v), torch.full((1, 6), v / 3))


COND, UNCOND = text(1.0), text(-0.5)


def toy_x0(x, sigma, c):
    """x0 = x - sigma * v of the toy model called directly (CONST calculate_denoised)."""
    if c is None:
        return torch.zeros_like(x)
    v = toy(x, sigma, c.context.expand(x.shape[0], -1, -1), c.pooled.expand(x.shape[0], -1))
    return x - v * sigma.reshape(-1, 1, 1, 1)


# ------------------------------------------------------------------ ComfyUI's guider and post-CFG hook, in brief
class ComfyGuided:
    """ComfyUI's CFGGuider + sampling_function for a CONST model: cond and uncond x0, cfg_function, then the
    sampler_post_cfg_functions. The uncond pass is skipped at cfg 1 unless disable_cfg1_optimization."""

    def __init__(self, cond, uncond, cfg):
        self.cond, self.uncond, self.cfg = cond, uncond, cfg
        self.calls = 0

    def __call__(self, x, sigma, model_options=None, seed=None):
        model_options = {} if model_options is None else model_options
        self.calls += 1
        skip_uncond = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        cond_pred = toy_x0(x, sigma, self.cond)
        uncond_pred = toy_x0(x, sigma, None if skip_uncond else self.uncond)
        if skip_uncond:
            cfg_result = cond_pred
        else:
            cfg_result = uncond_pred + (cond_pred - uncond_pred) * self.cfg
        for fn in model_options.get("sampler_post_cfg_function", []):
            args = {"denoised": cfg_result, "cond": self.cond, "uncond": self.uncond, "model": None,
                    "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": sigma, "model_options":
                    model_options, "input": x}
            cfg_result = fn(args)
        return cfg_result


# ------------------------------------------------------------------ ComfyUI transcriptions
def c_sigma_to_half_log_snr(sigma, model_sampling=None):
    # CONST: log((1 - t) / t) = log((1 - sigma) / sigma)
    return sigma.logit().neg()


def c_sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                    s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed", None)
    noise_sampler = c_default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler

    model_sampling = "CONST"
    lambda_fn = partial(c_sigma_to_half_log_snr, model_sampling=model_sampling)
    s_noise = s_noise * 1.0

    uncond_denoised = None

    def post_cfg_function(args):
        nonlocal uncond_denoised
        uncond_denoised = args["uncond_denoised"]
        return args["denoised"]

    model_options = extra_args.get("model_options", {}).copy()
    extra_args["model_options"] = c_set_model_options_post_cfg_function(model_options, post_cfg_function,
                                                                        disable_cfg1_optimization=True)

    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            alpha_s = sigmas[i] * lambda_fn(sigmas[i]).exp()
            alpha_t = sigmas[i + 1] * lambda_fn(sigmas[i + 1]).exp()
            d = c_to_d(x, sigmas[i], alpha_s * uncond_denoised)
            sigma_down, sigma_up = c_get_ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta=eta)
            sigma_down = alpha_t * sigma_down
            x = alpha_t * denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def c_sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return c_sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=extra_args, callback=callback,
                                           disable=disable, eta=0.0, s_noise=0.0, noise_sampler=None)


def c_sample_dpmpp_2s_ancestral_RF_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                          s_noise=1., noise_sampler=None):
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed", None)
    noise_sampler = c_default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    s_noise = s_noise * 1.0

    uncond_denoised = None

    def post_cfg_function(args):
        nonlocal uncond_denoised
        uncond_denoised = args["uncond_denoised"]
        return args["denoised"]

    model_options = extra_args.get("model_options", {}).copy()
    extra_args["model_options"] = c_set_model_options_post_cfg_function(model_options, post_cfg_function,
                                                                        disable_cfg1_optimization=True)

    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda lbda: (lbda.exp() + 1) ** -1
    lambda_fn = lambda sigma: ((1 - sigma) / sigma).log()

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        guidance_vector = denoised - uncond_denoised
        downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
        sigma_down = sigmas[i + 1] * downstep_ratio
        alpha_ip1 = 1 - sigmas[i + 1]
        alpha_down = 1 - sigma_down
        renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down ** 2 * alpha_ip1 ** 2 / alpha_down ** 2) ** 0.5
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        if sigmas[i + 1] == 0:
            d = c_to_d(x, sigmas[i], uncond_denoised)
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            if sigmas[i] == 1.0:
                sigma_s = 0.9999
            else:
                t_i, t_down = lambda_fn(sigmas[i]), lambda_fn(sigma_down)
                r = 1 / 2
                h = t_down - t_i
                s = t_i + r * h
                sigma_s = sigma_fn(s)
            sigma_s_i_ratio = sigma_s / sigmas[i]
            u = sigma_s_i_ratio * x + (1 - sigma_s_i_ratio) * uncond_denoised
            _ = model(u, sigma_s * s_in, **extra_args)
            uncond_D_i = uncond_denoised
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * uncond_D_i
        if sigmas[i + 1] > 0 and eta > 0:
            x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
        x += (1 - sigmas[i + 1]) * guidance_vector
    return x


def c_sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    t_fn = lambda sigma: sigma.log().neg()

    old_uncond_denoised = None
    uncond_denoised = None

    def post_cfg_function(args):
        nonlocal uncond_denoised
        uncond_denoised = args["uncond_denoised"]
        return args["denoised"]

    model_options = extra_args.get("model_options", {}).copy()
    extra_args["model_options"] = c_set_model_options_post_cfg_function(model_options, post_cfg_function,
                                                                        disable_cfg1_optimization=True)

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond_denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_mix = -torch.exp(-h) * uncond_denoised - torch.expm1(-h) * (1 / (2 * r)) * (
                denoised - old_uncond_denoised)
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond_denoised = uncond_denoised
    return x


def c_sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.,
                                  noise_sampler=None):
    return c_res_multistep(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                           s_noise=s_noise, noise_sampler=noise_sampler, eta=0., cfg_pp=True)


def c_sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.,
                                            s_noise=1., noise_sampler=None):
    return c_res_multistep(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                           s_noise=s_noise, noise_sampler=noise_sampler, eta=eta, cfg_pp=True)


def c_sample_gradient_estimation_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.):
    return c_sample_gradient_estimation(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                        ge_gamma=ge_gamma, cfg_pp=True)


REFERENCE = {
    "euler_cfg_pp": c_sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": c_sample_euler_ancestral_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": c_sample_dpmpp_2s_ancestral_RF_cfg_pp,
    "dpmpp_2m_cfg_pp": c_sample_dpmpp_2m_cfg_pp,
    "res_multistep_cfg_pp": c_sample_res_multistep_cfg_pp,
    "res_multistep_ancestral_cfg_pp": c_sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation_cfg_pp": c_sample_gradient_estimation_cfg_pp,
}


# ------------------------------------------------------------------ runs
SCHEDULES = [("simple", 8, 1.0), ("normal", 6, 0.6), ("simple", 2, 1.0)]  # sigma 1 start; img2img; two steps


def _ours(name, x, sigmas, cfg, uncond=UNCOND, seed=1234, callback=None, **opts):
    den = CFGDenoiser(toy, COND, uncond, cfg=cfg, model_sampling=FlowMatching(3.0))
    out = sample(name, den, x.clone(), sigmas, extra_args={"seed": seed}, callback=callback, disable=True, **opts)
    return out, den.calls


def _ref(name, x, sigmas, cfg, uncond=UNCOND, seed=1234, **opts):
    model = ComfyGuided(COND, uncond, cfg)
    out = REFERENCE[name](model, x.clone(), sigmas.clone(), extra_args={"seed": seed}, **opts)
    return out, model.calls


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}")
@pytest.mark.parametrize("cfg", [4.5, 1.0])
@pytest.mark.parametrize("name", CFG_PP)
def test_matches_comfyui_transcription(name, cfg, schedule):
    scheduler, steps, denoise = schedule
    sigmas = get_sigmas(scheduler, steps, 3.0, denoise, sampler=name)
    x = start(sigmas, 1234)
    ours, our_calls = _ours(name, x, sigmas, cfg)
    ref, ref_calls = _ref(name, x, sigmas, cfg)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    assert our_calls == ref_calls
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", CFG_PP)
def test_without_negative_the_uncond_prediction_is_zero(name):
    """No negative at cfg 1: the hook gets zeros as the uncond prediction (ComfyUI's calc_cond_batch of nothing)."""
    sigmas = get_sigmas("simple", 6, 3.0)
    x = start(sigmas, 7)
    ours, _ = _ours(name, x, sigmas, 1.0, uncond=None, seed=7)
    ref, _ = _ref(name, x, sigmas, 1.0, uncond=None, seed=7)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6)


def test_options_reach_the_samplers():
    sigmas = get_sigmas("simple", 8, 3.0)
    x = start(sigmas, 5)
    cases = [("euler_ancestral_cfg_pp", {"eta": 0.5, "s_noise": 0.7}),
             ("dpmpp_2s_ancestral_cfg_pp", {"eta": 0.6, "s_noise": 0.8}),
             ("res_multistep_ancestral_cfg_pp", {"eta": 0.5, "s_noise": 0.7}),
             ("gradient_estimation_cfg_pp", {"ge_gamma": 3.0})]
    for name, opts in cases:
        ours, _ = _ours(name, x, sigmas, 4.5, seed=5, **opts)
        ref, _ = _ref(name, x, sigmas, 4.5, seed=5, **opts)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6, msg=name)


def test_names_sit_after_their_base_names():
    names = list(SAMPLERS)
    for name in CFG_PP:
        assert names.index(name) == names.index(name[: -len("_cfg_pp")]) + 1


def test_callbacks_and_deterministic_samplers_draw_no_noise():
    sigmas = get_sigmas("simple", 6, 3.0)
    x = start(sigmas, 3)
    for name in CFG_PP:
        seen = []
        _ours(name, x, sigmas, 4.5, seed=3, callback=seen.append)
        assert [d["i"] for d in seen] == list(range(6)), name
        assert all({"x", "i", "sigma", "sigma_hat", "denoised"} <= set(d) for d in seen)
        a, _ = _ours(name, x, sigmas, 4.5, seed=3)
        b, _ = _ours(name, x, sigmas, 4.5, seed=4)
        assert torch.equal(a, b) == (name in DETERMINISTIC), name


@pytest.mark.parametrize("name", CFG_PP)
def test_needs_cfg_guidance(name):
    sigmas = get_sigmas("simple", 3, 3.0)
    x = start(sigmas, 1)
    bare = lambda x, sigma, seed=None: x * 0.5
    with pytest.raises(InputError, match="needs CFG guidance"):
        sample(name, bare, x, sigmas, extra_args={"seed": 1}, disable=True)


def test_masked_denoiser_forwards_capture_uncond():
    """Inpainting wraps the CFGDenoiser; the uncond prediction is the inner (unmasked) one, as ComfyUI's
    KSamplerX0Inpaint leaves args["uncond_denoised"]."""
    sigmas = get_sigmas("simple", 4, 3.0)
    x = start(sigmas, 2)
    ms = FlowMatching(3.0)
    mask = prepare_mask(torch.ones(1, 1, 4, 4), tuple(x.shape))  # repaint everywhere: the inner denoiser's result
    den = MaskedDenoiser(CFGDenoiser(toy, COND, UNCOND, cfg=4.5, model_sampling=ms), mask, torch.zeros_like(x),
                         torch.zeros_like(x), ms)
    ours = sample("dpmpp_2m_cfg_pp", den, x.clone(), sigmas, extra_args={"seed": 2}, disable=True)
    ref, _ = _ref("dpmpp_2m_cfg_pp", x, sigmas, 4.5, seed=2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6)


# ------------------------------------------------------------------ end to end through the generation core
@pytest.fixture(scope="module")
def mmdit():
    return tiny_mmdit()


@pytest.mark.parametrize("cfg", [3.0, 1.0])
@pytest.mark.parametrize("name", CFG_PP)
def test_generation_core_accepts_name(mmdit, name, cfg):
    steps = []
    z = sample_named(mmdit, name, cfg=cfg, callback=lambda i, n, d: steps.append(i))
    assert z.shape == (1, 16, 8, 8) and torch.isfinite(z).all()
    assert torch.equal(z, sample_named(mmdit, name, cfg=cfg)) and steps == [1, 2, 3, 4]
