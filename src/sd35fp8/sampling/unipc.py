"""UniPC (ComfyUI comfy/extra_samplers/uni_pc.py: multistep B(h), data prediction) for flow models.

Same contract as samplers.py. ComfyUI runs UniPC on flow models with the variance-exploding view of
sigma (alpha = 1/sqrt(1+sigma^2), std = sigma*alpha, lambda = log(alpha/std)); kept exactly.
"""

from __future__ import annotations

import torch
from tqdm.auto import trange



def _ve_log_alpha(sigma: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log(1 / ((sigma * sigma) + 1))


def _ve_std(sigma: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(1.0 - torch.exp(2.0 * _ve_log_alpha(sigma)))


def _ve_lambda(sigma: torch.Tensor) -> torch.Tensor:
    log_alpha = _ve_log_alpha(sigma)
    return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))


def _unipc_x0(model, x, t, extra_args):
    """x0 prediction of the VE-scaled state x at sigma vector t [B] (through an eps round trip)."""
    sigma = t.view(t.shape[:1] + (1,) * (x.ndim - 1))
    model_in = x * ((sigma**2 + 1.0) ** 0.5)
    eps = (model_in - model(model_in, t, **extra_args)) / sigma
    alpha_t, std_t = torch.exp(_ve_log_alpha(t)), _ve_std(t)
    return (x - std_t.view_as(sigma) * eps) / alpha_t.view_as(sigma)


def _unipc_update(model, x, prev_x0, prev_t, t, order, variant, use_corrector, extra_args):
    """One multistep UniPC B(h) predictor(+corrector) update to sigma vector t [B]."""
    lam_prev0, lam_t = _ve_lambda(prev_t[-1]), _ve_lambda(t)
    x0_prev0 = prev_x0[-1]
    std_prev0, std_t = _ve_std(prev_t[-1]), _ve_std(t)
    alpha_t = torch.exp(_ve_log_alpha(t))
    h = lam_t - lam_prev0

    rks, d1s = [], []
    for i in range(1, order):
        rk = ((_ve_lambda(prev_t[-(i + 1)]) - lam_prev0) / h)[0]
        rks.append(rk)
        d1s.append((prev_x0[-(i + 1)] - x0_prev0) / rk)
    rks.append(1.0)
    rks = torch.tensor(rks, device=x.device)

    hh = -h[0]
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    R, b, factorial_i = [], [], 1
    for i in range(1, order + 1):
        R.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    R = torch.stack(R)
    b = torch.tensor(b, device=x.device)

    D1s = torch.stack(d1s, dim=1) if d1s else None  # [B, K, C, H, W]
    if D1s is not None:
        rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
    if use_corrector:
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(R, b)

    dims = (x.shape[0],) + (1,) * (x.ndim - 1)
    x_t_ = (std_t / std_prev0).view(dims) * x - (alpha_t * h_phi_1).view(dims) * x0_prev0
    pred_res = torch.tensordot(D1s, rhos_p, dims=([1], [0])) if D1s is not None else 0
    x_t = x_t_ - (alpha_t * b_h).view(dims) * pred_res
    x0_t = None
    if use_corrector:
        x0_t = _unipc_x0(model, x_t, t, extra_args)
        corr_res = torch.tensordot(D1s, rhos_c[:-1], dims=([1], [0])) if D1s is not None else 0
        x_t = x_t_ - (alpha_t * b_h).view(dims) * (corr_res + rhos_c[-1] * (x0_t - x0_prev0))
    return x_t, x0_t


@torch.no_grad()
def sample_uni_pc(model, x, sigmas, extra_args=None, callback=None, disable=None, variant="bh1"):
    """UniPC-bh1 as ComfyUI runs it on a flow model, final division included (see below)."""
    extra_args = {} if extra_args is None else extra_args
    ends_at_zero = bool(sigmas[-1] == 0)
    timesteps = sigmas.clone()
    if ends_at_zero:
        timesteps[-1] = 0.001  # UniPC cannot reach sigma 0
    B = x.shape[0]
    steps = len(timesteps) - 1
    order = min(3, len(timesteps) - 2)
    x = x / torch.sqrt(1.0 + timesteps[0] ** 2.0)
    prev_x0: list[torch.Tensor] = []
    prev_t: list[torch.Tensor] = []
    for step_index in trange(steps, disable=disable):
        if step_index == 0:
            vec_t = timesteps[0].expand(B)
            prev_x0, prev_t = [_unipc_x0(model, x, vec_t, extra_args)], [vec_t]
        elif step_index < order:
            vec_t = timesteps[step_index].expand(B)
            x, x0 = _unipc_update(model, x, prev_x0, prev_t, vec_t, step_index, variant, True, extra_args)
            prev_x0.append(x0)
            prev_t.append(vec_t)
        else:
            last = step_index + (1 if step_index == steps - 1 else 0)  # the last pass also steps to t_N
            for step in range(step_index, last + 1):
                vec_t = timesteps[step].expand(B)
                step_order = min(order, steps + 1 - step)
                x, x0 = _unipc_update(model, x, prev_x0, prev_t, vec_t, step_order, variant, step != steps, extra_args)
                prev_x0, prev_t = prev_x0[1:] + prev_x0[-1:], prev_t[1:] + [vec_t]
                if step < steps:
                    prev_x0[-1] = x0 if x0 is not None else _unipc_x0(model, x, vec_t, extra_args)
        if callback is not None:
            callback({"x": x, "i": step_index, "sigma": sigmas[step_index], "sigma_hat": sigmas[step_index],
                      "denoised": prev_x0[-1]})
    x = x / torch.exp(_ve_log_alpha(timesteps[-1]))
    if ends_at_zero:
        # ComfyUI writes 0.001 into the caller's sigmas in place, so KSAMPLER's
        # inverse_noise_scaling(sigmas[-1]) then divides by (1 - 0.001) on flow models.
        x = x / (1.0 - timesteps[-1])
    return x


@torch.no_grad()
def sample_uni_pc_bh2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return sample_uni_pc(model, x, sigmas, extra_args, callback, disable, variant="bh2")


