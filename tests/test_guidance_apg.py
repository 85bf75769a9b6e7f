"""APG, Mahiro and the LATENT_OPERATION nodes (LatentApplyOperation, LatentApplyOperationCFG,
LatentOperationTonemapReinhard, LatentOperationSharpen) against ComfyUI's code written out here: comfy/samplers.py
sampling_function + cfg_function (pre-CFG functions on conds_out, the CFG combination, post-CFG functions),
comfy_extras/nodes_apg.py (its closure with nonlocal state), nodes_mahiro.py, nodes_latent.py (LatentApplyOperationCFG
with the start_percent / end_percent window of Comfy-Org/ComfyUI's newest one) and
nodes_post_processing.gaussian_kernel. The denoiser's own cond / uncond predictions are captured with a recording
pre-CFG patch, so each comparison is bit for bit. Then their object_info and a run through the executor."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sd35fp8.errors import InputError
from sd35fp8.sampling import CFGDenoiser, Conditioning, DualCFGDenoiser
from sd35fp8.sampling.guidance import APG, LatentOperationCFG
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow.engine import SD3Model
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, node_info

from comfy_models import tiny_base_prompt, tiny_checkpoint_folder  # tests/ helpers


# ---- ComfyUI, written out -------------------------------------------------------------------------------------
def comfy_sampling_function(x, sigma, cond_pred, uncond_pred, cond_scale, pre=(), post=()):
    """comfy/samplers.py sampling_function after calc_cond_batch (an uncond that did not run is zeros), then
    cfg_function without a sampler_cfg_function."""
    out = [cond_pred, torch.zeros_like(cond_pred) if uncond_pred is None else uncond_pred]
    for fn in pre:
        args = {"conds": None, "conds_out": out, "cond_scale": cond_scale, "timestep": sigma, "input": x,
                "sigma": sigma, "model": None, "model_options": {}}
        out = fn(args)
    cond_pred, uncond_pred = out[0], out[1]
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in post:
        args = {"denoised": cfg_result, "cond": None, "uncond": None, "cond_scale": cond_scale, "model": None,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": sigma, "model_options": {},
                "input": x}
        cfg_result = fn(args)
    return cfg_result


def comfy_project(v0, v1):
    v1 = torch.nn.functional.normalize(v1, dim=[-1, -2, -3])
    v0_parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    v0_orthogonal = v0 - v0_parallel
    return v0_parallel, v0_orthogonal


def comfy_apg(eta, norm_threshold, momentum):
    """APG.execute's pre_cfg_function, with its closure."""
    running_avg = 0
    prev_sigma = None

    def pre_cfg_function(args):
        nonlocal running_avg, prev_sigma
        if len(args["conds_out"]) == 1:
            return args["conds_out"]
        cond = args["conds_out"][0]
        uncond = args["conds_out"][1]
        sigma = args["sigma"][0]
        cond_scale = args["cond_scale"]
        if prev_sigma is not None and sigma > prev_sigma:
            running_avg = 0
        prev_sigma = sigma
        guidance = cond - uncond
        if momentum != 0:
            if not torch.is_tensor(running_avg):
                running_avg = guidance
            else:
                running_avg = momentum * running_avg + guidance
            guidance = running_avg
        if norm_threshold > 0:
            guidance_norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
            scale = torch.minimum(torch.ones_like(guidance_norm), norm_threshold / guidance_norm)
            guidance = guidance * scale
        guidance_parallel, guidance_orthogonal = comfy_project(guidance, cond)
        modified_guidance = guidance_orthogonal + eta * guidance_parallel
        modified_cond = (uncond + modified_guidance) + (cond - uncond) / cond_scale
        return [modified_cond, uncond] + args["conds_out"][2:]

    return pre_cfg_function


def comfy_mahiro(args):
    scale = args['cond_scale']
    cond_p = args['cond_denoised']
    uncond_p = args['uncond_denoised']
    leap = cond_p * scale
    u_leap = uncond_p * scale
    cfg = args["denoised"]
    merge = (leap + cfg) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    sim = F.cosine_similarity(normu, normm).mean()
    simsc = 2 * (sim + 1)
    wm = (simsc * cfg + (4 - simsc) * leap) / 4
    return wm


def comfy_cfg_zero_star(args):
    """comfy_extras/nodes_cfg.py CFGZeroStar's post-CFG function with optimized_scale."""
    guidance_scale = args['cond_scale']
    x, cond_p, uncond_p, out = args["input"], args["cond_denoised"], args["uncond_denoised"], args["denoised"]
    pf, nf = (x - cond_p).reshape(x.shape[0], -1), (x - uncond_p).reshape(x.shape[0], -1)
    st = torch.sum(pf * nf, dim=1, keepdim=True) / (torch.sum(nf ** 2, dim=1, keepdim=True) + 1e-8)
    alpha = st.reshape([x.shape[0]] + [1] * (x.ndim - 1))
    return out + uncond_p * (alpha - 1.0) + guidance_scale * uncond_p * (1.0 - alpha)


def comfy_percent_to_sigma(shift, percent):
    """ModelSamplingDiscreteFlow.percent_to_sigma with comfy.model_sampling.time_snr_shift."""
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    t = 1.0 - percent
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def comfy_apply_operation_cfg(operation, start_percent=0.0, end_percent=1.0, shift=3.0):
    """LatentApplyOperationCFG.execute's pre_cfg_function (Comfy-Org/ComfyUI's, with the optional start_percent /
    end_percent window taken to sigmas by the MODEL's model_sampling when the node runs)."""
    sigma_start = comfy_percent_to_sigma(shift, start_percent)
    sigma_end = comfy_percent_to_sigma(shift, end_percent)

    def pre_cfg_function(args):
        conds_out = args["conds_out"]
        sigma = args["sigma"][0].item()
        if sigma > sigma_start or sigma < sigma_end:
            return conds_out
        if len(conds_out) == 2:
            conds_out[0] = operation(latent=(conds_out[0] - conds_out[1])) + conds_out[1]
        else:
            conds_out[0] = operation(latent=conds_out[0])
        return conds_out
    return pre_cfg_function


def comfy_tonemap(multiplier):
    def tonemap_reinhard(latent, **kwargs):
        latent_vector_magnitude = (torch.linalg.vector_norm(latent, dim=(1)) + 0.0000000001)[:, None]
        normalized_latent = latent / latent_vector_magnitude
        dims = list(range(1, latent_vector_magnitude.ndim))
        mean = torch.mean(latent_vector_magnitude, dim=dims, keepdim=True)
        std = torch.std(latent_vector_magnitude, dim=dims, keepdim=True)
        top = (std * 5 + mean) * multiplier
        latent_vector_magnitude *= (1.0 / top)
        new_magnitude = latent_vector_magnitude / (latent_vector_magnitude + 1.0)
        new_magnitude *= top
        return normalized_latent * new_magnitude
    return tonemap_reinhard


def comfy_gaussian_kernel(kernel_size, sigma, device=None, dtype=torch.float32):
    x, y = torch.meshgrid(torch.linspace(-1, 1, kernel_size, device=device),
                          torch.linspace(-1, 1, kernel_size, device=device), indexing="ij")
    d = torch.sqrt(x * x + y * y)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def comfy_sharpen(sharpen_radius, sigma, alpha):
    def sharpen(latent, **kwargs):
        luminance = (torch.linalg.vector_norm(latent, dim=(1)) + 1e-6)[:, None]
        normalized_latent = latent / luminance
        channels = latent.shape[1]
        kernel_size = sharpen_radius * 2 + 1
        kernel = comfy_gaussian_kernel(kernel_size, sigma, device=luminance.device)
        center = kernel_size // 2
        kernel *= alpha * -10
        kernel[center, center] = kernel[center, center] - kernel.sum() + 1.0
        padded_image = torch.nn.functional.pad(normalized_latent, (sharpen_radius, sharpen_radius, sharpen_radius,
                                                                   sharpen_radius), 'reflect')
        sharpened = torch.nn.functional.conv2d(padded_image, kernel.repeat(channels, 1, 1).unsqueeze(1),
                                               padding=kernel_size // 2, groups=channels)[
            :, :, sharpen_radius:-sharpen_radius, sharpen_radius:-sharpen_radius]
        return luminance * sharpened
    return sharpen


# ---- a toy velocity model and a recorder of the denoiser's predictions -----------------------------------------
def toy(x, sigma, context, pooled, skip_layers=(), **_):
    v = torch.tanh(x * context.mean(dim=(1, 2))[:, None, None, None]) + pooled.mean(1)[:, None, None, None]
    return v * (0.5 if skip_layers else 1.0)


def text(v):
    return Conditioning(torch.full((1, 4, 8), v), torch.full((1, 6), v / 3))


class Recorder:
    """A pre-CFG patch that keeps every conds_out it is handed (clones) and changes nothing."""

    def __init__(self):
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def start(self):
        return self

    def __call__(self, args):
        self.seen.append((args["conds_out"][0].clone(), args["conds_out"][1].clone()))
        return args["conds_out"]


def predictions(cond, uncond, cfg, x, sigma):
    """The denoiser's own [cond, uncond] x0 predictions at (x, sigma), as the pre-CFG functions get them."""
    rec = Recorder()
    CFGDenoiser(toy, cond, uncond, cfg=cfg, post_cfg=[("pre_cfg", rec)])(x, sigma)
    return rec.seen[0]


def model(*patches):
    """A MODEL patched by the named nodes in order: (node name, *widget values)."""
    m = SD3Model(mmdit=None)
    for name, *values in patches:
        cls = NODE_CLASS_MAPPINGS[name]
        (m,) = getattr(cls(None), cls.FUNCTION)(m, *values)
    return m


def op(name, *values):
    cls = NODE_CLASS_MAPPINGS[name]
    return getattr(cls(None), cls.FUNCTION)(*values)[0]


SIGMAS = [0.95, 0.8, 0.8, 0.55, 0.3, 0.7, 0.2]  # a repeat (heun-like) and a rise (a new run / restart): reset


# ---- arithmetic -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta, norm_threshold, momentum", [(1.0, 5.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.5, 0.5),
                                                           (-0.3, 2.0, -0.5), (2.0, 0.0, 0.9)])
@pytest.mark.parametrize("cfg", [4.5, 1.0])
def test_apg_matches_comfyui_step_by_step(eta, norm_threshold, momentum, cfg):
    """Each call of one run against ComfyUI's closure fed the same predictions, over a schedule whose sigma repeats
    and then rises (the running average restarts). At cfg 1 the uncond is zeros, as ComfyUI hands it."""
    c, u = text(1.0), text(-0.5)
    m = model(("APG", eta, norm_threshold, momentum))
    den = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=m.post_cfg)
    ref = comfy_apg(eta, norm_threshold, momentum)
    gen = torch.Generator().manual_seed(7)
    for s in SIGMAS:
        x = torch.randn(2, 4, 8, 8, generator=gen)
        sigma = torch.full((2,), s)
        cp, up = predictions(c, u, cfg, x, sigma)
        want = comfy_sampling_function(x, sigma, cp, None if cfg == 1.0 else up, cfg, pre=[ref])
        assert torch.equal(den(x, sigma), want)


def _apg_calls(c, u, cfg, sigmas, seed):
    """(x, sigma, the denoiser's own [cond, uncond] predictions) for a sequence of calls."""
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for s in sigmas:
        x, sigma = torch.randn(1, 4, 8, 8, generator=gen), torch.full((1,), s)
        calls.append((x, sigma, *predictions(c, u, cfg, x, sigma)))
    return calls


def test_apg_state_lives_in_the_patched_model():
    """ComfyUI keeps APG's running average and previous sigma in the closure of one APG.execute, i.e. in the
    patched MODEL: every sampling run of it (a denoiser here) shares them. Two runs whose calls interleave are one
    closure fed the calls in that order; a run that continues another's schedule (KSamplerAdvanced split at a step:
    lower sigmas) carries the running average on; a run from the top of a schedule (sigma rises) restarts it;
    another execution of the node (another MODEL) has its own."""
    c, u, cfg = text(1.0), text(-0.5), 3.0
    m = model(("APG", 0.5, 3.0, 0.7))
    first = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=m.post_cfg)
    second = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=replace(m, post_cfg=m.post_cfg + (("mahiro",),)).post_cfg)
    ref = comfy_apg(0.5, 3.0, 0.7)
    # interleaved: first at 0.95, second at 0.95 (no rise: it carries first's average), first at 0.8, ...
    for i, (x, sigma, cp, up) in enumerate(_apg_calls(c, u, cfg, [0.95, 0.95, 0.8, 0.8, 0.6, 0.6], 3)):
        den = first if i % 2 == 0 else second
        want = comfy_sampling_function(x, sigma, cp, up, cfg, pre=[ref],
                                       post=[comfy_mahiro] if den is second else [])
        assert torch.equal(den(x, sigma), want), i

    # a split schedule: the second half's run carries the first half's average (one closure over both halves)
    split = [0.95, 0.8, 0.6, 0.4, 0.25, 0.1]
    calls = _apg_calls(c, u, cfg, split, 4)
    m = model(("APG", 0.5, 3.0, 0.7))
    ref = comfy_apg(0.5, 3.0, 0.7)
    high, low = (CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=m.post_cfg) for _ in range(2))
    for i, (x, sigma, cp, up) in enumerate(calls):
        assert torch.equal((high if i < 3 else low)(x, sigma),
                           comfy_sampling_function(x, sigma, cp, up, cfg, pre=[ref])), i
    # another execution of the node starts its own average: at the second half's first call it is not the carried one
    fresh = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=model(("APG", 0.5, 3.0, 0.7)).post_cfg)
    x, sigma, cp, up = calls[3]
    got = fresh(x, sigma)
    assert torch.equal(got, comfy_sampling_function(x, sigma, cp, up, cfg, pre=[comfy_apg(0.5, 3.0, 0.7)]))
    assert not torch.allclose(got, _replay(calls, cfg, 3))
    # a new run of the same MODEL from the top of the schedule: sigma rises, the average restarts
    again = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=m.post_cfg)
    restart = comfy_apg(0.5, 3.0, 0.7)
    for x, sigma, cp, up in calls[:2]:
        assert torch.equal(again(x, sigma), comfy_sampling_function(x, sigma, cp, up, cfg, pre=[restart]))


def _replay(calls, cfg, upto):
    """ComfyUI's closure fed calls[0..upto]: the prediction of the last one."""
    ref = comfy_apg(0.5, 3.0, 0.7)
    for x, sigma, cp, up in calls[:upto + 1]:
        out = comfy_sampling_function(x, sigma, cp, up, cfg, pre=[ref])
    return out


@pytest.mark.parametrize("cfg", [4.5, 1.0])
def test_mahiro_matches_comfyui(cfg):
    """Mahiro's post-CFG function; its cosine similarity is one mean over the whole batch."""
    c, u = text(1.0), text(-0.5)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.6, 0.3])
    got = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=model(("Mahiro",)).post_cfg)(x, sigma)
    cp, up = predictions(c, u, cfg, x, sigma)
    want = comfy_sampling_function(x, sigma, cp, None if cfg == 1.0 else up, cfg, post=[comfy_mahiro])
    assert torch.equal(got, want)


def test_latent_operations_match_comfyui():
    """LatentApplyOperation with each operation, on batches of 1 and 2 and a non-square latent."""
    gen = torch.Generator().manual_seed(5)
    for shape in ((1, 16, 8, 8), (2, 16, 12, 20)):
        z = torch.randn(*shape, generator=gen) * 2
        latent = {"samples": z, "batch_index": [3] * shape[0]}
        for made, ref in ((op("LatentOperationTonemapReinhard", 1.0), comfy_tonemap(1.0)),
                          (op("LatentOperationTonemapReinhard", 0.35), comfy_tonemap(0.35)),
                          (op("LatentOperationSharpen", 3, 1.0, 0.1), comfy_sharpen(3, 1.0, 0.1)),
                          (op("LatentOperationSharpen", 7, 2.5, 1.7), comfy_sharpen(7, 2.5, 1.7))):
            (out,) = NODE_CLASS_MAPPINGS["LatentApplyOperation"](None).op(latent, made)
            assert torch.equal(out["samples"], ref(latent=z.clone()))
            assert out["batch_index"] == latent["batch_index"] and latent["samples"] is z


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_latent_apply_operation_cfg_matches_comfyui(cfg):
    c, u = text(1.0), text(-0.5)
    x = torch.randn(2, 16, 10, 12, generator=torch.Generator().manual_seed(2))
    sigma = torch.full((2,), 0.6)
    cp, up = predictions(c, u, cfg, x, sigma)
    for made, ref in ((op("LatentOperationTonemapReinhard", 0.8), comfy_tonemap(0.8)),
                      (op("LatentOperationSharpen", 4, 1.0, 0.5), comfy_sharpen(4, 1.0, 0.5))):
        m = model(("LatentApplyOperationCFG", made))
        got = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=m.post_cfg)(x, sigma)
        want = comfy_sampling_function(x, sigma, cp, None if cfg == 1.0 else up, cfg,
                                       pre=[comfy_apply_operation_cfg(ref)])
        assert torch.equal(got, want)


@pytest.mark.parametrize("start, end, shift", [(0.0, 1.0, 3.0), (0.2, 0.7, 3.0), (0.5, 0.5, 3.0), (0.0, 0.35, 1.0),
                                               (0.6, 1.0, 6.0), (0.8, 0.3, 3.0)])
def test_latent_apply_operation_cfg_window_matches_comfyui(start, end, shift):
    """The optional start_percent / end_percent: the operation only at the sigmas of that part of the MODEL's
    schedule (its shift when the node ran: a ModelSamplingSD3 after it does not move the window), bounds included;
    start after end: never."""
    c, u, cfg = text(1.0), text(-0.5), 3.0
    sharpen = op("LatentOperationSharpen", 3, 1.0, 0.8)
    m = model(("ModelSamplingSD3", shift), ("LatentApplyOperationCFG", sharpen, start, end), ("ModelSamplingSD3", 2.0))
    den = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=m.post_cfg)
    ref = comfy_apply_operation_cfg(comfy_sharpen(3, 1.0, 0.8), start, end, shift)
    bounds = [torch.tensor(comfy_percent_to_sigma(shift, p)).float().item() for p in (start, end)]
    changed = 0
    for s in [1.0, 0.97, 0.9, 0.8, 0.75, 0.6, 0.5, 0.45, 0.3, 0.2, 0.1, 0.02, *bounds]:
        x = torch.randn(1, 16, 10, 12, generator=torch.Generator().manual_seed(int(s * 1000)))
        sigma = torch.full((1,), s)
        cp, up = predictions(c, u, cfg, x, sigma)
        want = comfy_sampling_function(x, sigma, cp, up, cfg, pre=[ref])
        assert torch.equal(den(x, sigma), want), s
        changed += not torch.equal(want, comfy_sampling_function(x, sigma, cp, up, cfg))
    assert (changed == 0) == (start > end)


def test_patch_order_pre_then_cfg_then_post():
    """Pre-CFG functions run in patch order before the CFG combination, post-CFG ones in patch order after it,
    wherever the nodes sit in the chain (ComfyUI keeps two lists)."""
    c, u, cfg = text(1.0), text(-0.5), 4.0
    m = model(("CFGZeroStar",), ("LatentApplyOperationCFG", op("LatentOperationSharpen", 2, 1.0, 0.3)),
              ("Mahiro",), ("APG", 0.5, 1.5, 0.4))
    assert [p[0] for p in m.post_cfg] == ["cfg_zero_star", "pre_cfg", "mahiro", "pre_cfg"]
    den = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=m.post_cfg)
    pre = [comfy_apply_operation_cfg(comfy_sharpen(2, 1.0, 0.3)), comfy_apg(0.5, 1.5, 0.4)]
    post = [comfy_cfg_zero_star, comfy_mahiro]
    gen = torch.Generator().manual_seed(9)
    for s in (0.9, 0.7, 0.5):
        x = torch.randn(2, 4, 8, 8, generator=gen)
        sigma = torch.full((2,), s)
        cp, up = predictions(c, u, cfg, x, sigma)
        got = den(x, sigma)
        want = comfy_sampling_function(x, sigma, cp, up, cfg, pre=pre, post=post)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dual_cfg_runs_no_pre_cfg_function():
    """Guider_DualCFG calls cfg_function without sampling_function's pre-CFG functions."""
    x, sigma = torch.randn(1, 4, 8, 8), torch.full((1,), 0.5)
    pos, mid, neg = text(1.0), text(0.3), text(-0.7)
    plain = DualCFGDenoiser(toy, pos, mid, neg, 3.0, 2.0)(x, sigma)
    apg = DualCFGDenoiser(toy, pos, mid, neg, 3.0, 2.0, post_cfg=model(("APG", 0.0, 1.0, 0.5)).post_cfg)(x, sigma)
    assert torch.equal(plain, apg)


def test_errors_name_the_problem():
    c, u = text(1.0), text(-0.5)
    x, sigma = torch.randn(1, 4, 8, 8), torch.full((1,), 0.5)
    with pytest.raises(InputError, match="cfg 0"):
        CFGDenoiser(toy, c, u, cfg=0.0, post_cfg=model(("APG", 1.0, 5.0, 0.0)).post_cfg)(x, sigma)
    with pytest.raises(InputError, match="multiplier 0"):
        op("LatentOperationTonemapReinhard", 0.0)
    with pytest.raises(InputError, match="outside"):
        op("LatentOperationSharpen", 32, 1.0, 0.1)
    with pytest.raises(InputError, match="outside"):
        model(("APG", 1.0, 5.0, 1.5))
    with pytest.raises(InputError, match="sharpen_radius 9"):  # reflect padding needs a latent wider than 9
        NODE_CLASS_MAPPINGS["LatentApplyOperation"](None).op({"samples": torch.randn(1, 16, 8, 8)},
                                                             op("LatentOperationSharpen", 9, 1.0, 0.1))
    with pytest.raises(InputError, match="LATENT_OPERATION"):
        NODE_CLASS_MAPPINGS["LatentApplyOperation"](None).op({"samples": torch.randn(1, 16, 8, 8)}, "sharpen")
    with pytest.raises(InputError, match="pre-CFG"):
        CFGDenoiser(toy, c, u, cfg=2.0, post_cfg=[("pre_cfg", object())])
    assert isinstance(model(("APG", 1.0, 5.0, 0.0)).post_cfg[0][1], APG)
    assert isinstance(model(("LatentApplyOperationCFG", op("LatentOperationTonemapReinhard", 1.0))).post_cfg[0][1],
                      LatentOperationCFG)


# ---- interface --------------------------------------------------------------------------------------------------
def test_object_info_matches_comfyui():
    """The six nodes' object_info as ComfyUI serves them (comfy_extras/nodes_apg.py, nodes_mahiro.py,
    nodes_latent.py)."""
    apg = node_info("APG", NODE_CLASS_MAPPINGS["APG"])
    tips = ("Controls the scale of the parallel guidance vector. Default CFG behavior at a setting of 1.",
            "Normalize guidance vector to this value, normalization disable at a setting of 0.",
            "Controls a running average of guidance during diffusion, disabled at a setting of 0.")
    assert apg["input"]["required"] == {
        "model": ["MODEL"],
        "eta": ["FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": tips[0]}],
        "norm_threshold": ["FLOAT", {"default": 5.0, "min": 0.0, "max": 50.0, "step": 0.1, "tooltip": tips[1]}],
        "momentum": ["FLOAT", {"default": 0.0, "min": -5.0, "max": 1.0, "step": 0.01, "tooltip": tips[2]}],
    }
    assert apg["input_order"] == {"required": ["model", "eta", "norm_threshold", "momentum"]}
    assert (apg["output"], apg["output_name"], apg["category"], apg["display_name"], apg["python_module"]) == (
        ["MODEL"], ["MODEL"], "sampling/custom_sampling", "Adaptive Projected Guidance", "comfy_extras.nodes_apg")
    assert NODE_CLASS_MAPPINGS["APG"].FUNCTION == "patch" and "experimental" not in apg

    mahiro = node_info("Mahiro", NODE_CLASS_MAPPINGS["Mahiro"])
    assert mahiro["input"] == {"required": {"model": ["MODEL"]}}
    assert (mahiro["output"], mahiro["output_name"], mahiro["category"], mahiro["python_module"]) == (
        ["MODEL"], ["patched_model"], "_for_testing", "comfy_extras.nodes_mahiro")
    assert mahiro["display_name"] == "Mahiro is so cute that she deserves a better guidance function!! (。・ω・。)"
    assert mahiro["description"] == ("Modify the guidance to scale more on the 'direction' of the positive prompt "
                                     "rather than the difference between the negative prompt.")
    assert mahiro["experimental"] is True

    window_tips = ("Start applying the operation at this fraction of the model's denoising schedule. 0 is the "
                   "beginning.",
                   "Stop applying the operation at this fraction of the model's denoising schedule. 1 is the end.")
    want = {
        "LatentApplyOperation": ({"samples": ["LATENT"], "operation": ["LATENT_OPERATION"]}, ["LATENT"], "op"),
        "LatentApplyOperationCFG": ({"model": ["MODEL"], "operation": ["LATENT_OPERATION"]}, ["MODEL"], "patch",
                                    {"start_percent": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                                                 "tooltip": window_tips[0]}],
                                     "end_percent": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                                               "tooltip": window_tips[1]}]}),
        "LatentOperationTonemapReinhard": (
            {"multiplier": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}]},
            ["LATENT_OPERATION"], "op"),
        "LatentOperationSharpen": ({
            "sharpen_radius": ["INT", {"default": 9, "min": 1, "max": 31, "step": 1, "advanced": True}],
            "sigma": ["FLOAT", {"default": 1.0, "min": 0.1, "max": 10.0, "step": 0.1, "advanced": True}],
            "alpha": ["FLOAT", {"default": 0.1, "min": 0.0, "max": 5.0, "step": 0.01, "advanced": True}],
        }, ["LATENT_OPERATION"], "op"),
    }
    for name, (inputs, output, function, *optional) in want.items():
        info = node_info(name, NODE_CLASS_MAPPINGS[name])
        if optional:  # LatentApplyOperationCFG's window (Comfy-Org/ComfyUI's newest nodes_latent.py)
            assert info["input"] == {"required": inputs, "optional": optional[0]}
            assert info["input_order"] == {"required": list(inputs), "optional": list(optional[0])}
        else:
            assert info["input"] == {"required": inputs} and info["input_order"] == {"required": list(inputs)}
        assert (info["output"], info["output_name"], info["category"], info["python_module"]) == (
            output, output, "latent/advanced/operations", "comfy_extras.nodes_latent")
        assert info["experimental"] is True and info["display_name"] == name
        assert NODE_CLASS_MAPPINGS[name].FUNCTION == function


# ---- through the executor on the shipped model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    if not SHIPPED_CHECKPOINT.exists():
        pytest.skip("shipped model weights not built")
    from sd35fp8.workflow.executor import PromptExecutor
    from sd35fp8.workflow.folders import ModelFolders

    root = tiny_checkpoint_folder(tmp_path_factory.mktemp("apg"))
    return PromptExecutor(ModelFolders(root), device="cpu", dtype=torch.float32), root


_base = tiny_base_prompt


def _ksampler(model, cfg=4.0, seed=5) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": list(model), "seed": seed, "steps": 4, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}


def _custom(model) -> dict:
    return {
        "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "21": {"class_type": "CFGGuider", "inputs": {"model": list(model), "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 4.0}},
        "22": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "23": {"class_type": "BasicScheduler", "inputs": {"model": list(model), "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}},
        "24": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["20", 0], "guider": ["21", 0],
                                                                 "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                 "latent_image": ["4", 0]}},
    }


def _run(ex, root, prompt, out):
    prompt = {**prompt, "90": {"class_type": "VAEDecode", "inputs": {"samples": [out, 0], "vae": ["1", 2]}},
              "91": {"class_type": "PreviewImage", "inputs": {"images": ["90", 0]}}}
    result = ex.execute(prompt, prompt_id="p", extra_data={}, execute_outputs=["91"])
    assert result.success, result.error
    (img,) = result.outputs["91"]["images"]
    return np.asarray(Image.open(root / "temp" / img["subfolder"] / img["filename"]).convert("RGB")), result


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b).max())


def test_nodes_in_workflows(executor):
    """APG (eta 1, no threshold, no momentum) at cfg 4 is plain CFG at cfg 5 (cond + 4 (cond - uncond)), up to
    rounding; with momentum it changes the image, the same through KSampler and SamplerCustomAdvanced, and its
    cached MODEL sampled again after another prompt gives the same image. Mahiro,
    LatentApplyOperationCFG and LatentApplyOperation each change the image. (The cached MODEL's running average
    restarts there because the new run's first sigma is above the last one's, as in ComfyUI.)"""
    ex, root = executor
    plain4, _ = _run(ex, root, {**_base(), "5": _ksampler(("1", 0))}, "5")
    plain5, _ = _run(ex, root, {**_base(), "5": _ksampler(("1", 0), cfg=5.0)}, "5")
    as_cfg = {"30": {"class_type": "APG", "inputs": {"model": ["1", 0], "eta": 1.0, "norm_threshold": 0.0,
                                                     "momentum": 0.0}}}
    apg_cfg, _ = _run(ex, root, {**_base(), **as_cfg, "5": _ksampler(("30", 0))}, "5")
    assert _diff(apg_cfg, plain5) <= 2 < _diff(plain4, plain5)

    apg = {"30": {"class_type": "APG", "inputs": {"model": ["1", 0], "eta": 0.5, "norm_threshold": 5.0,
                                                  "momentum": 0.5}}}
    first, _ = _run(ex, root, {**_base(), **apg, "5": _ksampler(("30", 0))}, "5")
    _run(ex, root, {**_base(), **apg, "5": _ksampler(("30", 0), seed=6)}, "5")
    again, result = _run(ex, root, {**_base(), **apg, "5": _ksampler(("30", 0))}, "5")
    assert "30" in result.cached and "5" in result.executed  # the same MODEL object, sampled anew
    assert np.array_equal(first, again) and _diff(first, plain4) > 2
    custom, _ = _run(ex, root, {**_base(), **apg, **_custom(("30", 0))}, "24")
    assert np.array_equal(custom, first)

    mahiro = {"31": {"class_type": "Mahiro", "inputs": {"model": ["1", 0]}}}
    assert _diff(_run(ex, root, {**_base(), **mahiro, "5": _ksampler(("31", 0))}, "5")[0], plain4) > 0
    ops = {"40": {"class_type": "LatentOperationTonemapReinhard", "inputs": {"multiplier": 0.5}},
           "41": {"class_type": "LatentApplyOperationCFG", "inputs": {"model": ["1", 0], "operation": ["40", 0]}},
           "42": {"class_type": "LatentOperationSharpen", "inputs": {"sharpen_radius": 3, "sigma": 1.0, "alpha": 2.0}},
           "43": {"class_type": "LatentApplyOperation", "inputs": {"samples": ["5", 0], "operation": ["42", 0]}}}
    tone, _ = _run(ex, root, {**_base(), **ops, "5": _ksampler(("41", 0))}, "5")
    sharp, _ = _run(ex, root, {**_base(), **ops, "5": _ksampler(("41", 0))}, "43")
    assert _diff(tone, plain4) > 2 and _diff(sharp, tone) > 2


def _advanced(model, latent, start, end, add_noise, leftover) -> dict:
    return {"class_type": "KSamplerAdvanced", "inputs": {
        "model": list(model), "add_noise": add_noise, "noise_seed": 5, "steps": 4, "cfg": 4.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": list(latent),
        "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": leftover}}


def test_split_samplers_share_the_running_average(executor):
    """Two KSamplerAdvanced nodes splitting one euler schedule (0-2 with leftover noise, then 2-4 without noise) on
    one APG MODEL with momentum: ComfyUI's closure carries the running average from the first into the second (its
    sigmas are lower: no restart), so the split equals the single 4-step KSampler up to the latent's round trip
    between the two. A second sampler on another APG node (after a ModelSamplingSD3 at the model's own shift, which
    changes nothing else) starts its own average, and that shows in the image."""
    ex, root = executor
    apg = {"30": {"class_type": "APG", "inputs": {"model": ["1", 0], "eta": 0.5, "norm_threshold": 5.0,
                                                  "momentum": 0.9}},
           "31": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
           "32": {"class_type": "APG", "inputs": {"model": ["31", 0], "eta": 0.5, "norm_threshold": 5.0,
                                                  "momentum": 0.9}}}
    whole, _ = _run(ex, root, {**_base(), **apg, "5": _ksampler(("30", 0))}, "5")
    assert np.array_equal(_run(ex, root, {**_base(), **apg, "5": _ksampler(("32", 0))}, "5")[0], whole)
    split = {"6": _advanced(("30", 0), ("4", 0), 0, 2, "enable", "enable"),
             "7": _advanced(("30", 0), ("6", 0), 2, 10000, "disable", "disable")}
    carried, _ = _run(ex, root, {**_base(), **apg, **split}, "7")
    assert _diff(carried, whole) <= 2
    fresh = {**split, "7": _advanced(("32", 0), ("6", 0), 2, 10000, "disable", "disable")}
    restarted, _ = _run(ex, root, {**_base(), **apg, **fresh}, "7")
    assert _diff(restarted, whole) > 2


def test_latent_apply_operation_cfg_window_in_a_workflow(executor):
    """LatentApplyOperationCFG's optional start_percent / end_percent through the executor: 0 and 1 given are the
    inputs left out; the later half of the schedule only is neither the whole of it nor none."""
    ex, root = executor
    ops = {"40": {"class_type": "LatentOperationSharpen", "inputs": {"sharpen_radius": 3, "sigma": 1.0, "alpha": 2.0}},
           "41": {"class_type": "LatentApplyOperationCFG", "inputs": {"model": ["1", 0], "operation": ["40", 0]}}}
    plain, _ = _run(ex, root, {**_base(), "5": _ksampler(("1", 0))}, "5")
    whole, _ = _run(ex, root, {**_base(), **ops, "5": _ksampler(("41", 0))}, "5")
    given = {**ops, "41": {**ops["41"], "inputs": {**ops["41"]["inputs"], "start_percent": 0.0, "end_percent": 1.0}}}
    assert np.array_equal(_run(ex, root, {**_base(), **given, "5": _ksampler(("41", 0))}, "5")[0], whole)
    late = {**ops, "41": {**ops["41"], "inputs": {**ops["41"]["inputs"], "start_percent": 0.5}}}
    half, _ = _run(ex, root, {**_base(), **late, "5": _ksampler(("41", 0))}, "5")
    assert _diff(half, whole) > 2 and _diff(half, plain) > 2
