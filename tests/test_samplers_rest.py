"""The last samplers of ComfyUI's KSampler list: ddpm, seeds_2, seeds_3, sa_solver, sa_solver_pece.

Each runs against a transcription of ComfyUI's own function written below (comfy/k_diffusion/sampling.py of
comfyanonymous/ComfyUI 02159d814dee609a: sample_ddpm / generic_step_sampler / DDPMSampler_step, sample_seeds_2,
sample_seeds_3, sample_sa_solver(_pece); comfy/k_diffusion/sa_solver.py as stored at 4328fa894d96811b), taking the
CONST branches ComfyUI takes for SD3 (sigma_to_half_log_snr = -logit, offset_first_sigma_for_snr, the flow
percent_to_sigma; noise_scale 1.0), on a toy denoiser over flow-matching (shift 3) and Karras schedules with the same
seed; results must agree to float32 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from sd35fp8.errors import InputError
from sd35fp8.sampling import (
    SAMPLERS,
    FlowMatching,
    get_sigmas,
    sample,
)
from sd35fp8.sampling.samplers import sa_b_coeffs

from comfy_ksampling import sample_named, c_default_noise_sampler, c_offset_first_sigma_for_snr, Toy, start, tiny_mmdit

NEW = ["ddpm", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"]


# ------------------------------------------------------------------ ComfyUI transcriptions
class CFlow:
    """ComfyUI ModelSamplingDiscreteFlow's percent_to_sigma (CONST), python floats."""

    def __init__(self, shift=3.0):
        self.shift = shift

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        t = 1.0 - percent
        if self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)


def c_sigma_to_half_log_snr(sigma):  # CONST
    return sigma.logit().neg()


def c_half_log_snr_to_sigma(half_log_snr):  # CONST
    return half_log_snr.neg().sigmoid()


def c_ei_h_phi_1(h):
    return torch.expm1(h)


def c_ei_h_phi_2(h):
    return (torch.expm1(h) - h) / h


def c_DDPMSampler_step(x, sigma, sigma_prev, noise, noise_sampler):
    alpha_cumprod = 1 / ((sigma * sigma) + 1)
    alpha_cumprod_prev = 1 / ((sigma_prev * sigma_prev) + 1)
    alpha = (alpha_cumprod / alpha_cumprod_prev)
    mu = (1.0 / alpha).sqrt() * (x - (1 - alpha) * noise / (1 - alpha_cumprod).sqrt())
    if sigma_prev > 0:
        mu += ((1 - alpha) * (1. - alpha_cumprod_prev) / (1. - alpha_cumprod)).sqrt() * noise_sampler(sigma, sigma_prev)
    return mu


def c_generic_step_sampler(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, step_function=None):
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed", None)
    noise_sampler = c_default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = step_function(x / torch.sqrt(1.0 + sigmas[i] ** 2.0), sigmas[i], sigmas[i + 1], (x - denoised) / sigmas[i], noise_sampler)
        if sigmas[i + 1] != 0:
            x *= torch.sqrt(1.0 + sigmas[i + 1] ** 2.0)
    return x


def c_sample_ddpm(model, x, sigmas, extra_args=None, ms=None, noise_sampler=None):
    return c_generic_step_sampler(model, x, sigmas, extra_args, None, noise_sampler, c_DDPMSampler_step)


def c_sample_seeds_2(model, x, sigmas, extra_args=None, ms=None, eta=1., s_noise=1., noise_sampler=None, r=0.5,
                     solver_type="phi_1"):
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed", None)
    noise_sampler = c_default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    sigma_fn = c_half_log_snr_to_sigma
    lambda_fn = c_sigma_to_half_log_snr
    sigmas = c_offset_first_sigma_for_snr(sigmas, ms)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = sigma_fn(lambda_s_1)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * c_ei_h_phi_1(-r * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, fac)
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * c_ei_h_phi_1(-h_eta) * denoised_d
        elif solver_type == "phi_2":
            b2 = c_ei_h_phi_2(-h_eta) / r
            b1 = c_ei_h_phi_1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject_noise:
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_1, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def c_sample_seeds_3(model, x, sigmas, extra_args=None, ms=None, eta=1., s_noise=1., noise_sampler=None, r_1=1./3,
                     r_2=2./3):
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed", None)
    noise_sampler = c_default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    inject_noise = eta > 0 and s_noise > 0
    sigma_fn = c_half_log_snr_to_sigma
    lambda_fn = c_sigma_to_half_log_snr
    sigmas = c_offset_first_sigma_for_snr(sigmas, ms)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = sigma_fn(lambda_s_1), sigma_fn(lambda_s_2)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        x_2 = sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x - alpha_s_1 * c_ei_h_phi_1(-r_1 * h_eta) * denoised
        if inject_noise:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1 * s_in, **extra_args)
        a3_2 = r_2 / r_1 * c_ei_h_phi_2(-r_2 * h_eta)
        a3_1 = c_ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject_noise:
            segment_factor = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_1, sigma_s_2)
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2 * s_in, **extra_args)
        b3 = c_ei_h_phi_2(-h_eta) / r_2
        b1 = c_ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject_noise:
            segment_factor = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(sigma_s_2, sigmas[i + 1])
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


# sa_solver.py
def c_compute_exponential_coeffs(s, t, solver_order, tau_t):
    tau_mul = 1 + tau_t ** 2
    h = t - s
    p = torch.arange(solver_order, dtype=s.dtype, device=s.device)
    product_terms_factored = (t ** p - s ** p * (-tau_mul * h).exp())
    recursive_depth_mat = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    recursive_coeff_mat = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau_t > 0:
        recursive_coeff_mat = recursive_coeff_mat - (recursive_depth_mat * math.log(tau_mul))
    signs = torch.where(recursive_depth_mat % 2 == 0, 1.0, -1.0)
    recursive_coeff_mat = (recursive_coeff_mat.exp() * signs).tril()
    return recursive_coeff_mat @ product_terms_factored


def c_compute_simple_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t,
                                               is_corrector_step=False):
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


def c_compute_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, simple_order_2=False,
                                        is_corrector_step=False):
    num_timesteps = curr_lambdas.shape[0]
    if simple_order_2 and num_timesteps == 2:
        return c_compute_simple_stochastic_adams_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t,
                                                          is_corrector_step)
    exp_integral_coeffs = c_compute_exponential_coeffs(lambda_s, lambda_t, num_timesteps, tau_t)
    vandermonde_matrix_T = torch.vander(curr_lambdas, num_timesteps, increasing=True).T
    lagrange_integrals = torch.linalg.solve(vandermonde_matrix_T, exp_integral_coeffs)
    alpha_t = sigma_next * lambda_t.exp()
    return alpha_t * lagrange_integrals


def c_get_tau_interval_func(start_sigma, end_sigma, eta=1.0):
    def tau_func(sigma):
        if eta <= 0:
            return 0.0
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.item()
        return eta if start_sigma >= sigma >= end_sigma else 0.0
    return tau_func


def c_sample_sa_solver(model, x, sigmas, extra_args=None, ms=None, callback=None, tau_func=None, s_noise=1.0,
                       noise_sampler=None, predictor_order=3, corrector_order=4, use_pece=False,
                       simple_order_2=False):
    if len(sigmas) <= 1:
        return x
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed", None)
    noise_sampler = c_default_noise_sampler(x, seed=seed) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    model_sampling = CFlow(ms.shift)
    sigmas = c_offset_first_sigma_for_snr(sigmas, model_sampling)
    lambdas = c_sigma_to_half_log_snr(sigmas)
    if tau_func is None:
        start_sigma = model_sampling.percent_to_sigma(0.2)
        end_sigma = model_sampling.percent_to_sigma(0.8)
        tau_func = c_get_tau_interval_func(start_sigma, end_sigma, eta=1.0)
    max_used_order = max(predictor_order, corrector_order)
    x_pred = x
    h = 0.0
    tau_t = 0.0
    noise = 0.0
    pred_list = []
    lower_order_to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x_pred, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        pred_list.append(denoised)
        pred_list = pred_list[-max_used_order:]
        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)
        if corrector_order_used == 0:
            x = x_pred
        else:
            curr_lambdas = lambdas[i - corrector_order_used + 1:i + 1]
            b_coeffs = c_compute_stochastic_adams_b_coeffs(sigmas[i], curr_lambdas, lambdas[i - 1], lambdas[i], tau_t,
                                                           simple_order_2, is_corrector_step=True)
            pred_mat = torch.stack(pred_list[-corrector_order_used:], dim=1)
            corr_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t ** 2) * h).exp() * x + corr_res
            if tau_t > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                denoised = model(x, sigmas[i] * s_in, **extra_args)
                pred_list[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            curr_lambdas = lambdas[i - predictor_order_used + 1:i + 1]
            b_coeffs = c_compute_stochastic_adams_b_coeffs(sigmas[i + 1], curr_lambdas, lambdas[i], lambdas[i + 1],
                                                           tau_t, simple_order_2, is_corrector_step=False)
            pred_mat = torch.stack(pred_list[-predictor_order_used:], dim=1)
            pred_res = torch.tensordot(pred_mat, b_coeffs, dims=([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t ** 2) * h).exp() * x + pred_res
            if tau_t > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * tau_t ** 2 * h).expm1().neg().sqrt() * s_noise
                x_pred = x_pred + noise
    return x_pred


def c_sample_sa_solver_pece(model, x, sigmas, extra_args=None, ms=None, **kw):
    return c_sample_sa_solver(model, x, sigmas, extra_args=extra_args, ms=ms, use_pece=True, **kw)


REFERENCE = {
    "ddpm": c_sample_ddpm,
    "seeds_2": c_sample_seeds_2,
    "seeds_3": c_sample_seeds_3,
    "sa_solver": c_sample_sa_solver,
    "sa_solver_pece": c_sample_sa_solver_pece,
}
MODEL_CALLS_PER_STEP = {"ddpm": 1, "seeds_2": 2, "seeds_3": 3, "sa_solver": 1}


# ------------------------------------------------------------------ toy model and runs
class _NoMS:
    """The toy without a model_sampling attribute."""

    def __call__(self, x, sigma, seed=None):
        return Toy()(x, sigma)


SCHEDULES = [("simple", 8, 1.0), ("karras", 8, 1.0), ("normal", 6, 0.6), ("simple", 3, 1.0), ("beta", 12, 1.0)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}")
@pytest.mark.parametrize("name", NEW)
def test_matches_comfyui_transcription(name, schedule):
    scheduler, steps, denoise = schedule
    sigmas = get_sigmas(scheduler, steps, 3.0, denoise, sampler=name)
    seed = 1234
    x = start(sigmas, seed)
    ours_model, ref_model = Toy(), Toy()
    ours = sample(name, ours_model, x.clone(), sigmas, extra_args={"seed": seed}, disable=True)
    ref = REFERENCE[name](ref_model, x.clone(), sigmas.clone(), extra_args={"seed": seed},
                          ms=ref_model.model_sampling)
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    assert ours_model.calls == ref_model.calls
    n = len(sigmas) - 1
    if name in MODEL_CALLS_PER_STEP:  # the last step (to sigma 0) is one call for seeds too
        assert ours_model.calls == MODEL_CALLS_PER_STEP[name] * (n - 1) + 1
    else:  # pece: one more call per corrected step (all but the first)
        assert ours_model.calls == 2 * n - 1
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6)


def _no_tau(sigma):
    return 0.0


def _wide_tau(sigma):
    return 0.7 if 0.05 < float(sigma) < 0.99 else 0.0


def test_options_match_comfyui():
    """Non-default options reach the sampler as ComfyUI's extra_options do."""
    cases = [
        ("seeds_2", {"eta": 0.5, "s_noise": 0.7, "r": 0.4, "solver_type": "phi_2"}),
        ("seeds_2", {"eta": 0.0}),
        ("seeds_2", {"r": 1.0, "solver_type": "phi_2"}),  # ComfyUI's exp_heun_2_x0_sde rule
        ("seeds_3", {"eta": 0.3, "s_noise": 1.5, "r_1": 0.25, "r_2": 0.6}),
        ("seeds_3", {"eta": 0.0}),
        ("sa_solver", {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True}),
        ("sa_solver", {"predictor_order": 4, "corrector_order": 3, "s_noise": 0.5, "tau_func": _wide_tau}),
        ("sa_solver", {"tau_func": _no_tau}),
        ("sa_solver_pece", {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True,
                            "tau_func": _wide_tau}),
        ("sa_solver_pece", {"predictor_order": 1, "corrector_order": 1}),
    ]
    for sigmas in (get_sigmas("simple", 9, 3.0), get_sigmas("karras", 7, 3.0)):
        x = start(sigmas, 5)
        for name, opts in cases:
            ours = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 5}, disable=True, **opts)
            m = Toy()
            ref = REFERENCE[name](m, x.clone(), sigmas.clone(), extra_args={"seed": 5}, ms=m.model_sampling, **opts)
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6, msg=f"{name} {opts}")


def test_schedule_not_ending_at_zero_matches_comfyui():
    """A split schedule (KSamplerAdvanced's end_at_step without force_full_denoise): sa_solver keeps its orders
    to the end, ddpm / seeds step to the last nonzero sigma with noise."""
    sigmas = get_sigmas("simple", 10, 3.0)[:7].clone()
    x = start(sigmas, 11)
    for name in NEW:
        ours = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 11}, disable=True)
        m = Toy()
        ref = REFERENCE[name](m, x.clone(), sigmas.clone(), extra_args={"seed": 11}, ms=m.model_sampling)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6, msg=name)


def test_sa_b_coeffs_match_comfyui():
    lambdas = FlowMatching.half_log_snr(get_sigmas("simple", 10, 3.0)[1:-1])
    for k in (1, 2, 3, 4):
        for tau in (0.0, 1.0, 0.6):
            for simple, corrector in ((False, False), (True, False), (True, True)):
                i = 5
                args = (lambdas[i + 1].sigmoid(), lambdas[i - k + 1:i + 1], lambdas[i], lambdas[i + 1], tau, simple,
                        corrector)
                torch.testing.assert_close(sa_b_coeffs(*args), c_compute_stochastic_adams_b_coeffs(*args),
                                           rtol=0, atol=0)


def test_names_in_comfyui_order():
    comfy = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
             "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
             "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
             "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
             "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
             "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
             "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
    assert list(SAMPLERS) == comfy


def test_callbacks_and_noise():
    """One report per step; every new sampler draws per-step noise at its defaults (ddpm, seeds with eta 1,
    sa_solver inside its 20%-80% interval), none with the noise switched off."""
    sigmas = get_sigmas("simple", 6, 3.0)
    for name in NEW:
        seen = []
        ref_seen = []
        x = start(sigmas, 3)
        sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 3}, callback=seen.append, disable=True)
        assert [d["i"] for d in seen] == list(range(6))
        assert all({"x", "i", "sigma", "sigma_hat", "denoised"} <= set(d) for d in seen)
        if name.startswith("sa_solver"):  # ComfyUI reports the predicted state
            m = Toy()
            REFERENCE[name](m, x.clone(), sigmas.clone(), extra_args={"seed": 3}, ms=m.model_sampling,
                            callback=ref_seen.append)
            for a, b in zip(seen, ref_seen):
                torch.testing.assert_close(a["x"], b["x"], rtol=1e-5, atol=2e-6)
                assert float(a["sigma"]) == float(b["sigma"])
    x = start(sigmas, 3)
    quiet = {"seeds_2": {"eta": 0.0}, "seeds_3": {"eta": 0.0}, "sa_solver": {"tau_func": _no_tau},
             "sa_solver_pece": {"tau_func": _no_tau}}
    for name in NEW:
        a = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 3}, disable=True)
        b = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 4}, disable=True)
        assert not torch.equal(a, b), name
        if name in quiet:
            a = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 3}, disable=True, **quiet[name])
            b = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 4}, disable=True, **quiet[name])
            assert torch.equal(a, b), name


def test_model_sampling_needed_and_passed():
    sigmas = get_sigmas("simple", 6, 3.0)
    x = start(sigmas, 2)
    for name in ["seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"]:
        with pytest.raises(InputError, match="FlowMatching"):
            sample(name, _NoMS(), x.clone(), sigmas, extra_args={"seed": 2}, disable=True)
        ours = sample(name, _NoMS(), x.clone(), sigmas, extra_args={"seed": 2}, disable=True,
                      model_sampling=FlowMatching(3.0))
        torch.testing.assert_close(ours, sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 2}, disable=True),
                                   rtol=0, atol=0)
    # sa_solver's default stochastic interval reads the shift even when the schedule starts below 1
    low = get_sigmas("simple", 6, 3.0, 0.5)
    with pytest.raises(InputError, match="FlowMatching"):
        sample("sa_solver", _NoMS(), start(low, 2), low, extra_args={"seed": 2}, disable=True)
    sample("sa_solver", _NoMS(), start(low, 2), low, extra_args={"seed": 2}, disable=True, tau_func=_no_tau)
    sample("ddpm", _NoMS(), x.clone(), sigmas, extra_args={"seed": 2}, disable=True)  # needs none


def test_seeds_solver_type_checked():
    sigmas = get_sigmas("simple", 4, 3.0)
    with pytest.raises(InputError, match="solver_type"):
        sample("seeds_2", Toy(), start(sigmas, 1), sigmas, extra_args={"seed": 1}, disable=True, solver_type="x")


# ------------------------------------------------------------------ end to end through the generation core
@pytest.fixture(scope="module")
def mmdit():
    return tiny_mmdit()


@pytest.mark.parametrize("name", NEW)
def test_generation_core_accepts_name(mmdit, name):
    steps = []
    z = sample_named(mmdit, name, callback=lambda i, n, d: steps.append(i))
    assert z.shape == (1, 16, 8, 8) and torch.isfinite(z).all()
    assert torch.equal(z, sample_named(mmdit, name)) and steps == [1, 2, 3, 4]
    assert not torch.equal(z, sample_named(mmdit, name, seed=4))
