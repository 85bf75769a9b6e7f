"""The samplers added after the first set: res_multistep(_ancestral), gradient_estimation, ipndm_v, deis,
dpm_fast, dpm_adaptive, er_sde.

Each runs against a transcription of ComfyUI's own function (comfy/k_diffusion/sampling.py and deis.py of
comfyanonymous/ComfyUI 02159d814dee609a; unchanged in these functions from Comfy-Org/ComfyUI a125cd84
except the `noise_scale` factor, 1.0 for SD3) written below, on a toy denoiser over flow-matching
(shift 3) and Karras schedules with the same seed; they must agree to float32 rounding. The
transcriptions take model_sampling as an argument where ComfyUI reads model.inner_model's, and
run under ComfyUI's KSAMPLER / ksampler() wrapping (dpm_fast / dpm_adaptive sigma range).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sd35fp8 import generation
from sd35fp8.sampling import (
    SAMPLERS,
    Conditioning,
    get_sigmas,
    sample,
)
from sd35fp8.sampling.samplers import deis_coefficients

from comfy_ksampling import sample_named, c_default_noise_sampler, c_get_ancestral_step, c_offset_first_sigma_for_snr, c_res_multistep, c_sample_er_sde, c_sample_gradient_estimation, Toy, start, tiny_mmdit

NEW = ["dpm_fast", "dpm_adaptive", "ipndm_v", "deis", "res_multistep", "res_multistep_ancestral",
       "gradient_estimation", "er_sde"]
DETERMINISTIC = ["dpm_fast", "dpm_adaptive", "ipndm_v", "deis", "res_multistep", "gradient_estimation"]


# ------------------------------------------------------------------ ComfyUI transcriptions
def c_sample_res_multistep(model, x, sigmas, extra_args=None, ms=None):
    return c_res_multistep(model, x, sigmas, extra_args=extra_args, eta=0.)


def c_sample_res_multistep_ancestral(model, x, sigmas, extra_args=None, ms=None):
    return c_res_multistep(model, x, sigmas, extra_args=extra_args, eta=1.)


def c_sample_ipndm_v(model, x, sigmas, extra_args=None, ms=None, max_order=4):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    t_steps = sigmas
    buffer_model = []
    for i in range(len(sigmas) - 1):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            h_n = (t_next - t_cur)
            h_n_1 = (t_cur - t_steps[i - 1])
            coeff1 = (2 + (h_n / h_n_1)) / 2
            coeff2 = -(h_n / h_n_1) / 2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1])
        elif order == 3:
            h_n = (t_next - t_cur)
            h_n_1 = (t_cur - t_steps[i - 1])
            h_n_2 = (t_steps[i - 1] - t_steps[i - 2])
            temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
            coeff3 = temp * h_n_1 / h_n_2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1] + coeff3 * buffer_model[-2])
        elif order == 4:
            h_n = (t_next - t_cur)
            h_n_1 = (t_cur - t_steps[i - 1])
            h_n_2 = (t_steps[i - 1] - t_steps[i - 2])
            h_n_3 = (t_steps[i - 2] - t_steps[i - 3])
            temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            temp2 = ((1 - h_n / (3 * (h_n + h_n_1))) / 2 + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))) \
                * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2)) / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp1 - (1 + (h_n_1 / h_n_2) + (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3)))) * temp2
            coeff3 = temp1 * h_n_1 / h_n_2 + ((h_n_1 / h_n_2) + (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))) * (1 + h_n_2 / h_n_3)) * temp2
            coeff4 = -temp2 * (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))) * h_n_1 / h_n_2
            x_next = x_cur + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1] + coeff3 * buffer_model[-2] + coeff4 * buffer_model[-3])
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur.detach()
        else:
            buffer_model.append(d_cur.detach())
    return x_next


# deis.py
def c_edm2t(edm_steps, epsilon_s=1e-3, sigma_min=0.002, sigma_max=80):
    vp_sigma_inv = lambda beta_d, beta_min: lambda sigma: ((beta_min ** 2 + 2 * beta_d * (sigma ** 2 + 1).log()).sqrt() - beta_min) / beta_d
    vp_beta_d = 2 * (np.log(torch.tensor(sigma_min).cpu() ** 2 + 1) / epsilon_s - np.log(torch.tensor(sigma_max).cpu() ** 2 + 1)) / (epsilon_s - 1)
    vp_beta_min = np.log(torch.tensor(sigma_max).cpu() ** 2 + 1) - 0.5 * vp_beta_d
    vp_beta_d, vp_beta_min = torch.as_tensor(vp_beta_d), torch.as_tensor(vp_beta_min)
    t_steps = vp_sigma_inv(vp_beta_d.clone().detach().cpu(), vp_beta_min.clone().detach().cpu())(edm_steps.clone().detach().cpu())
    return t_steps, vp_beta_min, vp_beta_d + vp_beta_min


def c_cal_poly(prev_t, j, taus):
    poly = 1
    for k in range(prev_t.shape[0]):
        if k == j:
            continue
        poly *= (taus - prev_t[k]) / (prev_t[j] - prev_t[k])
    return poly


def c_cal_intergrand(beta_0, beta_1, taus):
    with torch.inference_mode(mode=False):
        taus = taus.clone()
        beta_0 = beta_0.clone()
        beta_1 = beta_1.clone()
        with torch.enable_grad():
            taus.requires_grad_(True)
            alpha = torch.exp(-0.5 * taus ** 2 * (beta_1 - beta_0) - taus * beta_0)
            log_alpha = alpha.log()
            log_alpha.sum().backward()
            d_log_alpha_dtau = taus.grad
    return -0.5 * d_log_alpha_dtau / torch.sqrt(alpha * (1 - alpha))


def c_get_deis_coeff_list(t_steps, max_order, N=10000):
    t_steps, beta_0, beta_1 = c_edm2t(t_steps)
    C = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):  # noqa: RUF007 (as in deis.py)
        order = min(i + 1, max_order)
        if order == 1:
            C.append([])
        else:
            taus = torch.linspace(t_cur, t_next, N)
            dtau = (t_next - t_cur) / N
            prev_t = t_steps[[i - k for k in range(order)]]
            coeff_temp = []
            integrand = c_cal_intergrand(beta_0, beta_1, taus)
            for j in range(order):
                poly = c_cal_poly(prev_t, j, taus)
                coeff_temp.append(torch.sum(integrand * poly) * dtau)
            C.append(coeff_temp)
    return C


def c_sample_deis(model, x, sigmas, extra_args=None, ms=None, max_order=3):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    x_next = x
    coeff_list = c_get_deis_coeff_list(sigmas, max_order)
    buffer_model = []
    for i in range(len(sigmas) - 1):
        t_cur = sigmas[i]
        t_next = sigmas[i + 1]
        x_cur = x_next
        denoised = model(x_cur, t_cur * s_in, **extra_args)
        d_cur = (x_cur - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next <= 0:
            order = 1
        if order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            coeff_cur, coeff_prev1 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1]
        elif order == 3:
            coeff_cur, coeff_prev1, coeff_prev2 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1] + coeff_prev2 * buffer_model[-2]
        elif order == 4:
            coeff_cur, coeff_prev1, coeff_prev2, coeff_prev3 = coeff_list[i]
            x_next = x_cur + coeff_cur * d_cur + coeff_prev1 * buffer_model[-1] + coeff_prev2 * buffer_model[-2] + coeff_prev3 * buffer_model[-3]
        if len(buffer_model) == max_order - 1:
            for k in range(max_order - 2):
                buffer_model[k] = buffer_model[k + 1]
            buffer_model[-1] = d_cur.detach()
        else:
            buffer_model.append(d_cur.detach())
    return x_next


class CPIDStepSizeController:
    def __init__(self, h, pcoeff, icoeff, dcoeff, order=1, accept_safety=0.81, eps=1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs = []

    def limiter(self, x):
        return 1 + math.atan(x - 1)

    def propose_step(self, error):
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = self.limiter(factor)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


class CDPMSolver:
    def __init__(self, model, extra_args=None):
        self.model = model
        self.extra_args = {} if extra_args is None else extra_args

    def t(self, sigma):
        return -sigma.log()

    def sigma(self, t):
        return t.neg().exp()

    def eps(self, eps_cache, key, x, t):
        if key in eps_cache:
            return eps_cache[key], eps_cache
        sigma = self.sigma(t) * x.new_ones([x.shape[0]])
        eps = (x - self.model(x, sigma, **self.extra_args)) / self.sigma(t)
        return eps, {key: eps, **eps_cache}

    def dpm_solver_1_step(self, x, t, t_next, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
        x_1 = x - self.sigma(t_next) * h.expm1() * eps
        return x_1, eps_cache

    def dpm_solver_2_step(self, x, t, t_next, r1=1 / 2, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, 'eps_r1', u1, s1)
        x_2 = x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        return x_2, eps_cache

    def dpm_solver_3_step(self, x, t, t_next, r1=1 / 3, r2=2 / 3, eps_cache=None):
        eps_cache = {} if eps_cache is None else eps_cache
        h = t_next - t
        eps, eps_cache = self.eps(eps_cache, 'eps', x, t)
        s1 = t + r1 * h
        s2 = t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, eps_cache = self.eps(eps_cache, 'eps_r1', u1, s1)
        u2 = x - self.sigma(s2) * (r2 * h).expm1() * eps - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        eps_r2, eps_cache = self.eps(eps_cache, 'eps_r2', u2, s2)
        x_3 = x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        return x_3, eps_cache

    def dpm_solver_fast(self, x, t_start, t_end, nfe, eta=0., s_noise=1., noise_sampler=None):
        noise_sampler = c_default_noise_sampler(x, seed=self.extra_args.get("seed", None)) if noise_sampler is None else noise_sampler
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
        if nfe % 3 == 0:
            orders = [3] * (m - 2) + [2, 1]
        else:
            orders = [3] * (m - 1) + [nfe % 3]
        for i in range(len(orders)):
            eps_cache = {}
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, su = c_get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
                t_next_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5
            else:
                t_next_, su = t_next, 0.
            _, eps_cache = self.eps(eps_cache, "eps", x, t)
            if orders[i] == 1:
                x, eps_cache = self.dpm_solver_1_step(x, t, t_next_, eps_cache=eps_cache)
            elif orders[i] == 2:
                x, eps_cache = self.dpm_solver_2_step(x, t, t_next_, eps_cache=eps_cache)
            else:
                x, eps_cache = self.dpm_solver_3_step(x, t, t_next_, eps_cache=eps_cache)
            x = x + su * s_noise * noise_sampler(self.sigma(t), self.sigma(t_next))
        return x

    def dpm_solver_adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.,
                            icoeff=1., dcoeff=0., accept_safety=0.81, eta=0., s_noise=1., noise_sampler=None):
        noise_sampler = c_default_noise_sampler(x, seed=self.extra_args.get("seed", None)) if noise_sampler is None else noise_sampler
        forward = t_end > t_start
        h_init = abs(h_init) * (1 if forward else -1)
        atol = torch.tensor(atol)
        rtol = torch.tensor(rtol)
        s = t_start
        x_prev = x
        pid = CPIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
        info = {'steps': 0, 'nfe': 0, 'n_accept': 0, 'n_reject': 0}
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            eps_cache = {}
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            if eta:
                sd, su = c_get_ancestral_step(self.sigma(s), self.sigma(t), eta)
                t_ = torch.minimum(t_end, self.t(sd))
                su = (self.sigma(t) ** 2 - self.sigma(t_) ** 2) ** 0.5
            else:
                t_, su = t, 0.
            _, eps_cache = self.eps(eps_cache, "eps", x, s)
            if order == 2:
                x_low, eps_cache = self.dpm_solver_1_step(x, s, t_, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_2_step(x, s, t_, eps_cache=eps_cache)
            else:
                x_low, eps_cache = self.dpm_solver_2_step(x, s, t_, r1=1 / 3, eps_cache=eps_cache)
                x_high, eps_cache = self.dpm_solver_3_step(x, s, t_, eps_cache=eps_cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            accept = pid.propose_step(error)
            if accept:
                x_prev = x_low
                x = x_high + su * s_noise * noise_sampler(self.sigma(s), self.sigma(t))
                s = t
                info['n_accept'] += 1
            else:
                info['n_reject'] += 1
            info['nfe'] += order
            info['steps'] += 1
        return x, info


def c_ksampler_dpm_fast(model, x, sigmas, extra_args=None, ms=None):
    sigma_min = sigmas[-1]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    solver = CDPMSolver(model, extra_args)
    return solver.dpm_solver_fast(x, solver.t(sigmas[0].clone()), solver.t(sigma_min.clone()), len(sigmas) - 1)


def c_ksampler_dpm_adaptive(model, x, sigmas, extra_args=None, ms=None):
    sigma_min = sigmas[-1]
    if sigma_min == 0:
        sigma_min = sigmas[-2]
    solver = CDPMSolver(model, extra_args)
    return solver.dpm_solver_adaptive(x, solver.t(sigmas[0].clone()), solver.t(sigma_min.clone()))[0]


REFERENCE = {
    "res_multistep": c_sample_res_multistep,
    "res_multistep_ancestral": c_sample_res_multistep_ancestral,
    "gradient_estimation": c_sample_gradient_estimation,
    "ipndm_v": c_sample_ipndm_v,
    "deis": c_sample_deis,
    "dpm_fast": c_ksampler_dpm_fast,
    "dpm_adaptive": c_ksampler_dpm_adaptive,
    "er_sde": c_sample_er_sde,
}


# ------------------------------------------------------------------ toy model and runs
SCHEDULES = [("simple", 8, 1.0), ("karras", 8, 1.0), ("normal", 6, 0.6), ("simple", 3, 1.0)]


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
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6)


def test_deis_coefficients_match_comfyui():
    for sigmas in (get_sigmas("simple", 10, 3.0), get_sigmas("karras", 7, 3.0)):
        for order in (2, 3, 4):
            ours, ref = deis_coefficients(sigmas, order), c_get_deis_coeff_list(sigmas, order)
            assert [len(c) for c in ours] == [len(c) for c in ref]
            for a, b in zip(ours, ref):
                for u, v in zip(a, b):
                    torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)


def test_samplers_options_match_comfyui():
    """Non-default options reach the sampler as ComfyUI's extra_options do."""
    sigmas = get_sigmas("simple", 8, 3.0)
    x = start(sigmas, 5)
    cases = [
        ("res_multistep_ancestral", {"eta": 0.5, "s_noise": 0.7},
         lambda m, y: c_res_multistep(m, y, sigmas, {"seed": 5}, eta=0.5, s_noise=0.7)),
        ("gradient_estimation", {"ge_gamma": 3.0},
         lambda m, y: c_sample_gradient_estimation(m, y, sigmas, {"seed": 5}, ge_gamma=3.0)),
        ("ipndm_v", {"max_order": 3}, lambda m, y: c_sample_ipndm_v(m, y, sigmas, {"seed": 5}, max_order=3)),
        ("deis", {"max_order": 4}, lambda m, y: c_sample_deis(m, y, sigmas, {"seed": 5}, max_order=4)),
        ("er_sde", {"s_noise": 0.5, "max_stage": 2},
         lambda m, y: c_sample_er_sde(m, y, sigmas, {"seed": 5}, ms=m.model_sampling, s_noise=0.5, max_stage=2)),
        ("dpm_adaptive", {"order": 2, "rtol": 0.02},
         lambda m, y: CDPMSolver(m, {"seed": 5}).dpm_solver_adaptive(
             y, -sigmas[0].log(), -sigmas[-2].log(), order=2, rtol=0.02)[0]),
        ("dpm_fast", {"eta": 0.5},
         lambda m, y: CDPMSolver(m, {"seed": 5}).dpm_solver_fast(y, -sigmas[0].log(), -sigmas[-2].log(), 8, eta=0.5)),
    ]
    for name, opts, ref_fn in cases:
        ours = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 5}, disable=True, **opts)
        torch.testing.assert_close(ours, ref_fn(Toy(), x.clone()), rtol=1e-5, atol=2e-6, msg=name)


def test_names_in_comfyui_order():
    comfy = ["euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
             "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
             "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
             "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
             "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
             "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
             "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2"]
    ours = list(SAMPLERS)
    assert set(NEW) <= set(ours)
    assert ours == [n for n in comfy if n in ours]


def test_callbacks_and_deterministic_samplers_draw_no_noise():
    sigmas = get_sigmas("simple", 6, 3.0)
    for name in NEW:
        seen = []
        sample(name, Toy(), start(sigmas, 3), sigmas, extra_args={"seed": 3}, callback=seen.append, disable=True)
        assert seen and all({"x", "i", "sigma", "sigma_hat", "denoised"} <= set(d) for d in seen)
        if name == "dpm_fast":  # one report per solver step: 6 model calls = orders 3, 2, 1
            assert [d["i"] for d in seen] == [0, 1, 2]
        elif name != "dpm_adaptive":  # adaptive: one report per attempted step
            assert [d["i"] for d in seen] == list(range(6))
    x = start(sigmas, 3)
    for name in NEW:
        a = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 3}, disable=True)
        b = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 4}, disable=True)
        assert torch.equal(a, b) == (name in DETERMINISTIC), name


def test_rows_of_a_batch_match_lone_runs():
    """Cross-prompt batching: the deterministic samplers give each row its lone result, except dpm_adaptive,
    whose step-size control measures the error over the whole batch."""
    sigmas = get_sigmas("simple", 6, 3.0)
    x = start(sigmas, 9)
    for name in DETERMINISTIC:
        together = sample(name, Toy(), x.clone(), sigmas, extra_args={"seed": 9}, disable=True)
        alone = torch.cat([sample(name, Toy(), x[i:i + 1].clone(), sigmas, extra_args={"seed": 9}, disable=True)
                           for i in range(len(x))])
        if name == "dpm_adaptive":
            assert not torch.equal(together, alone)  # other step sizes (tiny effect on this smooth toy)
        else:
            torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-6, msg=name)


# ------------------------------------------------------------------ end to end through the generation core
@pytest.fixture(scope="module")
def mmdit():
    return tiny_mmdit()


@pytest.mark.parametrize("name", NEW)
def test_generation_core_accepts_name(mmdit, name):
    steps = []
    z = sample_named(mmdit, name, callback=lambda i, n, d: steps.append(i))
    assert z.shape == (1, 16, 8, 8) and torch.isfinite(z).all()
    assert torch.equal(z, sample_named(mmdit, name)) and steps


def test_dpm_adaptive_is_bounded(monkeypatch):
    """dpm_adaptive's steps follow its error control, not the schedule: past DPM_ADAPTIVE_MAX_STEPS attempts it
    stops with an InputError (a served request's work stays bounded)."""
    from sd35fp8.errors import InputError
    from sd35fp8.sampling import samplers

    monkeypatch.setattr(samplers, "DPM_ADAPTIVE_MAX_STEPS", 3)
    sig = torch.linspace(1, 0, 6)
    with pytest.raises(InputError, match="did not reach the end"):
        samplers.SAMPLERS["dpm_adaptive"](lambda x, s, **k: x * 0.5, torch.randn(1, 4, 8, 8), sig)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_sampler_on_the_gpu_engine_gpu(mmdit):
    """Every KSampler name through the generation core on the fused engine (CUDA graphs, bf16) on CUDA: the noise
    each sampler draws on the CPU reaches the device, and the result is finite and repeatable."""
    import copy

    from sd35fp8.fast import build_engine
    from sd35fp8.sampling.samplers import SAMPLERS

    dev = torch.device("cuda")
    engine = build_engine(copy.deepcopy(mmdit).to(torch.bfloat16), dev)
    g = torch.Generator().manual_seed(1)
    ctx, pooled = torch.randn(1, 5, 32, generator=g).to(dev), torch.randn(1, 48, generator=g).to(dev)
    cond, uncond = Conditioning(ctx, pooled), Conditioning(ctx.flip(1), pooled.flip(1))
    for name in SAMPLERS:
        settings = generation.SampleSettings(steps=4, cfg=3.0, sampler=name, scheduler="simple")
        with torch.no_grad():
            z = generation.sample(engine, cond, uncond, torch.zeros(1, 16, 8, 8, device=dev), settings, seed=3)
            z2 = generation.sample(engine, cond, uncond, torch.zeros(1, 16, 8, 8, device=dev), settings, seed=3)
        assert z.device.type == "cuda" and torch.isfinite(z).all(), name
        assert torch.equal(z, z2), name
