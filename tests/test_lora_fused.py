"""The unmerged LoRA inside the FP8 GEMM (lora/fused.py): same result as the separate road within fp8
rounding, on one layer (two terms, one on some rows only) and through the fused step; the fallbacks
(too strong a LoRA for the scales, DoRA, the switch); the kernels' spare input columns."""

from __future__ import annotations

import pytest
import torch

from sd35fp8.fast import MMDiTEngine
from sd35fp8.fast import kernels
from sd35fp8.fp8.device import rowwise_scaled_mm
from sd35fp8.fp8.quantize import quantize_model
from sd35fp8.fp8.scaling import quantize_rowwise, sqnr
from sd35fp8.lora import LoraSet, fused
from sd35fp8.lora.apply import ActiveTerm, apply_lora

from test_lora_graphs import CFG, random_lora
from mmdit_cases import build, inputs

CUDA = torch.cuda.is_available()



# The fused road needs a rowwise-scaled FP8 matmul (CUDA; the CPU from torch 2.13): elsewhere every layer
# takes apply_lora (the separate road, tests/test_lora.py), which is what pack_for returning None means.
needs_rowwise = pytest.mark.skipif(not rowwise_scaled_mm(torch.device("cpu")),
                                   reason="this torch has no rowwise _scaled_mm on the CPU: the fused LoRA road is off")

def _layer(m=192, k=320, n=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    w8, ws = quantize_rowwise(torch.randn(n, k, generator=g) / k ** 0.5, dim=-1)
    x = torch.randn(m, k, generator=g)
    x[:, :4] *= 8  # a few outlier channels, as activations have
    x8, xs = quantize_rowwise(x, dim=-1)
    return g, w8, ws.reshape(1, n).float(), x8, xs


def _terms(g, k, n, up_std):
    return [ActiveTerm(torch.randn(8, k, generator=g) / k ** 0.5, torch.randn(n, 8, generator=g) * up_std, 0, 1.0),
            ActiveTerm(torch.randn(4, k, generator=g) / k ** 0.5, torch.randn(64, 4, generator=g) * up_std, 64, 0.5)]


@needs_rowwise
@pytest.mark.parametrize("down", ["bf16", "fp8"])
@pytest.mark.parametrize("up_std", [0.02, 0.2])
def test_fused_layer_matches_the_separate_road(up_std, down, monkeypatch):
    """One layer, a full-rows and a partial-rows term: fused output against the float reference; the LoRA
    update itself within fp8 rounding (>= 24 dB: h8 and U8 are e4m3, like x8 and W8 in the base GEMM;
    >= 22 dB with e4m3 down factors too). The input's spare columns run K + R + PAD to the K tile."""
    monkeypatch.setenv(fused.DOWN_ENV, down)
    g, w8, ws, x8, xs = _layer()
    terms = _terms(g, 320, 192, up_std)
    pack = fused.pack_for(terms, w8, ws)
    assert pack is not None and pack.down.shape == (16, 320) and pack.rank == 64  # 320 + 16 -> 384 = 3 x 128
    assert pack.w_aug.shape == (192, 384) and not pack.w_aug[:, 336:].float().any()
    assert pack.down.dtype == (torch.float8_e4m3fn if down == "fp8" else torch.bfloat16)
    assert fused.pack_for(terms, w8, ws) is pack  # cached on the slot
    b = torch.randn(192, generator=g).bfloat16()
    y = fused.fused_matmul(x8, xs, pack, b, torch.bfloat16, False).float()
    xd = x8.float() * xs
    base = xd @ w8.float().t() * ws + b.float()
    ref = base.clone()
    for t in terms:
        ref[:, t.offset:t.offset + t.up.shape[0]] += t.strength * (xd @ t.down.t()) @ t.up.t()
    sep = apply_lora(torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws, bias=b, out_dtype=torch.bfloat16),
                     x8, terms, b, xs).float()
    print(f"up_std {up_std}: fused {sqnr(ref, y):.1f} dB, separate {sqnr(ref, sep):.1f} dB, "
          f"update {sqnr(ref - base, y - base):.1f} dB, shift {float((pack.scale_b / ws).log2().max()):.0f}")
    assert sqnr(ref - base, y - base) >= (24.0 if down == "bf16" else 22.0)
    assert sqnr(ref, y) >= 30.0
    wide = fused.spare_input(x8, pack.rank)  # the input as the activation kernels leave it: same result
    assert torch.equal(fused.fused_matmul(wide, xs, pack, b, torch.bfloat16, False).float(), y)


def test_fallbacks(monkeypatch):
    g, w8, ws, _, _ = _layer()
    assert fused.pack_for(_terms(g, 320, 192, 20.0), w8, ws) is None  # U8 would need > MAX_SHIFT
    dora = _terms(g, 320, 192, 0.02)
    dora[0].dora_g = torch.ones(192)
    assert fused.pack_for(dora, w8, ws) is None
    assert fused.pack_for(_terms(g, 320, 192, 0.02), w8.float(), ws) is None  # not an fp8 weight
    monkeypatch.setenv(fused.ENV, "0")
    assert fused.pack_for(_terms(g, 320, 192, 0.02), w8, ws) is None


@needs_rowwise
@torch.no_grad()
def test_fused_step_keeps_the_fp8_sqnr(monkeypatch):
    """FP8 dynamic fused step with a LoRA on every joint-block linear: against the float32 merged model,
    within 0.5 dB of the separate road (SD35FP8_LORA_FUSED=0); every joint-block linear took the fused one."""
    model = build(CFG)
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    lora = random_lora(model, 1, name="a")
    base32 = model(x, sigma, context, pooled)
    fp8 = build(CFG)
    fp8.load_state_dict(model.state_dict())
    quantize_model(fp8, mode="dynamic")
    engine = MMDiTEngine(fp8, fp8_mode="dynamic")
    base8 = engine(x, sigma, context, pooled)
    loras8 = LoraSet({"mmdit": fp8})
    loras8.load(lora, "a")
    out = engine(x, sigma, context, pooled)
    linears = [v for p in engine.blocks for k, v in p.items() if k.endswith(".lora")]
    built = [getattr(s[0], fused._ATTR, (None, None))[1] for s in linears]
    assert len(built) == 15 and all(p is not None for p in built)  # every joint-block linear (adaLN aside)
    fused_tag = engine.lora_state()[0]
    monkeypatch.setenv(fused.ENV, "0")
    assert engine.lora_state()[0] != fused_tag  # a CUDA graph per road
    sep = engine(x, sigma, context, pooled)
    loras = LoraSet({"mmdit": model})
    loras.load(lora, "a")
    loras.fuse()  # float32: W + up @ down exactly
    ref = model(x, sigma, context, pooled)
    s_base, s_fused, s_sep = sqnr(base32, base8), sqnr(ref, out), sqnr(ref, sep)
    print(f"FP8 base {s_base:.2f} dB, fused LoRA {s_fused:.2f} dB, separate {s_sep:.2f} dB")
    assert s_fused >= s_sep - 0.5  # (tests/test_lora.py holds both roads to the base step's SQNR)


@pytest.mark.parametrize("dev", ["cpu"] + (["cuda"] if CUDA else []))
def test_spare_columns_and_down_kernel(dev):
    """Activation kernels with `extra` spare columns write the same first columns; lora_down_fp8 (Triton
    on CUDA) fills the spare ones as the torch reference does."""
    g = torch.Generator().manual_seed(0)
    B, L, C = 2, 40, 192
    xin = torch.randn(B, L, C, generator=g).to(dev)
    shift, scale = (torch.randn(B, C, generator=g).to(dev) * 0.1 for _ in range(2))
    h = torch.randn(B * L, 4 * C, generator=g).to(dev)
    for fn, args in ((kernels.ln_modulate_act, (xin, shift, scale)), (kernels.gelu_act, (h,)),
                     (kernels.plain_act, (h,))):
        q0, s0 = fn(*args, "dynamic")
        q1, s1 = fn(*args, "dynamic", extra=32)
        assert q1.shape == (q0.shape[0], q0.shape[1] + 32)
        assert torch.equal(q1[:, :q0.shape[1]].view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s0, s1)
    _, (q0, _) = kernels.residual_ln_modulate_act(xin, shift, h[:, :C], shift, scale, "dynamic")
    _, (q1, _) = kernels.residual_ln_modulate_act(xin, shift, h[:, :C], shift, scale, "dynamic", extra=16)
    assert torch.equal(q1[:, :C].view(torch.uint8), q0.view(torch.uint8))
    a = q1.clone()
    down = (torch.randn(16, C, generator=g) / C ** 0.5).to(dev, torch.bfloat16)
    inv_beta = torch.rand(16, generator=g).to(dev) + 0.05
    kernels.lora_down_fp8(a, C, down, inv_beta)
    expect = ((q1[:, :C].float() @ down.float().t()) * inv_beta).clamp(-448, 448)
    assert torch.equal(a[:, :C].view(torch.uint8), q1[:, :C].view(torch.uint8))
    assert sqnr(expect, a[:, C:].float()) >= 25.0


def test_down_kernel_split_k_choice():
    """lora_down_fp8 sums K in chunks when the row tiles leave SMs idle (a context's 666 rows, 11
    tiles of 64), each chunk >= 512 columns; one pass when the tiles fill the GPU (or K is short)."""
    assert kernels.lora_down_splits(666, 2432, 132) == 4  # 11 tiles: 264 // 11 = 24, K caps it at 4
    assert kernels.lora_down_splits(666, 9728, 132) == 16
    assert kernels.lora_down_splits(80, 192, 132) == 1  # the test above: K shorter than two quanta
    assert kernels.lora_down_splits(40000, 9728, 132) == 1  # 625 tiles fill 132 SMs


@pytest.mark.skipif(not CUDA, reason="the split-K Triton kernels need CUDA")
@pytest.mark.parametrize("down_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("m,k,pad", [(666, 2432, 64), (666, 9728, 0), (8192, 2432, 64), (80, 192, 48)])
def test_down_kernel_matches_the_reference(m, k, pad, down_dtype):
    """One pass or split-K, bf16 or e4m3 down factors: h8 as the torch reference; the PAD columns zero."""
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(m, k + 64 + pad, generator=g) * 50).clamp(-448, 448).to("cuda", torch.float8_e4m3fn)
    down = (torch.randn(64, k, generator=g) * 100 / k ** 0.5).clamp(-448, 448).to("cuda", down_dtype)
    inv_beta = (torch.rand(64, generator=g).to("cuda") + 0.05) / 100
    kernels.lora_down_fp8(a, k, down, inv_beta)
    expect = ((a[:, :k].float() @ down.float().t()) * inv_beta).clamp(-448, 448)
    assert sqnr(expect, a[:, k:k + 64].float()) >= 25.0
    assert not a[:, k + 64:].float().any()


@torch.no_grad()
def test_grouped_adaln_lora_equals_the_layer_hooks():
    """16-bit engine: the adaLN LoRAs applied grouped (fused.ada_apply: one down GEMM, batched up GEMMs,
    one index_add) give the model's own forward (apply_lora in each layer's hook); a strength change
    rebuilds the grouped pack."""
    model = build(CFG)
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    engine = MMDiTEngine(model, fp8_mode=None)
    loras = LoraSet({"mmdit": model})
    loras.load(random_lora(model, 1, name="a"), "a")
    loras.load(random_lora(model, 2, name="b"), "b", strength=0.5)
    for active in ({"a": 1.0, "b": 0.5}, {"a": 0.3}):
        loras.set_active(active)
        got, want = engine(x, sigma, context, pooled), model(x, sigma, context, pooled)
        assert (got - want).norm() <= 1e-5 * want.norm()
        assert fused.ada_pack_for(engine.ada_lora, torch.float32) is not None


@needs_rowwise
def test_roads_per_layer():
    """The engine's choice (fast/step.py _lora_pack): fp8 matmul modes from resident weights take the fused
    road; streamed blocks (offload sequential: weights in a reused device slot) and 16-bit modes do not."""
    from sd35fp8.fast.step import _lora_pack

    g, w8, ws, _, _ = _layer()
    p = {"l.w": w8, "l.ws": ws, "l.lora": _terms(g, 320, 192, 0.02)}
    assert _lora_pack(p, "l", "dynamic") is not None and _lora_pack(p, "l", "static") is not None
    assert _lora_pack({**p, "streamed": True}, "l", "dynamic") is None
    assert _lora_pack(p, "l", "weight_only") is None and _lora_pack(p, "l", None) is None
    assert _lora_pack({**p, "l.lora": []}, "l", "dynamic") is None
