"""fast/weights.py pad_output_rows: the image stream's proj / fc2 weights padded to 256 rows for the FP8 GEMM's
tiling; the engine reads the first N columns of the padded output in place (fast/step.py matmul, the row kernels
with the output's row stride). Same result as unpadded, same memory for the layer (a view of the padded buffer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sd35fp8.fast import MMDiTEngine
from sd35fp8.fast import weights as fw
from sd35fp8.fp8.quantize import quantize_model
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

CUDA = torch.cuda.is_available()
CFG = dataclasses.replace(MMDiTConfig.tiny(), depth=3, x_block_self_attn_layers=())


def _model() -> MMDiT:
    model = init_random_(MMDiT(CFG), torch.Generator().manual_seed(0)).eval().requires_grad_(False)
    quantize_model(model, "dynamic")
    return model


def _inputs(device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, CFG.in_channels, 16, 12, generator=g).to(device, dtype), torch.rand(2, generator=g).to(device),
            torch.randn(2, 21, CFG.context_dim, generator=g).to(device, dtype),
            torch.randn(2, CFG.pooled_dim, generator=g).to(device, dtype))


def test_padded_engine_equals_unpadded_on_cpu(monkeypatch):
    model = _model()
    args = _inputs()
    with torch.no_grad():
        ref = MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=False)(*args)
        monkeypatch.setattr(fw, "_ALLOW_CPU", True)
        monkeypatch.setattr(fw, "PAD_MIN_N", 0)
        assert "x.proj.n" not in MMDiTEngine(model, "dynamic").blocks[0]  # opt-in ($SD35FP8_PAD_N=1)
        monkeypatch.setenv(fw.PAD_ENV, "1")
        eng = MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=False)
        p = eng.blocks[0]
        C = CFG.hidden_size
        n_pad = -(-C // fw.PAD_ROWS_TO) * fw.PAD_ROWS_TO
        assert p["x.proj.n"] == C and p["x.proj.w"].shape == (n_pad, C) and p["x.fc2.w"].shape[0] == n_pad
        assert p["x.proj.ws"].shape == (1, n_pad) and "c.proj.n" not in p  # the context stream stays
        layer = model.joint_blocks[0].x_block.attn.proj
        assert layer.weight.data_ptr() == p["x.proj.w"].data_ptr() and layer.weight.shape == (C, C)
        assert torch.equal(p["x.proj.w"][C:].float(), torch.zeros(n_pad - C, C))
        out = eng(*args)
        again = model(*args)  # the model's own forward reads the view
        eng.refresh_weights()  # a rebuild reuses the padded buffer
        assert eng.blocks[0]["x.proj.w"].data_ptr() == p["x.proj.w"].data_ptr()
        out2 = eng(*args)
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    assert torch.isfinite(again).all()


def test_padding_off_by_env_and_for_narrow_layers(monkeypatch):
    model = _model()
    monkeypatch.setattr(fw, "_ALLOW_CPU", True)
    monkeypatch.setenv(fw.PAD_ENV, "1")
    assert "x.proj.n" not in MMDiTEngine(model, "dynamic").blocks[0]  # N < PAD_MIN_N
    monkeypatch.setattr(fw, "PAD_MIN_N", 0)
    monkeypatch.setenv(fw.PAD_ENV, "0")
    assert "x.proj.n" not in MMDiTEngine(model, "dynamic").blocks[0]


STRIDED_CHILD = r"""
import json
import torch
from sd35fp8.fast import kernels as k
from sd35fp8.fp8.scaling import sqnr

k.act_impl = lambda t, impl="auto": "triton"
torch.manual_seed(0)
B, L, C, NP = 2, 9, 200, 256
x = torch.randn(B, L, C, dtype=torch.bfloat16)
mods = torch.randn(B, 3 * C, dtype=torch.bfloat16) * 0.3
gate, shift, scale = mods[:, :C], mods[:, C:2 * C], mods[:, 2 * C:]
y_full = torch.randn(B * L, NP, dtype=torch.bfloat16)
y = y_full[:, :C]  # a padded GEMM's output columns: rows NP apart
xs, (qs, ss) = k.residual_ln_modulate_act(x, gate, y, shift, scale, "dynamic")
xc, (qc, sc) = k.residual_ln_modulate_act(x, gate, y.contiguous(), shift, scale, "dynamic")
print(json.dumps({"x_equal": bool(torch.equal(xs, xc)), "q_equal": bool(torch.equal(qs.float(), qc.float())),
                  "s_equal": bool(torch.equal(ss, sc))}))
"""


def test_residual_kernel_reads_strided_rows_in_the_interpreter():
    pytest.importorskip("triton")
    from interpreted import run_interpreted  # tests/ helper

    res = run_interpreted(STRIDED_CHILD)
    assert res == {"x_equal": True, "q_equal": True, "s_equal": True}, res


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_padded_engine_gpu(monkeypatch):
    """On CUDA (cuBLAS at N and at Np, the row kernels on strided rows, CUDA graphs): close to the unpadded step."""
    from sd35fp8.fp8.scaling import sqnr

    monkeypatch.setattr(fw, "PAD_MIN_N", 0)
    model = _model().to("cuda", torch.bfloat16)
    args = _inputs("cuda", torch.bfloat16)
    outs = {}
    for pad in ("0", "1"):
        monkeypatch.setenv(fw.PAD_ENV, pad)
        eng = MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=True)
        assert ("x.proj.n" in eng.blocks[0]) == (pad == "1")
        outs[pad] = eng(*args).float()
        assert torch.equal(eng(*args).float(), outs[pad])  # the graph replays the same bits
    assert sqnr(outs["0"], outs["1"]) > 40


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@torch.no_grad()
def test_padded_rows_with_lora_gpu(monkeypatch):
    """A LoRA on the padded layers: the fused pack takes the layer's own rows, and a fuse (the weights rewritten
    in place through the layer's view) reaches the padded buffer; both close to the unpadded engine."""
    from mmdit_cases import build, inputs  # tests/ helpers
    from test_lora_graphs import CFG as LCFG, random_lora

    from sd35fp8.fp8.scaling import sqnr
    from sd35fp8.lora import LoraSet

    monkeypatch.setattr(fw, "PAD_MIN_N", 0)
    base = build(LCFG)
    lora = random_lora(base, 1, name="a")
    x, sigma, context, pooled = (t.cuda() for t in inputs(LCFG, 8, 8))
    outs = {}
    for pad in ("0", "1"):
        monkeypatch.setenv(fw.PAD_ENV, pad)
        model = build(LCFG)
        model.load_state_dict(base.state_dict())
        quantize_model(model, mode="dynamic")
        model = model.cuda()
        engine = MMDiTEngine(model, fp8_mode="dynamic", device="cuda")
        assert ("x.proj.n" in engine.blocks[0]) == (pad == "1")
        loras = LoraSet({"mmdit": model})
        loras.load(lora, "a")
        outs[pad, "active"] = engine(x, sigma, context, pooled).float()
        loras.fuse()
        outs[pad, "fused"] = engine(x, sigma, context, pooled).float()
        if pad == "1":
            p = engine.blocks[0]
            assert model.joint_blocks[0].x_block.attn.proj.weight.data_ptr() == p["x.proj.w"].data_ptr()
    for road in ("active", "fused"):
        assert sqnr(outs["0", road], outs["1", road]) > 40, road
