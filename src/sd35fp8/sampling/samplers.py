"""k-diffusion samplers for flow-matching models, with ComfyUI's update rules.

Contract: `sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts)`
where `model(x, sigma [B], **extra_args) -> denoised x0` and `x` is already noise-scaled
(x = sigma0*noise + (1-sigma0)*latent). The callback gets {"x", "i", "sigma", "sigma_hat",
"denoised"} once per step. Every sampler here is the variant ComfyUI runs for a CONST
(flow) model: ancestral samplers use the RF re-noising, the SDE samplers use
lambda = log((1-sigma)/sigma). Rules follow ComfyUI comfy/k_diffusion/sampling.py at
commit 02159d814dee609acc27994c1bf25fc5b40e2aaa (uni_pc: comfy/extra_samplers/uni_pc.py; deis
coefficients: comfy/k_diffusion/deis.py). ComfyUI has no flow variant of res_multistep_ancestral
or ddpm: it takes the variance-exploding (EDM-sigma) step on flow sigmas too, and so does ours. seeds_2, seeds_3,
sa_solver and sa_solver_pece: same commit (sa_solver coefficients: comfy/k_diffusion/sa_solver.py, stored at
4328fa894d96811b), lambda = log((1-sigma)/sigma). dpm_fast and
dpm_adaptive take only the schedule's first and last nonzero sigma (ComfyUI's ksampler wrapper).
The CFG++ samplers (*_cfg_pp, same commit) step with the uncond prediction: their model must be a CFG
denoiser with capture_uncond() (guidance.CFGDenoiser; it then runs the uncond pass at cfg 1 too, as
ComfyUI's disable_cfg1_optimization does); dpmpp_2s_ancestral_cfg_pp is ComfyUI's RF (flow) variant.
Per-step noise: see noise.py (CPU generator seeded from extra_args["seed"]). No per-step noise:
euler heun heunpp2 dpm_2 lms dpmpp_2m ipndm ipndm_v deis res_multistep gradient_estimation dpm_fast
dpm_adaptive ddim uni_pc uni_pc_bh2 euler_cfg_pp dpmpp_2m_cfg_pp res_multistep_cfg_pp
gradient_estimation_cfg_pp (dpm_adaptive's step control reads the whole batch, though); seeds_2 / seeds_3 with
eta 0, sa_solver(_pece) with a tau_func that is 0 everywhere.
NODE_SAMPLERS are not KSampler names: the samplers of comfy_extras/nodes_advanced_samplers.py, euler_pp
(SamplerEulerCFGpp "alternative", no per-step noise) and lcm_upscale (SamplerLCMUpscale: its noise continues the
initial noise's generator, see sample_lcm_upscale).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import trange

from ..errors import InputError
from .model_sampling import FlowMatching
from .noise import BrownianTreeNoiseSampler, default_noise_sampler
from .unipc import sample_uni_pc, sample_uni_pc_bh2

Callback = Callable[[dict], None]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative dx/dsigma = (x - x0) / sigma."""
    return (x - denoised) / sigma.view(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def get_ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """(sigma_down, sigma_up) of a variance-exploding ancestral step (k-diffusion)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _rf_ancestral_step(sigma, sigma_next, eta: float):
    """RF ancestral step: (sigma_down, alpha_next / alpha_down, renoise coefficient)."""
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_next / alpha_down, renoise


def _model_sampling(model, given: FlowMatching | None) -> FlowMatching | None:
    return given if given is not None else getattr(model, "model_sampling", None)


def _offset_first_sigma(sigmas: torch.Tensor, ms: FlowMatching | None, name: str) -> torch.Tensor:
    if len(sigmas) > 1 and sigmas[0] >= 1:
        if ms is None:
            raise InputError(
                f"sampler {name} starts at sigma 1 and needs the model's FlowMatching (shift): pass "
                "model_sampling=... or use a denoiser with a .model_sampling attribute"
            )
        return ms.offset_first_sigma(sigmas)
    return sigmas


def _report(callback, x, i, sigma, denoised, sigma_hat=None) -> None:
    if callback is not None:
        sigma_hat = sigma if sigma_hat is None else sigma_hat
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _capture_uncond(model, name: str) -> list:
    """The CFG++ samplers' uncond prediction (ComfyUI's *_cfg_pp: a post-CFG function that keeps
    args["uncond_denoised"], set with disable_cfg1_optimization): the denoiser's capture_uncond() holder, whose
    item 0 each model call replaces by that call's uncond prediction (zeros without a negative)."""
    capture = getattr(model, "capture_uncond", None)
    if capture is None:
        raise InputError(f"sampler {name} (CFG++) needs CFG guidance: its model must be a CFG denoiser "
                         "(sd35fp8.sampling.CFGDenoiser) that can report the uncond prediction")
    return capture()


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])  # [B]
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    """ComfyUI sample_euler_ancestral_RF."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        sigma_down, alpha_ratio, renoise = _rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        ratio = sigma_down / sigmas[i]
        x = ratio * x + (1 - ratio) * denoised
        if eta > 0:
            x = alpha_ratio * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


def _euler_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, name):
    """ComfyUI sample_euler_ancestral_cfg_pp: a DDIM step in x / alpha whose noise direction comes from the uncond
    prediction; alpha = sigma * exp(half log-SNR) = 1 - sigma for the flow model (0 at sigma 1)."""
    extra_args = {} if extra_args is None else extra_args
    if eta > 0 and s_noise > 0 and noise_sampler is None:  # ComfyUI builds it always; it draws only then
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    holder = _capture_uncond(model, name)
    lam_fn = FlowMatching.half_log_snr
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond_denoised = holder[0]
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            alpha_s = sigmas[i] * lam_fn(sigmas[i]).exp()
            alpha_t = sigmas[i + 1] * lam_fn(sigmas[i + 1]).exp()
            d = to_d(x, sigmas[i], alpha_s * uncond_denoised)  # to noise
            sigma_down, sigma_up = get_ancestral_step(sigmas[i] / alpha_s, sigmas[i + 1] / alpha_t, eta)
            sigma_down = alpha_t * sigma_down
            x = alpha_t * denoised + sigma_down * d
            if eta > 0 and s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI sample_euler_cfg_pp: euler_ancestral_cfg_pp with eta 0 and s_noise 0 (no per-step noise)."""
    return _euler_cfg_pp(model, x, sigmas, extra_args, callback, disable, 0.0, 0.0, None, "euler_cfg_pp")


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    return _euler_cfg_pp(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                         "euler_ancestral_cfg_pp")


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_heunpp2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    s_end = sigmas[-1]
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2] * s_in, **extra_args))
            w = 3 * sigmas[0]
            w2, w3 = sigmas[i + 1] / w, sigmas[i + 2] / w
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    """ComfyUI sample_dpm_2_ancestral_RF."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, alpha_ratio, renoise = _rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in, **extra_args))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = alpha_ratio * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


def _lms_coeff(order: int, t, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the Lagrange basis polynomial j (exact; ComfyUI uses quad)."""
    poly = torch.tensor([1.0], dtype=torch.float64)  # coefficients, highest degree first
    for k in range(order):
        if k == j:
            continue
        root, denom = float(t[i - k]), float(t[i - j] - t[i - k])
        poly = torch.cat([poly, poly.new_zeros(1)]) - root * torch.cat([poly.new_zeros(1), poly])
        poly = poly / denom
    deg = len(poly) - 1
    antideriv = [float(c) / (deg - n + 1) for n, c in enumerate(poly.tolist())]
    def value(tau: float) -> float:
        return sum(c * tau ** (deg - n + 1) for n, c in enumerate(antideriv))
    return value(float(t[i + 1])) - value(float(t[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            cur_order = min(i + 1, order)
            coeffs = [_lms_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
            x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    """ComfyUI sample_dpmpp_2s_ancestral_RF."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        sigma_down, alpha_ratio, renoise = _rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            if sigmas[i] == 1.0:
                sigma_s = 0.9999
            else:
                lam_i = ((1 - sigmas[i]) / sigmas[i]).log()
                lam_down = ((1 - sigma_down) / sigma_down).log()
                sigma_s = ((lam_i + 0.5 * (lam_down - lam_i)).exp() + 1) ** -1
            ratio_s = sigma_s / sigmas[i]
            u = ratio_s * x + (1 - ratio_s) * denoised
            denoised_2 = model(u, sigma_s * s_in, **extra_args)
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * denoised_2
        if sigmas[i + 1] > 0 and eta > 0:
            x = alpha_ratio * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    """ComfyUI sample_dpmpp_2s_ancestral_RF_cfg_pp (the CONST branch of sample_dpmpp_2s_ancestral_cfg_pp): both
    stages step with the uncond prediction, then (1 - sigma_next) * (denoised - uncond) of the first call is added."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed")) if noise_sampler is None else noise_sampler
    holder = _capture_uncond(model, "dpmpp_2s_ancestral_cfg_pp")
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond_denoised = holder[0]
        guidance_vector = denoised - uncond_denoised
        sigma_down, alpha_ratio, renoise = _rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], uncond_denoised) * (sigma_down - sigmas[i])
        else:
            if sigmas[i] == 1.0:
                sigma_s = 0.9999
            else:
                lam_i = ((1 - sigmas[i]) / sigmas[i]).log()
                lam_down = ((1 - sigma_down) / sigma_down).log()
                sigma_s = ((lam_i + 0.5 * (lam_down - lam_i)).exp() + 1) ** -1
            ratio_s = sigma_s / sigmas[i]
            u = ratio_s * x + (1 - ratio_s) * uncond_denoised
            model(u, sigma_s * s_in, **extra_args)  # only its uncond prediction is used
            uncond_denoised_2 = holder[0]
            ratio = sigma_down / sigmas[i]
            x = ratio * x + (1 - ratio) * uncond_denoised_2
        if sigmas[i + 1] > 0 and eta > 0:
            x = alpha_ratio * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise
        x = x + (1 - sigmas[i + 1]) * guidance_vector  # RF: alpha = 1 - sigma
    return x


def _brownian(x, sigmas, seed):
    sigma_min, sigma_max = sigmas[sigmas > 0].min(), sigmas.max()
    return BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seed)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None, r=1 / 2, model_sampling=None):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(x, sigmas, extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    sigmas = _offset_first_sigma(sigmas, _model_sampling(model, model_sampling), "dpmpp_sde")
    lam_fn, sigma_fn = FlowMatching.half_log_snr, FlowMatching.sigma_from_half_log_snr
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = lam_fn(sigmas[i]), lam_fn(sigmas[i + 1])
        h = lam_t - lam_s
        lam_s1 = lam_s + r * h
        fac = 1 / (2 * r)
        sigma_s1 = sigma_fn(lam_s1)
        alpha_s = sigmas[i] * lam_s.exp()
        alpha_s1 = sigma_s1 * lam_s1.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        # step 1
        sd, su = get_ancestral_step(lam_s.neg().exp(), lam_s1.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        x_2 = (alpha_s1 / alpha_s) * (-h_).exp() * x - alpha_s1 * (-h_).expm1() * denoised
        if eta > 0 and s_noise > 0:
            x_2 = x_2 + alpha_s1 * noise_sampler(sigmas[i], sigma_s1) * s_noise * su
        denoised_2 = model(x_2, sigma_s1 * s_in, **extra_args)
        # step 2
        sd, su = get_ancestral_step(lam_s.neg().exp(), lam_t.neg().exp(), eta)
        h_ = sd.log().neg() - lam_s
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
        if eta > 0 and s_noise > 0:
            x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    sigma_fn = lambda t: t.neg().exp()  # noqa: E731  (exp(log(s)) != s in float32: keep ComfyUI's form)
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI sample_dpmpp_2m_cfg_pp (one form for every model type: t = -log(sigma))."""
    extra_args = {} if extra_args is None else extra_args
    holder = _capture_uncond(model, "dpmpp_2m_cfg_pp")
    s_in = x.new_ones([x.shape[0]])
    t_fn = lambda sigma: sigma.log().neg()
    old_uncond_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond_denoised = holder[0]
        _report(callback, x, i, sigmas[i], denoised)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond_denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_mix = -torch.exp(-h) * uncond_denoised - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond_denoised)
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond_denoised = uncond_denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None, solver_type="midpoint", model_sampling=None):
    if len(sigmas) <= 1:
        return x
    if solver_type not in {"heun", "midpoint"}:
        raise InputError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(x, sigmas, extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    sigmas = _offset_first_sigma(sigmas, _model_sampling(model, model_sampling), "dpmpp_2m_sde")
    old_denoised, h, h_last = None, None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = FlowMatching.half_log_snr(sigmas[i]), FlowMatching.half_log_snr(sigmas[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None, model_sampling=None):
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, "heun", model_sampling)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None, model_sampling=None):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = _brownian(x, sigmas, extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    sigmas = _offset_first_sigma(sigmas, _model_sampling(model, model_sampling), "dpmpp_3m_sde")
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = FlowMatching.half_log_snr(sigmas[i]), FlowMatching.half_log_snr(sigmas[i + 1])
            h = lam_t - lam_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lam_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def _ddpm_step(x, sigma, sigma_prev, noise, noise_sampler):
    """ComfyUI DDPMSampler_step: ancestral DDPM posterior step on VP-scaled x, alpha_cumprod = 1 / (sigma^2 + 1)."""
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
    alpha = alpha_cumprod / alpha_cumprod_prev
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - alpha_cumprod).sqrt())
    if sigma_prev > 0:
        mu = mu + ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * noise_sampler(sigma, sigma_prev)
    return mu


@torch.no_grad()
def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """ComfyUI sample_ddpm (generic_step_sampler + DDPMSampler_step). ComfyUI has no flow variant: it reads the
    flow sigmas as EDM (variance-exploding) sigmas, x / sqrt(1 + sigma^2) as the VP sample, and so do we."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        x = _ddpm_step(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1], (x - denoised) / sigmas[i],
                       noise_sampler)
        if sigmas[i + 1] != 0:
            x = x * torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Jump to x0, then re-noise to the next sigma with flow noise scaling."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed")) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            s = sigmas[i + 1]
            x = s * noise_sampler(sigmas[i], sigmas[i + 1]) + (1.0 - s) * x
    return x


def _ipndm(model, x, sigmas, extra_args, callback, disable, max_order, multistep):
    """The iPNDM loop ComfyUI's sample_ipndm and sample_ipndm_v share: order 1 is an euler step, higher orders add
    `multistep(i, order, d_cur, history, h)`, the step h times the combined derivative (history: earlier ones, oldest
    first), in each sampler's own order of operations."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    history: list[torch.Tensor] = []  # previous derivatives, oldest first
    for i in trange(len(sigmas) - 1, disable=disable):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)  # ComfyUI reports the initial x here
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        else:
            x_next = x_cur + multistep(i, order, d_cur, history, t_next - t_cur)
        history = (history + [d_cur])[-(max_order - 1):]
    return x_next


def _ipndm_fixed(i, order, d_cur, history, h):
    """iPNDM's Adams-Bashforth weights for equal steps."""
    if order == 2:
        return h * (3 * d_cur - history[-1]) / 2
    if order == 3:
        return h * (23 * d_cur - 16 * history[-1] + 5 * history[-2]) / 12
    return h * (55 * d_cur - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


@torch.no_grad()
def sample_ipndm(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    return _ipndm(model, x, sigmas, extra_args, callback, disable, max_order, _ipndm_fixed)


def _ipndm_v_coeffs(h_n, h_n_1, h_n_2=None, h_n_3=None):
    """Variable-step iPNDM weights of (d_cur, d_prev1, d_prev2, d_prev3) for orders 2-4 (ComfyUI sample_ipndm_v)."""
    if h_n_2 is None:
        return ((2 + h_n / h_n_1) / 2, -(h_n / h_n_1) / 2)
    temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
    if h_n_3 is None:
        return ((2 + (h_n / h_n_1)) / 2 + temp1,
                -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1,
                temp1 * h_n_1 / h_n_2)
    temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
        * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
    ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))
    return ((2 + (h_n / h_n_1)) / 2 + temp1 + temp2,
            -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + ratio) * temp2,
            temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + ratio * (1 + h_n_2 / h_n_3)) * temp2,
            -temp2 * ratio * h_n_1 / h_n_2)


@torch.no_grad()
def sample_ipndm_v(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=4):
    """iPNDM with variable step sizes (ComfyUI sample_ipndm_v; zju-pi/diff-sampler)."""

    def multistep(i, order, d_cur, history, h):
        steps = [h] + [sigmas[i - k] - sigmas[i - k - 1] for k in range(order - 1)]
        coeffs = _ipndm_v_coeffs(*steps)  # h_n, h_n_1, ...
        total = coeffs[0] * d_cur
        for c, d in zip(coeffs[1:], reversed(history)):
            total = total + c * d
        return h * total

    return _ipndm(model, x, sigmas, extra_args, callback, disable, max_order, multistep)


# ---- DEIS "tab" coefficients (ComfyUI comfy/k_diffusion/deis.py, from zju-pi/diff-sampler): sigmas are read as
# EDM sigmas of a VP process fitted to sigma_min 0.002 / sigma_max 80, whatever the model (as ComfyUI does)
def _deis_vp_times(sigmas: torch.Tensor, epsilon_s: float = 1e-3, sigma_min: float = 0.002, sigma_max: float = 80):
    """-> (VP times of sigmas, beta_0, beta_1), float32 on the CPU; the two scalar logs go through numpy as there."""
    def np_log(v: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(np.log(v.numpy())))

    log_min = np_log(torch.tensor(sigma_min) ** 2 + 1)
    log_max = np_log(torch.tensor(sigma_max) ** 2 + 1)
    beta_d = 2 * (log_min / epsilon_s - log_max) / (epsilon_s - 1)
    beta_min = log_max - 0.5 * beta_d
    s = sigmas.detach().cpu()
    t = ((beta_min ** 2 + 2 * beta_d * (s ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    return t, beta_min, beta_d + beta_min


def _deis_integrand(beta_0, beta_1, taus):
    """-0.5 d(log alpha)/dtau / sqrt(alpha (1 - alpha)), the derivative taken by autograd as ComfyUI does."""
    with torch.inference_mode(mode=False), torch.enable_grad():
        taus = taus.clone().requires_grad_(True)
        alpha = torch.exp(-0.5 * taus ** 2 * (beta_1.clone() - beta_0.clone()) - taus * beta_0.clone())
        alpha.log().sum().backward()
        grad = taus.grad
    return -0.5 * grad / torch.sqrt(alpha.detach() * (1 - alpha.detach()))


def deis_coefficients(sigmas: torch.Tensor, max_order: int, n: int = 10000) -> list[list[torch.Tensor]]:
    """Per step, the weights of (d_cur, d_prev1, ...) (empty for first-order steps): the integrals of the Lagrange
    basis through the last `order` VP times against the integrand, a Riemann sum over n points."""
    t_steps, beta_0, beta_1 = _deis_vp_times(sigmas)
    out: list[list[torch.Tensor]] = []
    for i in range(len(t_steps) - 1):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        order = min(i + 1, max_order)
        if order == 1:
            out.append([])
            continue
        taus = torch.linspace(t_cur, t_next, n)  # [n]
        dtau = (t_next - t_cur) / n
        prev_t = t_steps[[i - k for k in range(order)]]
        integrand = _deis_integrand(beta_0, beta_1, taus)
        coeffs = []
        for j in range(order):
            poly = 1
            for k in range(order):
                if k != j:
                    poly = poly * ((taus - prev_t[k]) / (prev_t[j] - prev_t[k]))
            coeffs.append(torch.sum(integrand * poly) * dtau)
        out.append(coeffs)
    return out


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, deis_mode="tab"):
    """DEIS multistep (ComfyUI sample_deis, "tab" coefficients)."""
    if deis_mode != "tab":
        raise InputError(f"deis_mode {deis_mode!r} is not supported here; only 'tab' (ComfyUI's default)")
    if not 1 <= max_order <= 4:
        raise InputError(f"deis max_order must be 1 to 4, got {max_order}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    coeff_list = deis_coefficients(sigmas, max_order)
    x_next = x
    history: list[torch.Tensor] = []  # previous derivatives, oldest first
    for i in trange(len(sigmas) - 1, disable=disable):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)  # ComfyUI reports the initial x here
        d_cur = (x_cur - denoised) / t_cur
        order = 1 if t_next <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        else:
            coeffs = coeff_list[i]
            x_next = x_cur + coeffs[0] * d_cur
            for c, d in zip(coeffs[1:], reversed(history)):
                x_next = x_next + c * d
        history = (history + [d_cur])[-(max_order - 1):]
    return x_next


@torch.no_grad()
def _res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None, eta=1.0,
                   cfg_pp: str | None = None):
    """ComfyUI res_multistep: RES 2nd-order multistep in t = -log(sigma) (arXiv 2308.02157).

    The same update for every model type: the ancestral variant uses the variance-exploding ancestral
    step (sigma_down, sigma_up) and adds sigma_up * noise also for flow models, as ComfyUI does.
    cfg_pp (the sampler's name, or None): ComfyUI's cfg_pp=True, steps with the uncond prediction.
    """
    extra_args = {} if extra_args is None else extra_args
    if eta > 0 and noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    holder = _capture_uncond(model, cfg_pp) if cfg_pp else None
    s_in = x.new_ones([x.shape[0]])
    t_fn = lambda sigma: sigma.log().neg()
    old_sigma_down, old_denoised = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        uncond_denoised = holder[0] if cfg_pp else None
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], denoised)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + to_d(x, sigmas[i], uncond_denoised) * sigma_down
            else:
                x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = t_fn(sigmas[i]), t_fn(old_sigma_down), t_fn(sigma_down), t_fn(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond_denoised)
                x = h.neg().exp() * x + h * (b1 * uncond_denoised + b2 * old_denoised)
            else:
                x = h.neg().exp() * x + h * (b1 * denoised + b2 * old_denoised)
        # eta 0: ComfyUI still draws noise and adds it times sigma_up = 0; we skip the draw (same x)
        if sigmas[i + 1] > 0 and eta > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = (uncond_denoised if cfg_pp else denoised), sigma_down
    return x


@torch.no_grad()
def sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=0.0)


@torch.no_grad()
def sample_res_multistep_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=0.0,
                          cfg_pp="res_multistep_cfg_pp")


@torch.no_grad()
def sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=eta)


@torch.no_grad()
def sample_res_multistep_ancestral_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0, noise_sampler=None):
    return _res_multistep(model, x, sigmas, extra_args, callback, disable, s_noise, noise_sampler, eta=eta,
                          cfg_pp="res_multistep_ancestral_cfg_pp")


@torch.no_grad()
def sample_gradient_estimation(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0):
    """Euler plus a gradient-estimation correction (ComfyUI sample_gradient_estimation, cfg_pp off)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, ge_gamma=2.0):
    """ComfyUI sample_gradient_estimation with cfg_pp: d from the uncond prediction, the step from denoised."""
    extra_args = {} if extra_args is None else extra_args
    holder = _capture_uncond(model, "gradient_estimation_cfg_pp")
    s_in = x.new_ones([x.shape[0]])
    old_d = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x, sigmas[i], holder[0])
        _report(callback, x, i, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1]
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@torch.no_grad()
def sample_er_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None,
                  noise_scaler=None, max_stage=3, model_sampling=None):
    """ER-SDE-Solver-3, VP form (ComfyUI sample_er_sde; arXiv 2309.06169), er_lambda = sigma / alpha."""
    extra_args = {} if extra_args is None else extra_args
    if s_noise > 0 and noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    if noise_scaler is None:
        noise_scaler = lambda v: v * ((v ** 0.3).exp() + 10.0)
    n_points = 200.0
    point_index = torch.arange(0, n_points, dtype=torch.float32, device=x.device)  # [200]
    sigmas = _offset_first_sigma(sigmas, _model_sampling(model, model_sampling), "er_sde")
    er_lambdas = FlowMatching.half_log_snr(sigmas).neg().exp()
    old_denoised, old_denoised_d = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        stage = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lam_s, lam_t = er_lambdas[i], er_lambdas[i + 1]
            alpha_s, alpha_t = sigmas[i] / lam_s, sigmas[i + 1] / lam_t
            r = noise_scaler(lam_t) / noise_scaler(lam_s)
            x = (alpha_t / alpha_s) * r * x + alpha_t * (1 - r) * denoised
            if stage >= 2:
                dt = lam_t - lam_s
                step = -dt / n_points
                pos = lam_t + point_index * step
                scaled = noise_scaler(pos)
                s = torch.sum(1 / scaled) * step
                denoised_d = (denoised - old_denoised) / (lam_s - er_lambdas[i - 1])
                x = x + alpha_t * (dt + s * noise_scaler(lam_t)) * denoised_d
                if stage >= 3:
                    s_u = torch.sum((pos - lam_s) / scaled) * step
                    denoised_u = (denoised_d - old_denoised_d) / ((lam_s - er_lambdas[i - 2]) / 2)
                    x = x + alpha_t * ((dt ** 2) / 2 + s_u * noise_scaler(lam_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                scale = (lam_t ** 2 - lam_s ** 2 * r ** 2).sqrt().nan_to_num(nan=0.0)
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * scale
        old_denoised = denoised
    return x


def _ei_h_phi_1(h: torch.Tensor) -> torch.Tensor:
    """h * phi_1(h) of the exponential integrators (ComfyUI ei_h_phi_1)."""
    return torch.expm1(h)


def _ei_h_phi_2(h: torch.Tensor) -> torch.Tensor:
    """h * phi_2(h) (ComfyUI ei_h_phi_2)."""
    return (torch.expm1(h) - h) / h


@torch.no_grad()
def sample_seeds_2(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r=0.5, solver_type="phi_1", model_sampling=None):
    """SEEDS-2 (arXiv 2305.14267), VP data prediction in lambda = log((1-sigma)/sigma) (ComfyUI sample_seeds_2):
    two model calls per step; with eta > 0 two noise draws per step (at the stage point and at the step's end)."""
    if solver_type not in {"phi_1", "phi_2"}:
        raise InputError(f"solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    extra_args = {} if extra_args is None else extra_args
    inject_noise = eta > 0 and s_noise > 0
    if inject_noise and noise_sampler is None:  # ComfyUI builds it always; it draws only then
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    lam_fn, sigma_fn = FlowMatching.half_log_snr, FlowMatching.sigma_from_half_log_snr
    sigmas = _offset_first_sigma(sigmas, _model_sampling(model, model_sampling), "seeds_2")
    fac = 1 / (2 * r)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = lam_fn(sigmas[i]), lam_fn(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_s1 = torch.lerp(lam_s, lam_t, r)
        sigma_s1 = sigma_fn(lam_s1)
        alpha_s1 = sigma_s1 * lam_s1.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        # stage 1
        x_2 = sigma_s1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s1 * _ei_h_phi_1(-r * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s1)
            x_2 = x_2 + sde_noise * sigma_s1 * s_noise
        denoised_2 = model(x_2, sigma_s1 * s_in, **extra_args)
        # stage 2
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * _ei_h_phi_1(-h_eta) * denoised_d
        else:
            b2 = _ei_h_phi_2(-h_eta) / r
            b1 = _ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject_noise:  # the stage-1 noise carried to the step's end plus fresh noise for the rest
            segment = (r - 1) * h * eta
            sde_noise = sde_noise * segment.exp()
            sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@torch.no_grad()
def sample_seeds_3(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                   noise_sampler=None, r_1=1.0 / 3, r_2=2.0 / 3, model_sampling=None):
    """SEEDS-3 (arXiv 2305.14267), VP data prediction (ComfyUI sample_seeds_3): three model calls per step;
    with eta > 0 three noise draws per step."""
    extra_args = {} if extra_args is None else extra_args
    inject_noise = eta > 0 and s_noise > 0
    if inject_noise and noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    lam_fn, sigma_fn = FlowMatching.half_log_snr, FlowMatching.sigma_from_half_log_snr
    sigmas = _offset_first_sigma(sigmas, _model_sampling(model, model_sampling), "seeds_3")
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = lam_fn(sigmas[i]), lam_fn(sigmas[i + 1])
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_s1 = torch.lerp(lam_s, lam_t, r_1)
        lam_s2 = torch.lerp(lam_s, lam_t, r_2)
        sigma_s1, sigma_s2 = sigma_fn(lam_s1), sigma_fn(lam_s2)
        alpha_s1 = sigma_s1 * lam_s1.exp()
        alpha_s2 = sigma_s2 * lam_s2.exp()
        alpha_t = sigmas[i + 1] * lam_t.exp()
        # stage 1
        x_2 = sigma_s1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s1 * _ei_h_phi_1(-r_1 * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s1)
            x_2 = x_2 + sde_noise * sigma_s1 * s_noise
        denoised_2 = model(x_2, sigma_s1 * s_in, **extra_args)
        # stage 2
        a3_2 = r_2 / r_1 * _ei_h_phi_2(-r_2 * h_eta)
        a3_1 = _ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject_noise:
            segment = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment.exp()
            sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s1, sigma_s2)
            x_3 = x_3 + sde_noise * sigma_s2 * s_noise
        denoised_3 = model(x_3, sigma_s2 * s_in, **extra_args)
        # stage 3
        b3 = _ei_h_phi_2(-h_eta) / r_2
        b1 = _ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject_noise:
            segment = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment.exp()
            sde_noise = sde_noise + segment.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


# ---- SA-Solver (stochastic Adams, arXiv 2309.05019; ComfyUI comfy/k_diffusion/sa_solver.py)
def sa_exponential_coeffs(s: torch.Tensor, t: torch.Tensor, solver_order: int, tau_t: float) -> torch.Tensor:
    """(1 + tau^2) * integral_s^t exp((1 + tau^2) x) x^p dx / exp((1 + tau^2) t) for p = 0..order-1 [order],
    by the integration-by-parts recursion as a lower-triangular matrix (ComfyUI compute_exponential_coeffs)."""
    tau_mul = 1 + tau_t ** 2
    h = t - s
    p = torch.arange(solver_order, dtype=s.dtype, device=s.device)  # [K]
    product_terms = t ** p - s ** p * (-tau_mul * h).exp()  # [K]
    depth = p.unsqueeze(1) - p.unsqueeze(0)  # [K, K]
    log_factorial = (p + 1).lgamma()
    coeff = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau_t > 0:
        coeff = coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    coeff = (coeff.exp() * signs).tril()
    return coeff @ product_terms


def sa_b_coeffs(sigma_next: torch.Tensor, curr_lambdas: torch.Tensor, lambda_s: torch.Tensor,
                lambda_t: torch.Tensor, tau_t: float, simple_order_2: bool = False,
                is_corrector_step: bool = False) -> torch.Tensor:
    """Weights b_i [K] of the last K data predictions at lambdas curr_lambdas [K] for a step lambda_s -> lambda_t
    (ComfyUI compute_stochastic_adams_b_coeffs): Lagrange-basis integrals via the transposed Vandermonde system."""
    n = curr_lambdas.shape[0]
    if simple_order_2 and n == 2:  # the paper's simplified order-2 scheme (Appendix D)
        tau_mul = 1 + tau_t ** 2
        h = lambda_t - lambda_s
        alpha_t = sigma_next * lambda_t.exp()
        if is_corrector_step:
            b_1 = alpha_t * (0.5 * tau_mul * h)
            b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
        else:
            b_2 = alpha_t * (0.5 * tau_mul * h ** 2) / (curr_lambdas[-2] - lambda_s)
            b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
        return torch.stack([b_2, b_1])
    exp_coeffs = sa_exponential_coeffs(lambda_s, lambda_t, n, tau_t)
    vander_t = torch.vander(curr_lambdas, n, increasing=True).T  # [K, K]
    lagrange = torch.linalg.solve(vander_t, exp_coeffs)
    alpha_t = sigma_next * lambda_t.exp()
    return alpha_t * lagrange


def sa_tau_interval_func(start_sigma: float, end_sigma: float, eta: float = 1.0) -> Callable:
    """tau(sigma) = eta on start_sigma >= sigma >= end_sigma, else 0 (ODE) (ComfyUI get_tau_interval_func)."""
    def tau_func(sigma) -> float:
        if eta <= 0:
            return 0.0
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.item()
        return eta if start_sigma >= sigma >= end_sigma else 0.0
    return tau_func


def _sa_solver(model, x, sigmas, extra_args, callback, disable, tau_func, s_noise, noise_sampler, predictor_order,
               corrector_order, use_pece, simple_order_2, model_sampling, name):
    """ComfyUI sample_sa_solver: predictor of order <= predictor_order, corrector of order <= corrector_order
    (the corrector reuses the next step's model call unless use_pece, which spends one more call on it)."""
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    ms = _model_sampling(model, model_sampling)
    sigmas = _offset_first_sigma(sigmas, ms, name)
    lambdas = FlowMatching.half_log_snr(sigmas)
    if tau_func is None:  # stochastic between 20% and 80% of the schedule (in sigma, as ComfyUI)
        if ms is None:
            raise InputError(f"sampler {name} needs the model's FlowMatching (shift) for its default stochastic "
                             "interval: pass model_sampling=... or tau_func=..., or use a denoiser with a "
                             ".model_sampling attribute")
        tau_func = sa_tau_interval_func(ms.percent_to_sigma(0.2), ms.percent_to_sigma(0.8), eta=1.0)
    max_used_order = max(predictor_order, corrector_order)
    x_pred = x  # x: the current state, x_pred: the predicted next state
    h, tau_t, noise = 0.0, 0.0, 0.0
    pred_list: list[torch.Tensor] = []
    lower_order_to_end = sigmas[-1].item() == 0
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x_pred, sigmas[i] * s_in, **extra_args)
        _report(callback, x_pred, i, sigmas[i], denoised)
        pred_list = (pred_list + [denoised])[-max_used_order:]
        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)
        # corrector
        if corrector_order_used == 0:
            x = x_pred
        else:
            b = sa_b_coeffs(sigmas[i], lambdas[i - corrector_order_used + 1:i + 1], lambdas[i - 1], lambdas[i],
                            tau_t, simple_order_2, is_corrector_step=True)
            pred_mat = torch.stack(pred_list[-corrector_order_used:], dim=1)  # [B, K, ...]
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t ** 2) * h).exp() * x + torch.tensordot(pred_mat, b, dims=([1], [0]))
            if tau_t > 0 and s_noise > 0:
                x = x + noise  # the previous predictor step's noise
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                pred_list[-1] = denoised
        # predictor
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            b = sa_b_coeffs(sigmas[i + 1], lambdas[i - predictor_order_used + 1:i + 1], lambdas[i], lambdas[i + 1],
                            tau_t, simple_order_2, is_corrector_step=False)
            pred_mat = torch.stack(pred_list[-predictor_order_used:], dim=1)
            pred_res = torch.tensordot(pred_mat, b, dims=([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t ** 2) * h).exp() * x + pred_res
            if tau_t > 0 and s_noise > 0:
                noise = (noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                         * (-2 * tau_t ** 2 * h).expm1().neg().sqrt() * s_noise)
                x_pred = x_pred + noise
    return x_pred


@torch.no_grad()
def sample_sa_solver(model, x, sigmas, extra_args=None, callback=None, disable=None, tau_func=None, s_noise=1.0,
                     noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False, simple_order_2=False,
                     model_sampling=None):
    """SA-Solver (ComfyUI sample_sa_solver): per-step noise only where tau_func(sigma_next) > 0 (by default
    sigma between percent_to_sigma(0.2) and percent_to_sigma(0.8))."""
    return _sa_solver(model, x, sigmas, extra_args, callback, disable, tau_func, s_noise, noise_sampler,
                      predictor_order, corrector_order, use_pece, simple_order_2, model_sampling, "sa_solver")


@torch.no_grad()
def sample_sa_solver_pece(model, x, sigmas, extra_args=None, callback=None, disable=None, tau_func=None, s_noise=1.0,
                          noise_sampler=None, predictor_order=3, corrector_order=4, simple_order_2=False,
                          model_sampling=None):
    """SA-Solver in PECE mode (ComfyUI sample_sa_solver_pece): the corrected state is evaluated again."""
    return _sa_solver(model, x, sigmas, extra_args, callback, disable, tau_func, s_noise, noise_sampler,
                      predictor_order, corrector_order, True, simple_order_2, model_sampling, "sa_solver_pece")


# ---- DPM-Solver fast / adaptive (ComfyUI DPMSolver, arXiv 2206.00927): time t = -log(sigma), eps prediction
class _PIDStepSizeController:
    """PID controller of the adaptive step size h (ComfyUI PIDStepSizeController)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


class _DPMSolver:
    """DPM-Solver-1/2/3 steps with a per-step cache of eps evaluations (keys "eps", "eps_r1", "eps_r2")."""

    def __init__(self, model, extra_args, info_callback=None):
        self.model, self.extra_args, self.info_callback = model, extra_args, info_callback

    @staticmethod
    def t(sigma):
        return -sigma.log()

    @staticmethod
    def sigma(t):
        return t.neg().exp()

    def eps(self, cache: dict, key: str, x, t):
        if key not in cache:
            sigma = self.sigma(t) * x.new_ones([x.shape[0]])
            cache[key] = (x - self.model(x, sigma, **self.extra_args)) / self.sigma(t)
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)

    def _report(self, x, i, t, t_up, denoised, **info):
        if self.info_callback is not None:
            self.info_callback({"x": x, "i": i, "sigma": self.sigma(t), "sigma_hat": self.sigma(t_up),
                                "denoised": denoised, "t": t, "t_up": t_up, **info})

    def fast(self, x, t_start, t_end, nfe, eta=0.0, s_noise=1.0, noise_sampler=None):
        if not t_end > t_start and eta:
            raise InputError("dpm_fast: eta must be 0 for reverse sampling")
        if eta and noise_sampler is None:
            noise_sampler = default_noise_sampler(x, seed=self.extra_args.get("seed"))
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            cache: dict = {}
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, _ = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.0
            eps = self.eps(cache, "eps", x, t)
            self._report(x, i, t, t, x - self.sigma(t) * eps)
            step = (self.step_1, self.step_2, self.step_3)[order - 1]
            x = step(x, t, t_next_, cache)
            if eta:  # ComfyUI adds su * noise also when su is 0 (eta 0); we skip that draw (same x)
                x = x + su * s_noise * noise_sampler(self.sigma(t), self.sigma(t_next))
        return x

    def adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0,
                 dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None):
        if order not in {2, 3}:
            raise InputError("dpm_adaptive: order should be 2 or 3")
        forward = t_end > t_start
        if not forward and eta:
            raise InputError("dpm_adaptive: eta must be 0 for reverse sampling")
        if eta and noise_sampler is None:
            noise_sampler = default_noise_sampler(x, seed=self.extra_args.get("seed"))
        h_init = abs(h_init) * (1 if forward else -1)
        atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
        s, x_prev = t_start, x
        pid = _PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            cache: dict = {}
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            if eta:
                sd, _ = get_ancestral_step(self.sigma(s), self.sigma(t), eta)
                t_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t) ** 2 - self.sigma(t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.0
            eps = self.eps(cache, "eps", x, s)
            denoised = x - self.sigma(s) * eps
            if order == 2:
                x_low = self.step_1(x, s, t_, cache)
                x_high = self.step_2(x, s, t_, cache)
            else:
                x_low = self.step_2(x, s, t_, cache, r1=1 / 3)
                x_high = self.step_3(x, s, t_, cache)
            delta = torch.maximum(atol_t.to(x.device), rtol_t.to(x.device) * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose_step(error):
                x_prev = x_low
                x = x_high
                if eta:  # as in fast(): no draw when su is 0
                    x = x + su * s_noise * noise_sampler(self.sigma(s), self.sigma(t))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            self._report(x, info["steps"] - 1, s, s, denoised, error=error, h=pid.h, **info)
            if info["steps"] >= DPM_ADAPTIVE_MAX_STEPS:  # ComfyUI has no bound; a served request needs one
                raise InputError(f"dpm_adaptive did not reach the end of the schedule in {DPM_ADAPTIVE_MAX_STEPS} "
                                 f"attempted steps ({info['nfe']} model calls); use a fixed-step sampler")
        return x, info


# dpm_adaptive's attempted steps before it stops with an error: its model calls follow its error control, not the
# KSampler's steps (which the server's work budget counts); at its defaults it takes tens of steps
DPM_ADAPTIVE_MAX_STEPS = 1000


def _dpm_sigma_range(sigmas):
    """ComfyUI ksampler("dpm_fast"/"dpm_adaptive"): from sigmas[0] down to the last nonzero sigma."""
    sigma_min = sigmas[-1]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    sigma_max = sigmas[0]
    if sigma_min <= 0 or sigma_max <= 0:
        raise InputError("dpm_fast / dpm_adaptive: sigma_min and sigma_max must not be 0")
    return sigma_min, sigma_max


@torch.no_grad()
def sample_dpm_fast(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, s_noise=1.0, noise_sampler=None):
    """DPM-Solver-Fast: len(sigmas)-1 model calls on steps uniform in -log(sigma), whatever the schedule's
    inner sigmas (ComfyUI only takes its first and last nonzero sigma)."""
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = _dpm_sigma_range(sigmas)
    solver = _DPMSolver(model, {} if extra_args is None else extra_args, callback)
    return solver.fast(x, solver.t(sigma_max.clone()), solver.t(sigma_min.clone()), len(sigmas) - 1, eta, s_noise,
                       noise_sampler)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, rtol=0.05,
                        atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0, accept_safety=0.81, eta=0.0,
                        s_noise=1.0, noise_sampler=None, return_info=False):
    """DPM-Solver-12/23 with adaptive steps between the schedule's first and last nonzero sigma (ComfyUI);
    the number of model calls depends on the error control, not on the schedule's length."""
    if len(sigmas) <= 1:
        return x
    sigma_min, sigma_max = _dpm_sigma_range(sigmas)
    solver = _DPMSolver(model, {} if extra_args is None else extra_args, callback)
    x, info = solver.adaptive(x, solver.t(sigma_max.clone()), solver.t(sigma_min.clone()), order, rtol, atol, h_init,
                              pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise, noise_sampler)
    return (x, info) if return_info else x


@torch.no_grad()
def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI's "ddim" is euler (it only changes how inpainting noise is drawn)."""
    return sample_euler(model, x, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_euler_pp(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI's sample_euler_pp (comfy_extras/nodes_advanced_samplers.py, SamplerEulerCFGpp version "alternative"):
    euler on the derivative of x - denoised + uncond_denoised, d = (x - 2 denoised + uncond) / sigma, with the uncond
    prediction as the CFG++ samplers take it (the uncond pass runs at cfg 1 too; zeros without a negative). Unlike
    euler_cfg_pp no first-sigma offset: sigma 1 is used as it is."""
    extra_args = {} if extra_args is None else extra_args
    holder = _capture_uncond(model, "euler_pp (SamplerEulerCFGpp 'alternative')")
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = to_d(x - denoised + holder[0], sigmas[i], denoised)
        _report(callback, x, i, sigmas[i], denoised)
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


LCM_UPSCALE_METHODS = ["bislerp", "nearest-exact", "bilinear", "area", "bicubic"]


@torch.no_grad()
def sample_lcm_upscale(model, x, sigmas, extra_args=None, callback=None, disable=None, total_upscale=2.0,
                       upscale_method="bislerp", upscale_steps=None, noise_inds=None, initial_noise=True):
    """ComfyUI's sample_lcm_upscale (comfy_extras/nodes_advanced_samplers.py, SamplerLCMUpscale): lcm whose latent is
    resized after each of its first steps, the scale rising linearly to total_upscale over upscale_steps steps (None:
    half the schedule) -- the denoised prediction is resized (comfy.utils.common_upscale, no crop) and the noise of
    the next sigma added at the new size. The result is larger than x (smaller below 1).

    Its noise is torch.randn_like in ComfyUI: the global generator as prepare_noise left it (noise.global_generator:
    seeded with extra_args["seed"], advanced by the initial noise of x's shape, drawn with the LATENT's batch_index
    `noise_inds`; initial_noise False: not advanced, as DisableNoise draws nothing), drawn on the CPU: ComfyUI-on-CPU's
    numbers, drawn as randn_like draws them: in x's memory layout (bislerp's result is channels-last). Without a
    seed the global generator itself. As ComfyUI's, the noise is added in place to the resized prediction, or to the
    prediction itself in a step without resizing (which the callback got)."""
    from sd35fp8.image_ops import common_upscale

    from .noise import global_generator

    extra_args = {} if extra_args is None else extra_args
    if upscale_method not in LCM_UPSCALE_METHODS:
        raise InputError(f"lcm_upscale: upscale_method {upscale_method!r} is not one of {LCM_UPSCALE_METHODS}")
    if upscale_steps is None:
        upscale_steps = max(len(sigmas) // 2 + 1, 2)
    else:
        upscale_steps = min(upscale_steps + 1, len(sigmas) + 1)
    upscales = np.linspace(1.0, total_upscale, upscale_steps)[1:]  # float64, as ComfyUI's
    seed = extra_args.get("seed")
    generator = None if seed is None else global_generator(seed, tuple(x.shape) if initial_noise else None,
                                                           noise_inds)
    h, w = x.shape[-2:]
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, x, i, sigmas[i], denoised)
        x = denoised
        if i < len(upscales):
            x = common_upscale(x, round(w * upscales[i]), round(h * upscales[i]), upscale_method, "disabled")
        if sigmas[i + 1] > 0:
            noise = torch.empty_like(x, device="cpu").normal_(generator=generator)
            x += sigmas[i + 1] * noise.to(x.device)
    return x


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral": sample_euler_ancestral,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "heun": sample_heun,
    "heunpp2": sample_heunpp2,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_sde_gpu": sample_dpmpp_sde,  # *_gpu: ComfyUI's GPU Brownian tree; ours is always on the CPU
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_2m_sde_heun_gpu": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde,
    "ddpm": sample_ddpm,
    "lcm": sample_lcm,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "res_multistep": sample_res_multistep,
    "res_multistep_cfg_pp": sample_res_multistep_cfg_pp,
    "res_multistep_ancestral": sample_res_multistep_ancestral,
    "res_multistep_ancestral_cfg_pp": sample_res_multistep_ancestral_cfg_pp,
    "gradient_estimation": sample_gradient_estimation,
    "gradient_estimation_cfg_pp": sample_gradient_estimation_cfg_pp,
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": sample_sa_solver_pece,
    "ddim": sample_ddim,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}


# samplers only a node's SAMPLER runs (ComfyUI's comfy.samplers.KSAMPLER(function) of
# comfy_extras/nodes_advanced_samplers.py), not KSampler names: SamplerEulerCFGpp "alternative", SamplerLCMUpscale
NODE_SAMPLERS: dict[str, Callable] = {
    "euler_pp": sample_euler_pp,
    "lcm_upscale": sample_lcm_upscale,
}
# samplers whose per-step noise continues the initial noise's generator (ComfyUI's global one, torch.randn_like):
# the workflow hands them the LATENT's batch_index (noise_inds) and whether noise was drawn (initial_noise)
GLOBAL_RNG_SAMPLERS = frozenset({"lcm_upscale"})


def get_sampler(name: str) -> Callable:
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(name: str, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
           callback: Callback | None = None, disable: bool | None = None, **options) -> torch.Tensor:
    """Run sampler `name` (ComfyUI name) from the noise-scaled x [B, C, H, W] float32 along sigmas."""
    fn = NODE_SAMPLERS[name] if name in NODE_SAMPLERS else get_sampler(name)
    if x.dtype != torch.float32 or sigmas.dtype != torch.float32:
        raise InputError(f"sampling runs in float32; got x {x.dtype}, sigmas {sigmas.dtype}")
    if sigmas.ndim != 1:
        raise InputError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    return fn(model, x, sigmas.to(x.device), extra_args=extra_args, callback=callback, disable=disable, **options)
