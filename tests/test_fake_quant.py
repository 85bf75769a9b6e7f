"""fp8/fake_quant.py (FP8-aware adapter training): the emulation computes what the FP8 layers and the FP8
attention compute, its gradients pass straight through, and `remove` undoes it. CPU, tiny shapes."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sd35fp8.fast.attention_triton import fp8_attention_emulated
from sd35fp8.fp8.fake_quant import emulate_fp8, fake_quant_attention, fake_quant_rows, hadamard
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.fp8.quantize import quantize_model
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models import mmdit as mmdit_module
from sd35fp8.models.mmdit import attention


def test_rows_match_the_dynamic_fp8_linear_and_pass_gradients():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(2, 10, 64, generator=g) * torch.linspace(0.1, 8, 64)  # uneven channels
    fp8 = FP8Linear.from_linear(lin, mode="dynamic")
    w = fp8.weight.float() * fp8.weight_scale
    emulated = nn.functional.linear(fake_quant_rows(x), w, lin.bias)
    ref = fp8(x).float()
    assert sqnr(ref, emulated) > 50  # the same rounding; only the summation order differs
    assert sqnr(ref, lin(x)) < 40  # ... while the float layer is measurably elsewhere
    x.requires_grad_(True)
    fake_quant_rows(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through


def test_attention_matches_the_fp8_kernel_spec():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 96, 3, 32, generator=g) for _ in range(3))
    q[..., 5] *= 12  # an outlier channel: what the rotation is for
    spec = fp8_attention_emulated(q, k, v)  # the kernel's numerics (also rounds P)
    emu = fake_quant_attention(q, k, v)
    exact = attention(q, k, v)
    assert sqnr(spec, emu) > sqnr(spec, exact) + 3
    h = hadamard(32)
    assert torch.allclose(h @ h.T, torch.eye(32), atol=1e-6)


def test_emulate_and_remove_on_a_tiny_mmdit():
    model = mmdit_module.MMDiT(mmdit_module.MMDiTConfig.tiny()).eval()
    mmdit_module.init_random_(model, torch.Generator().manual_seed(0))
    fp8_model = copy.deepcopy(model)
    report = quantize_model(fp8_model, "dynamic")
    assert report.converted
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exact = mmdit_module.attention
    em = emulate_fp8(model, fp8_model, attention=True)
    name = report.converted[0]
    fp8 = fp8_model.get_submodule(name)
    assert torch.equal(model.get_submodule(name).weight, fp8.weight.float() * fp8.weight_scale)
    assert mmdit_module.attention is not exact
    em.remove()
    assert mmdit_module.attention is exact
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
