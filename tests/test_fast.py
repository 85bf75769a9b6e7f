"""MMDiTEngine (fast/step.py) against the reference MMDiT: eager path on CPU, GPU paths when CUDA exists."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from sd35fp8.fast import MMDiTEngine, enable_compile_cache, joint_block
from sd35fp8.fast import kernels
from sd35fp8.fp8.quantize import quantize_model
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

CUDA = torch.cuda.is_available()
TINY_X = MMDiTConfig.tiny()  # MMDiT-X (attn2 in block 0)
TINY = dataclasses.replace(TINY_X, depth=3, x_block_self_attn_layers=())  # plain MMDiT, 3 blocks


def _model(cfg: MMDiTConfig, seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    return init_random_(MMDiT(cfg), torch.Generator().manual_seed(seed)).eval().requires_grad_(False)


def _inputs(cfg: MMDiTConfig, seed: int = 1, batch: int = 2, ctx_len: int = 21):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, cfg.in_channels, 16, 12, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, ctx_len, cfg.context_dim, generator=g), torch.randn(batch, cfg.pooled_dim, generator=g))


@pytest.mark.parametrize("cfg", [TINY_X, TINY], ids=["mmdit-x", "mmdit"])
@pytest.mark.parametrize("skip", [(), (1,)])
def test_high_precision_path_matches_reference(cfg, skip):
    model = _model(cfg)
    args = _inputs(cfg)
    with torch.no_grad():
        ref = model(*args, skip_layers=skip)
        fast = MMDiTEngine(model, None, compile=False, cuda_graphs=False)
        out = fast(*args, skip_layers=skip)
        again = model(*args, skip_layers=skip)  # adaLN weights re-pointed, values unchanged
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (out - ref).abs().max()
    assert torch.equal(again, ref)


@pytest.mark.parametrize("cfg", [TINY_X, TINY], ids=["mmdit-x", "mmdit"])
def test_dynamic_fp8_equals_quantized_reference(cfg):
    """Over a model converted by fp8.quantize_model the fast path runs the same fp8 math (no weight copy)."""
    model = _model(cfg)
    args = _inputs(cfg)
    with torch.no_grad():
        ref32 = model(*args)
        quantize_model(model, "dynamic")
        ref8 = model(*args)
        fast = MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=False)
        ada = model.joint_blocks[0].x_block.adaLN_modulation[1].weight
        assert ada.untyped_storage().data_ptr() == fast.ada["w"].untyped_storage().data_ptr()
        out = fast(*args, skip_layers=(0,))
        assert sqnr(model(*args, skip_layers=(0,)), out) > 40
        out = fast(*args)
    assert sqnr(ref8, out) > 40  # same quantisation, fp32-vs-fused rounding only
    assert sqnr(ref32, out) > 25


@pytest.mark.parametrize("mode,fast_accum", [("weight_only", False), ("dynamic", False), ("static", False),
                                             ("static", True)])
def test_fp8_modes_close_to_float(mode, fast_accum):
    model = _model(TINY_X)
    args = _inputs(TINY_X)
    with torch.no_grad():
        ref = model(*args)
        fast = MMDiTEngine(copy.deepcopy(model), mode, compile=False, cuda_graphs=False, fast_accum=fast_accum)
        assert fast.fast_accum == fast_accum and ("fast_accum" in fast.describe()) == fast_accum
        if mode == "static":
            with pytest.raises(ValueError):
                fast(*args)
            amax = fast.calibrate(*args)
            assert amax["adaLN"] > 0 and all(v > 0 for v in amax.values())
        out = fast(*args)
    assert sqnr(ref, out) > (35 if mode == "weight_only" else 25)


@pytest.mark.parametrize("mode", [None, "weight_only", "dynamic", "static"])
def test_block_traces_as_one_graph(mode):
    """torch.compile(fullgraph=True) must see each block as one graph (dynamo only: backend eager)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    fast = MMDiTEngine(_model(TINY_X), mode, compile=False, cuda_graphs=False)
    args = _inputs(TINY_X)
    if mode == "static":
        fast.calibrate(*args)
    fast._block_fn = torch.compile(joint_block, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        ref = MMDiTEngine.forward(fast, *args)
        fast._block_fn = joint_block
        eager = fast(*args)
    assert sqnr(eager, ref) > 60
    dynamo.reset()


def test_compile_cache_env(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("SD35FP8_CACHE_DIR", str(tmp_path))
    folder = enable_compile_cache()
    assert folder == tmp_path / "inductor" and folder.is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)


# ------------------------------------------------------------------------------------ GPU only
@pytest.mark.skipif(not CUDA or kernels.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("mode", [None, "dynamic", "static"])
@pytest.mark.parametrize("C", [1536, 2432])  # Medium, Large: rows split into 1024 + 512, 2048 + 512 (384) lanes
def test_triton_kernels_match_torch(mode, C):
    dev = torch.device("cuda")
    x = torch.randn(2, 300, C, device=dev, dtype=torch.bfloat16)
    mods = torch.randn(2, 6 * C, device=dev, dtype=torch.bfloat16) * 0.3
    shift, scale = mods[:, :C], mods[:, C:2 * C]
    h = torch.randn(600, 4 * C, device=dev, dtype=torch.bfloat16) * 2
    st = torch.tensor(0.02, device=dev) if mode == "static" else None
    pairs = ((kernels.ln_modulate_act, kernels._ln_modulate_torch, (x, shift, scale)),
             (kernels.gelu_act, kernels._gelu_torch, (h,)), (kernels.plain_act, kernels._plain_torch, (h,)))
    for fn, ref_fn, args in pairs:
        if fn is kernels.plain_act and mode is None:
            continue
        q, s = fn(*args, mode, st)  # Triton (eager on CUDA)
        qr, sr = ref_fn(*args, mode, st)  # torch ops (what Inductor fuses)
        deq = q.float() * (s if s is not None else 1)
        deq_r = qr.float() * (sr if sr is not None else 1)
        assert sqnr(deq_r, deq) > 25
        if fn is kernels.plain_act:  # no arithmetic before the quantisation: (nearly) the same scales and codes
            torch.testing.assert_close(s, sr, rtol=1e-6, atol=0)
            assert (q.view(torch.uint8) != qr.view(torch.uint8)).float().mean() < 1e-3  # every column written
    gate = mods[:, 3 * C:4 * C]
    y = torch.randn(600, C, device=dev, dtype=torch.bfloat16)
    xn, (q, s) = kernels.residual_ln_modulate_act(x, gate, y, shift, scale, mode, st)  # Triton
    xr, (qr, sr) = kernels._residual_ln_modulate_torch(x, gate, y, shift, scale, mode, st)
    assert torch.equal(xn, xr)  # the residual sum is rounded like torch.addcmul
    assert sqnr(qr.float() * (sr if sr is not None else 1), q.float() * (s if s is not None else 1)) > 25


@pytest.mark.skipif(not CUDA or kernels.triton is None, reason="needs CUDA and Triton")
def test_triton_gemv_and_dequant():
    dev = torch.device("cuda")
    a = torch.randn(2, 1536, device=dev, dtype=torch.bfloat16)
    w8 = (torch.randn(4096, 1536, device=dev) * 0.05).to(torch.float8_e4m3fn)
    ws = torch.rand(1, 4096, device=dev) + 0.5
    b = torch.randn(4096, device=dev, dtype=torch.bfloat16)
    ref = (a.float() @ (w8.float() * ws.t()).t() + b.float())
    assert sqnr(ref, kernels.fp8_weight_gemv(a, w8, ws, b, torch.bfloat16).float()) > 40
    from sd35fp8.fp8 import dequant

    for scale in (ws.t(), ws, torch.tensor(0.7, device=dev)):  # [N, 1], [1, N], per tensor
        assert torch.equal(dequant.dequantize(w8, scale, torch.bfloat16), dequant._torch(w8, scale, torch.bfloat16))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode,impl", [(None, "auto"), ("dynamic", "auto"), ("dynamic", "triton")])
def test_compiled_graphed_matches_eager_gpu(mode, impl):
    dev = torch.device("cuda")
    model = _model(TINY_X).to(dev, torch.bfloat16)
    args = [t.to(dev) for t in _inputs(TINY_X)]
    with torch.no_grad():
        eager = MMDiTEngine(model, mode, compile=False, cuda_graphs=False)(*args)
        fast = MMDiTEngine(model, mode, compile=True, cuda_graphs=True, kernels=impl)
        out = fast(*args)
        out2 = fast(*args, skip_layers=(1,))
        ref2 = MMDiTEngine(model, mode, compile=False, cuda_graphs=False)(*args, skip_layers=(1,))
    assert sqnr(eager.float(), out.float()) > 25 and sqnr(ref2.float(), out2.float()) > 25


@pytest.mark.skipif(not CUDA or kernels.triton is None, reason="needs CUDA and Triton")
@pytest.mark.parametrize("cfg", [TINY_X, TINY], ids=["mmdit-x", "mmdit"])
def test_fp8_attention_step_close_to_cudnn_gpu(cfg, monkeypatch):
    """FP8 attention (qk-norm + concatenation + quantisation fused) against cuDNN SDPA, eager and compiled;
    dynamic mode's e4m3 attention outputs (per batch row) against bf16 outputs + the per-token quantise pass."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need sm_89+")
    dev = torch.device("cuda")
    model = _model(cfg).to(dev, torch.bfloat16)
    args = [t.to(dev) for t in _inputs(cfg)]
    with torch.no_grad():
        ref = MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=False, attention_backend="cudnn")(*args)
        eager = MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=False, attention_backend="triton_fp8")
        assert eager.attention_backend == "triton_fp8"
        out = eager(*args)
        from sd35fp8.fast import step as step_mod

        monkeypatch.setattr(step_mod, "ATTN_OUT_ROWS", False)
        out_bf16 = eager(*args)
        monkeypatch.setattr(step_mod, "ATTN_OUT_ROWS", True)
        assert sqnr(ref.float(), out.float()) > sqnr(ref.float(), out_bf16.float()) - 1.0
        assert sqnr(out_bf16.float(), out.float()) > 25
        # our kernel compiled (auto picks FA3 where it is installed: test_attention_fa3.py runs that road)
        fast = MMDiTEngine(model, "dynamic", compile=True, cuda_graphs=True, attention_backend="triton_fp8")
        out2 = fast(*args)
        # static: calibration sets per-head q/k/v scales (no amax pass), the attention writes the proj
        # inputs in e4m3; eager with exact, compiled with fast fp8 accumulation
        for compile_ in (False, True):
            static = MMDiTEngine(model, "static", compile=compile_, cuda_graphs=compile_, fast_accum=compile_)
            amax = static.calibrate(*args)
            assert all(f"{i}.attn" in amax for i in range(len(static.blocks)))
            assert static.blocks[0]["attn.s"].shape == (3, cfg.num_heads)
            for i in cfg.x_block_self_attn_layers:
                assert static.blocks[i]["x.attn2.s"].shape == (3, cfg.num_heads)
            assert sqnr(ref.float(), static(*args).float()) > 20
    assert sqnr(ref.float(), out.float()) > 20 and sqnr(out.float(), out2.float()) > 25



def test_proj_takes_e4m3_attention_outputs_with_row_scales():
    """fast/step.py _proj: the dynamic FP8 attention's (e4m3 [B, L, C], row scales [B*L, 1]) output goes
    into the proj GEMM as it is, and gives the proj of the dequantised output (CPU: torch._scaled_mm)."""
    from torch import nn

    from sd35fp8.fast.step import _proj
    from sd35fp8.fast.weights import linear_weights, put

    g = torch.Generator().manual_seed(0)
    B, L, C = 2, 40, 64
    lin = nn.Linear(C, C)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(C, C, generator=g) / 8)
        lin.bias.copy_(torch.randn(C, generator=g) / 10)
    p: dict = {}
    put(p, "x.proj", linear_weights(lin.to(torch.bfloat16), "dynamic", torch.bfloat16, "x.proj"))
    o = torch.randn(B, L, C, generator=g) * torch.rand(1, 1, C, generator=g)  # an attention output
    s_b = o.abs().amax(dim=(1, 2)) / 448  # [B]: one scale per batch row
    s = s_b.repeat_interleave(L).unsqueeze(1)  # [B*L, 1]
    o8 = (o / s_b[:, None, None]).to(torch.float8_e4m3fn)
    y = _proj(p, "x.proj", (o8, s), "dynamic", torch.bfloat16, None, "auto")  # [B*L, C]
    deq = o8.float() * s_b[:, None, None]
    ref = deq.reshape(B * L, C) @ lin.weight.float().t() + lin.bias.float()
    assert y.shape == (B * L, C) and y.dtype == torch.bfloat16
    assert sqnr(ref, y.float()) > 25  # the weight's e4m3 rounding and the bf16 output
    y_bf16 = _proj(p, "x.proj", deq.to(torch.bfloat16), "dynamic", torch.bfloat16, None, "auto")  # per-token pass
    assert sqnr(y_bf16.float(), y.float()) > 25
