"""ControlNets in sampling: batched CFG rows, start/end window, chaining, strength (float32, tiny random nets)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd35fp8.control import ControlApply, add_residuals
from sd35fp8.errors import InputError
from sd35fp8.models.controlnet import ControlNet, ControlNetConfig
from sd35fp8.sampling.guidance import CFGDenoiser, Conditioning
from sd35fp8.sampling.model_sampling import FlowMatching
from sd35fp8.workflow.nodes_control import apply_control

from mmdit_cases import CONFIGS, build, inputs

BASE = CONFIGS["mmdit_qknorm"]


class StubVAE(nn.Module):
    """encode: [B, 3, H, W] -> [B, 16, H/8, W/8] (a fixed random projection of 8x8 patches)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 8, stride=8)
        torch.nn.init.normal_(self.proj.weight, std=0.05, generator=torch.Generator().manual_seed(0))

    def encode(self, img):
        return self.proj(img)


def tiny_net(seed: int, layers: int = 2) -> ControlNet:
    net = ControlNet(ControlNetConfig(kind="sd35", num_layers=layers, hidden_size=BASE.hidden_size,
                                      num_heads=BASE.num_heads, pooled_dim=BASE.pooled_dim, control_type=0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.ndim > 1 else 20))
    return net.eval()


@pytest.fixture(scope="module")
def setup():
    model = build(BASE)
    image = torch.rand(1, 64, 48, 3, generator=torch.Generator().manual_seed(3))  # IMAGE [B, H, W, C]
    return model, image, StubVAE()


def test_batched_cfg_rows_match_separate_calls(setup):
    model, image, vae = setup
    x, sigma, context, pooled = inputs(BASE, 8, 6, batch=1)
    ctl = ControlApply(tiny_net(1), image, strength=0.8, vae=vae)
    cond = Conditioning(context, pooled, control=ctl)
    uncond = Conditioning(torch.zeros_like(context), torch.zeros_like(pooled))
    ms = FlowMatching(3.0)
    with torch.no_grad():
        both = CFGDenoiser(model, cond, uncond, cfg=4.0, model_sampling=ms)(x, sigma)
        c = CFGDenoiser(model, cond, model_sampling=ms)(x, sigma)  # cond alone, with the control
        u = CFGDenoiser(model, uncond, model_sampling=ms)(x, sigma)  # uncond alone, none
        plain = CFGDenoiser(model, Conditioning(context, pooled), uncond, cfg=4.0, model_sampling=ms)(x, sigma)
    assert torch.allclose(both, u + 4.0 * (c - u), atol=1e-4)
    assert (both - plain).abs().max() > 1e-3


def test_window_and_chain(setup):
    model, image, vae = setup
    x, sigma, context, pooled = inputs(BASE, 8, 8, batch=1)
    ms = FlowMatching(3.0)
    a = ControlApply(tiny_net(1), image, strength=1.0, vae=vae)
    b = ControlApply(tiny_net(2), image, strength=0.5, vae=vae, previous=a)
    late = ControlApply(tiny_net(2), image, strength=0.5, start_percent=0.9, end_percent=1.0, vae=vae)
    with torch.no_grad():
        ra = a(x, sigma, context, pooled, model, ms)
        rb_alone = ControlApply(tiny_net(2), image, strength=0.5, vae=vae)(x, sigma, context, pooled, model, ms)
        rb = b(x, sigma, context, pooled, model, ms)
        assert len(rb) == BASE.depth
        for got, want in zip(rb, add_residuals(ra, rb_alone)):
            assert torch.allclose(got, want, atol=1e-6)
        high = torch.tensor([0.93])  # early in sampling: outside 0.9-1.0
        assert late(x, high, context, pooled, model, ms) is None
        assert late(x, torch.tensor([0.001]), context, pooled, model, ms) is not None


def test_apply_node_semantics(setup):
    model, image, vae = setup
    cond = [[torch.zeros(1, 3, BASE.context_dim), {"pooled_output": torch.zeros(1, BASE.pooled_dim)}]]
    neg = [[torch.zeros(1, 3, BASE.context_dim), {"pooled_output": torch.zeros(1, BASE.pooled_dim)}]]
    net = tiny_net(1)
    assert apply_control(cond, neg, net, image, 0.0, 0.0, 1.0, vae) == (cond, neg)  # strength 0: unchanged
    p, n = apply_control(cond, neg, net, image, 0.7, 0.0, 1.0, vae)
    assert p[0][1]["control"] is n[0][1]["control"]  # one control for both (same previous)
    p2, n2 = apply_control(p, n, tiny_net(2), image, 0.5, 0.0, 1.0, vae)
    assert p2[0][1]["control"].previous is p[0][1]["control"]
    with pytest.raises(InputError, match="needs a VAE"):
        apply_control(cond, neg, net, image, 0.7, 0.0, 1.0, None)


def test_legacy_apply_and_diff_loader(setup, tmp_path):
    """ControlNetApply (deprecated, no VAE input) stops with ComfyUI's message for an SD3 ControlNet, or passes the
    conditioning through at strength 0; DiffControlNetLoader loads the file as ControlNetLoader does."""
    from safetensors.torch import save_file

    from sd35fp8.workflow.folders import ModelFolders
    from sd35fp8.workflow.node_base import NodeContext
    from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS

    _, image, _ = setup
    cond = [[torch.zeros(1, 3, BASE.context_dim), {"pooled_output": torch.zeros(1, BASE.pooled_dim)}]]
    legacy = NODE_CLASS_MAPPINGS["ControlNetApply"](None)
    assert legacy.apply_controlnet(cond, tiny_net(1), image, 0.0) == (cond,)
    with pytest.raises(InputError, match="needs a VAE"):
        legacy.apply_controlnet(cond, tiny_net(1), image, 0.8)
    (tmp_path / "controlnet").mkdir()
    net = tiny_net(1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "controlnet" / "c.safetensors"))
    ctx = NodeContext(folders=ModelFolders(tmp_path))
    (a,) = NODE_CLASS_MAPPINGS["ControlNetLoader"](ctx).load_controlnet("c.safetensors")
    (b,) = NODE_CLASS_MAPPINGS["DiffControlNetLoader"](ctx).load_controlnet(None, "c.safetensors")
    assert a.config == b.config
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    info = NODE_CLASS_MAPPINGS["DiffControlNetLoader"].INPUT_TYPES(ModelFolders(tmp_path))["required"]
    assert list(info) == ["model", "control_net_name"]
