"""The MODEL's sampling patches (CFGZeroStar, CFGNorm, SkipLayerGuidanceSD3 / DiT / DiTSimple, RescaleCFG) in
CFGDenoiser against ComfyUI's cfg_function + comfy_extras/nodes_cfg.py, nodes_slg.py and nodes_model_advanced.py
arithmetic written out here, in patch order."""

from __future__ import annotations

import pytest
import torch

from sd35fp8.sampling import CFGDenoiser, Conditioning, FlowMatching, SLGConfig
from sd35fp8.workflow.engine import SD3Model, with_skip_layer_guidance
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS


def toy(x, sigma, context, pooled, skip_layers=(), **_):
    v = torch.tanh(x * context.mean(dim=(1, 2))[:, None, None, None]) + pooled.mean(1)[:, None, None, None]
    return v * (0.5 if skip_layers else 1.0)  # skipping layers changes the prediction


def text(v):
    return Conditioning(torch.full((1, 4, 8), v), torch.full((1, 6), v / 3))


def denoised(x, sigma, c, skip=False):
    v = toy(x, sigma, c.context.expand(x.shape[0], -1, -1), c.pooled.expand(x.shape[0], -1), (1,) if skip else ())
    return x - v * sigma.reshape(-1, 1, 1, 1)


def zero_star(out, x, cond_p, uncond_p, cfg):
    pf, nf = (x - cond_p).reshape(x.shape[0], -1), (x - uncond_p).reshape(x.shape[0], -1)
    alpha = ((pf * nf).sum(1, keepdim=True) / ((nf ** 2).sum(1, keepdim=True) + 1e-8)).reshape(-1, 1, 1, 1)
    return out + uncond_p * (alpha - 1.0) + cfg * uncond_p * (1.0 - alpha)


def cfg_norm(out, cond_p, strength):
    scale = (torch.norm(cond_p, dim=1, keepdim=True) / (torch.norm(out, dim=1, keepdim=True) + 1e-8)).clamp(0, 1)
    return out * scale * strength


@pytest.mark.parametrize("order", [("cfg_zero_star",), ("cfg_norm",), ("slg", "cfg_zero_star"),
                                   ("cfg_zero_star", "slg"), ("cfg_norm", "cfg_zero_star")])
def test_post_cfg_functions_in_patch_order(order):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.6)
    c, u, cfg = text(1.0), text(-0.5), 4.5
    slg = SLGConfig(scale=2.0, start=0.0, end=1.0, layers=(1,), window="sigma")
    post = tuple(("cfg_norm", 0.8) if p == "cfg_norm" else (p,) for p in order)
    got = CFGDenoiser(toy, c, u, cfg=cfg, slg=slg if "slg" in order else None, post_cfg=post,
                      model_sampling=FlowMatching(3.0))(x, sigma)
    cp, up = denoised(x, sigma, c), denoised(x, sigma, u)
    want = up + (cp - up) * cfg
    for p in order:
        if p == "slg":
            want = want + (cp - denoised(x, sigma, c, skip=True)) * 2.0
        elif p == "cfg_zero_star":
            want = zero_star(want, x, cp, up, cfg)
        else:
            want = cfg_norm(want, cp, 0.8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cfg_one_gives_zero_star_a_zero_uncond():
    """ComfyUI skips the uncond pass at cfg 1 and hands the post-CFG functions zeros: CFG-Zero* changes nothing."""
    x, sigma = torch.randn(1, 4, 8, 8), torch.full((1,), 0.5)
    plain = CFGDenoiser(toy, text(1.0), None, cfg=1.0)(x, sigma)
    torch.testing.assert_close(CFGDenoiser(toy, text(1.0), None, cfg=1.0, post_cfg=[("cfg_zero_star",)])(x, sigma),
                               plain)


def test_nodes_record_the_patch_order():
    model = SD3Model(mmdit=None)
    (m,) = NODE_CLASS_MAPPINGS["CFGZeroStar"](None).patch(model)
    m = with_skip_layer_guidance(m, "7, 8", 3.0, 0.01, 0.15)
    (m,) = NODE_CLASS_MAPPINGS["CFGNorm"](None).patch(m, 0.5)
    slg = SLGConfig(scale=3.0, start=0.01, end=0.15, layers=(7, 8), window="sigma", shift=3.0)
    assert m.post_cfg == (("cfg_zero_star",), ("slg", slg), ("cfg_norm", 0.5))
    # a second SLG node adds a second post-CFG function, as ComfyUI chains them
    more = with_skip_layer_guidance(m, "9", 1.0, 0.0, 1.0).post_cfg
    assert more[:3] == m.post_cfg and more[3][0] == "slg" and more[3][1].layers == (9,)
    with pytest.raises(Exception, match="unknown post-CFG"):
        CFGDenoiser(toy, text(1.0), None, post_cfg=[("apg",)])


def test_slg_layer_strings_as_comfyui_reads_them():
    """re.findall(r'\\d+'): any separator works; no layer at all leaves the MODEL unpatched."""
    model = SD3Model(mmdit=None)
    assert with_skip_layer_guidance(model, "7;8 9", 3.0, 0.0, 1.0).post_cfg[0][1].layers == (7, 8, 9)
    assert with_skip_layer_guidance(model, "none", 3.0, 0.0, 1.0) is model
    (m,) = NODE_CLASS_MAPPINGS["SkipLayerGuidanceDiT"](None).skip_guidance(model, 3.0, 0.0, 1.0, "", "-")
    assert m is model


def slg_dit(out, cond_p, skipped, scale, rescaling_scale):
    """comfy_extras/nodes_slg.py SkipLayerGuidanceDiT's post_cfg_function, inside its window."""
    out = out + (cond_p - skipped) * scale
    if rescaling_scale != 0:
        factor = cond_p.std() / out.std()
        factor = rescaling_scale * factor + (1 - rescaling_scale)
        out = out * factor
    return out


def test_slg_dit_rescaling_and_chained_nodes():
    """Two SkipLayerGuidanceDiT nodes, the second with rescaling_scale, and one with single layers only (SD3 has no
    single blocks: its pass is the cond pass, so only its rescaling acts); each inside or outside its sigma window."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    c, u, cfg = text(1.0), text(-0.5), 4.0
    model = SD3Model(mmdit=None)
    node = NODE_CLASS_MAPPINGS["SkipLayerGuidanceDiT"](None)
    (m,) = node.skip_guidance(model, 2.0, 0.0, 0.5, "1", "", 0.0)
    (m,) = node.skip_guidance(m, 1.5, 0.2, 1.0, "3", "", 0.7)
    (m,) = node.skip_guidance(m, 1.0, 0.0, 1.0, "", "4", 0.5)
    ms = FlowMatching(3.0)
    for sig in (0.95, 0.5):
        sigma = torch.full((2,), sig)
        got = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=m.post_cfg, model_sampling=ms)(x, sigma)
        cp, up = denoised(x, sigma, c), denoised(x, sigma, u)
        want = up + (cp - up) * cfg
        skipped = denoised(x, sigma, c, skip=True)
        if ms.percent_to_sigma(0.5) <= sig <= 1.0:
            want = slg_dit(want, cp, skipped, 2.0, 0.0)
        if ms.percent_to_sigma(1.0) <= sig <= ms.percent_to_sigma(0.2):
            want = slg_dit(want, cp, skipped, 1.5, 0.7)
        want = slg_dit(want, cp, cp, 1.0, 0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_slg_window_takes_the_shift_at_the_node():
    """ComfyUI's node reads model_sampling when it patches: a ModelSamplingSD3 applied after it keeps its window."""
    model = SD3Model(mmdit=None, shift=1.0)
    m = with_skip_layer_guidance(model, "1", 2.0, 0.0, 0.5).with_shift(6.0)
    x, c, u = torch.randn(1, 4, 8, 8), text(1.0), text(-0.5)
    sig = 0.6  # inside shift 1.0's window [0.5, 1] but outside shift 6.0's [0.857, 1]
    sigma = torch.full((1,), sig)
    got = CFGDenoiser(toy, c, u, cfg=3.0, post_cfg=m.post_cfg, model_sampling=FlowMatching(m.shift))(x, sigma)
    cp, up = denoised(x, sigma, c), denoised(x, sigma, u)
    want = up + (cp - up) * 3.0 + (cp - denoised(x, sigma, c, skip=True)) * 2.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def rescale_cfg_comfy(x, sigma, cond_p, uncond_p, cond_scale, multiplier):
    """ComfyUI cfg_function with RescaleCFG's sampler_cfg_function (comfy_extras/nodes_model_advanced.py)."""
    args = {"cond": x - cond_p, "uncond": x - uncond_p, "cond_scale": cond_scale, "sigma": sigma, "input": x}
    cond, uncond = args["cond"], args["uncond"]
    sigma = args["sigma"].view(sigma.shape[:1] + (1,) * (cond.ndim - 1))
    x_orig = args["input"]
    xx = x_orig / (sigma * sigma + 1.0)
    cond = ((xx - (x_orig - cond)) * (sigma ** 2 + 1.0) ** 0.5) / sigma
    uncond = ((xx - (x_orig - uncond)) * (sigma ** 2 + 1.0) ** 0.5) / sigma
    x_cfg = uncond + cond_scale * (cond - uncond)
    ro_pos = torch.std(cond, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_rescaled = x_cfg * (ro_pos / ro_cfg)
    x_final = multiplier * x_rescaled + (1.0 - multiplier) * x_cfg
    return x - (x_orig - (xx - x_final * sigma / (sigma * sigma + 1.0) ** 0.5))


@pytest.mark.parametrize("cfg", [4.5, 1.0])
def test_rescale_cfg_matches_comfyui(cfg):
    """RescaleCFG replaces the CFG combination; a post-CFG function (CFG-Zero*) still runs after it; a second
    RescaleCFG replaces the first. At cfg 1 the uncond prediction is zeros, as ComfyUI hands it."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.7, 0.3])
    c, u = text(1.0), text(-0.5)
    model = SD3Model(mmdit=None)
    (m,) = NODE_CLASS_MAPPINGS["RescaleCFG"](None).patch(model, 0.3)
    (m,) = NODE_CLASS_MAPPINGS["CFGZeroStar"](None).patch(m)
    (m,) = NODE_CLASS_MAPPINGS["RescaleCFG"](None).patch(m, 0.7)
    got = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=m.post_cfg)(x, sigma)
    cp = denoised(x, sigma, c)
    up = denoised(x, sigma, u) if cfg != 1.0 else torch.zeros_like(x)
    want = zero_star(rescale_cfg_comfy(x, sigma, cp, up, cfg, 0.7), x, cp, up, cfg)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if cfg == 1.0:
        torch.testing.assert_close(CFGDenoiser(toy, c, u, cfg=1.0, post_cfg=m.post_cfg[-1:])(x, sigma), cp,
                                   rtol=1e-5, atol=1e-5)


def test_slg_dit_simple_skips_layers_in_the_uncond_pass():
    """SkipLayerGuidanceDiTSimple: inside its window cond and uncond run as two batches, the uncond one without
    the layers; outside it (and at cfg 1) the usual CFG batch."""
    calls = []

    def model_fn(x, sigma, context, pooled, skip_layers=(), **kw):
        calls.append((x.shape[0], tuple(skip_layers)))
        return toy(x, sigma, context, pooled, skip_layers)

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    c, u = text(1.0), text(-0.5)
    (m,) = NODE_CLASS_MAPPINGS["SkipLayerGuidanceDiTSimple"](None).skip_guidance(SD3Model(mmdit=None), 0.0, 0.5,
                                                                                 "2", "")
    den = CFGDenoiser(model_fn, c, u, cfg=5.0, post_cfg=m.post_cfg)
    for sig, split in ((0.9, True), (0.5, False)):
        sigma = torch.full((1,), sig)
        calls.clear()
        got = den(x, sigma)
        cp, up = denoised(x, sigma, c), denoised(x, sigma, u, skip=split)
        torch.testing.assert_close(got, up + (cp - up) * 5.0, rtol=1e-5, atol=1e-6)
        assert calls == ([(1, ()), (1, (2,))] if split else [(2, ())])
    calls.clear()
    CFGDenoiser(model_fn, c, u, cfg=1.0, post_cfg=m.post_cfg)(x, torch.full((1,), 0.9))
    assert calls == [(1, ())]


@pytest.mark.parametrize("style, cfg1, cfg2", [("regular", 3.0, 2.0), ("regular", 3.0, 1.0), ("regular", 1.0, 1.0),
                                               ("nested", 3.0, 2.0)])
def test_dual_cfg_matches_comfyui(style, cfg1, cfg2):
    """Guider_DualCFG.predict_noise written out: regular = cfg_function(mid, neg, cfg2) + (pos - mid) * cfg1 (the
    negative pass skipped at cfg2 1, the middle one too at cfg1 1: zeros), nested = neg + cfg2 * (cfg_function(pos,
    mid, cfg1) - neg); cfg_function's post-CFG functions (here SLG, then CFG-Zero*) on that call's sides."""
    from sd35fp8.sampling import DualCFGDenoiser

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 0.4)
    pos, mid, neg = text(1.0), text(0.3), text(-0.7)
    slg = SLGConfig(scale=1.5, start=0.0, end=1.0, layers=(1,), window="sigma")
    got = DualCFGDenoiser(toy, pos, mid, neg, cfg1, cfg2, nested=style == "nested", slg=slg,
                          post_cfg=[("slg",), ("cfg_zero_star",)])(x, sigma)

    def cfg_function(c, cp, up, scale):
        out = up + (cp - up) * scale
        out = out + (cp - (zeros if c is None else denoised(x, sigma, c, skip=True))) * 1.5
        return zero_star(out, x, cp, up, scale)

    zeros = torch.zeros_like(x)
    if style == "nested":
        p, m, n = (denoised(x, sigma, c) for c in (pos, mid, neg))
        want = n + cfg2 * (cfg_function(pos, p, m, cfg1) - n)
    else:
        n = zeros if cfg2 == 1.0 else denoised(x, sigma, neg)
        m = zeros if cfg2 == 1.0 and cfg1 == 1.0 else denoised(x, sigma, mid)
        skip_mid = cfg2 == 1.0 and cfg1 == 1.0  # ComfyUI then passes no middle cond (None) to cfg_function
        want = cfg_function(None if skip_mid else mid, m, n, cfg2) + (denoised(x, sigma, pos) - m) * cfg1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_torch_compile_model_passes_the_model_through():
    from sd35fp8.workflow.folders import ModelFolders
    from sd35fp8.workflow.node_base import NodeContext

    model = SD3Model(mmdit=None, shift=2.5)
    node = NODE_CLASS_MAPPINGS["TorchCompileModel"](NodeContext(folders=ModelFolders(".")))
    assert node.patch(model, "inductor") == (model,)
    assert NODE_CLASS_MAPPINGS["TorchCompileModel"].INPUT_TYPES(None)["required"]["backend"][0] == ["inductor",
                                                                                                    "cudagraphs"]


def test_capture_uncond_for_cfg_pp_samplers():
    """capture_uncond (ComfyUI's *_cfg_pp hook with disable_cfg1_optimization): the uncond pass runs at cfg 1 too,
    and each call leaves the uncond prediction, after the MODEL's post-CFG functions ran on the result."""
    x, sigma = torch.randn(1, 4, 8, 8), torch.full((1,), 0.5)
    c, u = text(1.0), text(-0.5)
    for cfg in (1.0, 3.0):
        den = CFGDenoiser(toy, c, u, cfg=cfg, post_cfg=[("cfg_norm", 0.9)])
        holder = den.capture_uncond()
        out = den(x, sigma)
        up = denoised(x, sigma, u)
        torch.testing.assert_close(holder[0], up)
        cp = denoised(x, sigma, c)
        torch.testing.assert_close(out, cfg_norm(up + (cp - up) * cfg, cp, 0.9), rtol=1e-5, atol=1e-6)
    assert CFGDenoiser(toy, c, None).capture_uncond() == [None]
