"""The MODEL's post-CFG functions (CFGZeroStar, CFGNorm, SkipLayerGuidanceSD3) in CFGDenoiser against
ComfyUI's cfg_function + comfy_extras/nodes_cfg.py arithmetic written out here, in patch order."""

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
    assert m.post_cfg == (("cfg_zero_star",), ("slg",), ("cfg_norm", 0.5))
    assert with_skip_layer_guidance(m, "9", 1.0, 0.0, 1.0).post_cfg == (("cfg_zero_star",), ("cfg_norm", 0.5),
                                                                       ("slg",))
    with pytest.raises(Exception, match="unknown post-CFG"):
        CFGDenoiser(toy, text(1.0), None, post_cfg=[("apg",)])


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
