"""FP8 math core: casts, FP8Linear modes, the quantisation pass. SQNR (dB) vs float32, torchao style."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd35fp8.errors import DeviceError, InputError
from sd35fp8.fp8 import device as fp8_device
from sd35fp8.fp8.device import FP8Support, choose_mode, fp8_compute_capability
from sd35fp8.fp8.linear import FP8Linear, scaled_matmul
from sd35fp8.fp8.quantize import (
    Policy,
    apply_static_scales,
    collect_activation_amax,
    model_weight_bytes,
    quantize_model,
)
from sd35fp8.fp8.scaling import (
    E4M3_MAX,
    amax_to_scale,
    dequantize,
    quantize_rowwise,
    quantize_tensorwise,
    sqnr,
    to_fp8_saturated,
)

CAST_DB = 25.0
LINEAR_DB = 20.0
MODEL_DB = 18.0
MODES = ("weight_only", "dynamic", "static")


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _with_outliers(x: torch.Tensor, seed=1) -> torch.Tensor:
    """Like a transformer activation: a few channels 50x larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    cols = torch.randperm(x.shape[-1], generator=g)[:4]
    x[..., cols] *= 50.0
    return x


def _no_fp8(monkeypatch):
    """Pretend the CPU has no FP8 matmul (an A100-like device)."""
    fake = FP8Support("cpu", False, False, "fake device without fp8 matmul")
    monkeypatch.setitem(fp8_device._SUPPORT_CACHE, "cpu", fake)


# --------------------------------------------------------------------------- scaling


def test_scale_convention_and_zero_guard():
    assert E4M3_MAX == 448.0
    assert float(amax_to_scale(torch.tensor(448.0))) == 1.0
    assert float(amax_to_scale(torch.tensor(896.0))) == 2.0
    q, s = quantize_tensorwise(torch.zeros(8, 16))
    assert torch.isfinite(s) and s > 0
    assert (q.float() == 0).all()
    assert torch.equal(dequantize(q, s), torch.zeros(8, 16))


def test_saturated_cast_never_nans():
    x = torch.tensor([-1e6, -500.0, -1.0, 0.0, 1.0, 500.0, 1e6])
    q = to_fp8_saturated(x, torch.tensor(1.0))
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().tolist() == [-448.0, -448.0, -1.0, 0.0, 1.0, 448.0, 448.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outliers", [False, True])
def test_cast_sqnr(dtype, outliers):
    x = _randn(64, 512, dtype=dtype)
    if outliers:
        x = _with_outliers(x)
    ref = x.float()
    q, s = quantize_tensorwise(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == () and s.dtype == torch.float32
    assert sqnr(ref, dequantize(q, s)) >= CAST_DB
    q, s = quantize_rowwise(x)
    assert s.shape == (64, 1) and s.dtype == torch.float32
    assert sqnr(ref, dequantize(q, s)) >= CAST_DB


def test_rowwise_scale_shapes_and_amax():
    w = _randn(32, 48)
    _, s = quantize_rowwise(w, dim=-1)  # per output channel
    assert s.shape == (32, 1)
    torch.testing.assert_close(s * 448.0, w.abs().amax(dim=1, keepdim=True))
    x = _randn(2, 5, 48)
    q, s = quantize_rowwise(x)  # per token, leading dims kept
    assert q.shape == (2, 5, 48) and s.shape == (2, 5, 1)
    assert (q.float().abs().amax(dim=-1) == 448.0).all()  # each row's max maps to 448


def test_sqnr_definition():
    ref = torch.ones(100)
    assert sqnr(ref, ref) == math.inf
    assert sqnr(ref, ref * 1.1) == pytest.approx(20.0)  # noise = 10% of signal
    with pytest.raises(ValueError):
        sqnr(ref, torch.ones(10))


# --------------------------------------------------------------------------- FP8Linear


def _ref_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), lin.weight.float(), None if lin.bias is None else lin.bias.float())


def _linear(k=512, n=256, dtype=torch.bfloat16, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8linear_modes_sqnr(mode, granularity, dtype):
    lin = _linear(dtype=dtype)
    x = _randn(3, 40, 512, dtype=dtype, seed=2)  # leading dims flattened inside
    layer = FP8Linear.from_linear(lin, mode=mode, granularity=granularity)
    assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
    assert layer.weight_scale.shape == ((256, 1) if granularity == "channel" else ())
    if mode == "static":
        layer.set_input_scale(x.abs().amax())
    y = layer(x)
    assert y.shape == (3, 40, 256) and y.dtype == dtype
    assert sqnr(_ref_linear(lin, x), y.float()) >= LINEAR_DB
    assert f"mode={mode}" in repr(layer) and f"granularity={granularity}" in repr(layer)


def test_fp8linear_dynamic_with_outlier_tokens():
    lin = _linear()
    x = _with_outliers(_randn(64, 512, dtype=torch.bfloat16, seed=3))
    x[::7] *= 30.0  # a few loud tokens: per-token scales absorb them
    y = FP8Linear.from_linear(lin, "dynamic")(x)
    assert sqnr(_ref_linear(lin, x), y.float()) >= LINEAR_DB


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_fp8linear_channel_first_input_goes_row_major(mode, monkeypatch):
    """[1, L, K] viewed from a channel-first buffer (a PatchEmbed output, a ControlNet's token stream at
    batch 1) reshapes to a column-major [L, K] view; _scaled_mm (cuBLASLt) takes row-major only."""
    import sd35fp8.fp8.linear as linear

    lin = _linear()
    x = _randn(1, 512, 64, dtype=torch.bfloat16, seed=4).transpose(1, 2)  # [1, 64, 512], strides (., 1, 64)
    layer = FP8Linear.from_linear(lin, mode)
    if mode == "static":
        layer.set_input_scale(x.abs().amax())
    real = linear.scaled_matmul

    def row_major_only(xq, *args):
        assert xq.stride(-1) == 1, f"activation strides {xq.stride()}"
        return real(xq, *args)

    monkeypatch.setattr(linear, "scaled_matmul", row_major_only)
    y = layer(x)
    assert torch.equal(y, layer(x.contiguous()))
    assert sqnr(_ref_linear(lin, x), y.float()) >= LINEAR_DB


def test_static_mode_calibration_and_errors():
    lin = _linear()
    x = _randn(16, 512, dtype=torch.bfloat16, seed=4)
    layer = FP8Linear.from_linear(lin, "static")
    with pytest.raises(InputError, match="input_scale"):
        layer(x)
    layer.set_input_scale(x.abs().amax(), margin=1.0)
    assert "input_scale=" in repr(layer)
    assert sqnr(_ref_linear(lin, x), layer(x).float()) >= LINEAR_DB
    # Inputs louder than the calibration saturate instead of turning into NaN.
    y = layer(x * 10)
    assert torch.isfinite(y).all()


def test_unaligned_shapes_fall_back_to_weight_only_and_say_so(caplog):
    lin = _linear(k=72, n=40)
    x = _randn(8, 72, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING):
        layer = FP8Linear.from_linear(lin, "dynamic")
    assert layer.fallback_reason and "multiple of 16" in layer.fallback_reason
    assert "fallback=" in repr(layer) and layer.effective_mode == "weight_only"
    assert "multiple of 16" in caplog.text
    assert sqnr(_ref_linear(lin, x), layer(x).float()) >= LINEAR_DB


def test_tensorwise_kernel_epilogue_matches_rowwise():
    lin = _linear()
    layer = FP8Linear.from_linear(lin, "static")  # per-channel weight scale
    x = _randn(32, 512, dtype=torch.bfloat16, seed=5)
    xs = amax_to_scale(x.abs().amax().float())
    xq = to_fp8_saturated(x, xs)
    b = scaled_matmul(xq, xs, layer.weight, layer.weight_scale, layer.bias, rowwise_ok=False)
    assert b.dtype == torch.bfloat16
    exact = F.linear(dequantize(xq, xs), layer.dequantized_weight(torch.float32), layer.bias.float())
    assert sqnr(exact, b.float()) >= 45.0  # same math, only bf16 rounding differs
    if fp8_device.fp8_support("cpu").rowwise:  # torch 2.11 CPU: tensorwise only
        a = scaled_matmul(xq, xs, layer.weight, layer.weight_scale, layer.bias, rowwise_ok=True)
        assert sqnr(exact, a.float()) >= 45.0


def test_dynamic_without_rowwise_kernel_uses_tensorwise(monkeypatch):
    monkeypatch.setitem(fp8_device._SUPPORT_CACHE, "cpu", FP8Support("cpu", True, False, "fake: no rowwise"))
    lin = _linear()
    x = _randn(16, 512, dtype=torch.bfloat16, seed=6)
    y = FP8Linear.from_linear(lin, "dynamic")(x)
    assert sqnr(_ref_linear(lin, x), y.float()) >= LINEAR_DB


def test_dynamic_without_rowwise_kernel_keeps_per_token_scales(monkeypatch):
    """Without a rowwise kernel (CPU torch <= 2.12) a dynamic layer still scales each token on its own:
    a row gives alone, bit for bit, what it gives in a batch with a row 100x larger."""
    monkeypatch.setitem(fp8_device._SUPPORT_CACHE, "cpu", FP8Support("cpu", True, False, "fake: no rowwise"))
    layer = FP8Linear.from_linear(_linear(), "dynamic")
    x = _randn(2, 512, dtype=torch.bfloat16, seed=7)
    x[1] *= 100
    assert torch.equal(layer(x)[:1], layer(x[:1]))


def test_fp8_gemm_fp32_matches_tensorwise_kernel():
    """fp8.device.fp8_gemm_fp32 (CPU: an fp32 matmul of the upcast fp8 operands) = torch's scale-1 tensorwise
    _scaled_mm up to fp32 summation order."""
    a = (_randn(33, 64, seed=8) * 50).to(torch.float8_e4m3fn)
    w = (_randn(48, 64, seed=9) * 50).to(torch.float8_e4m3fn)
    one = torch.ones(())
    kernel = torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    exact = a.double() @ w.double().t()
    got = fp8_device.fp8_gemm_fp32(a, w)
    assert got.dtype == torch.float32 and got.shape == (33, 48)
    torch.testing.assert_close(got, kernel, rtol=0, atol=1e-2)
    assert (got.double() - exact).abs().max() <= (kernel.double() - exact).abs().max() + 1e-2


def test_dtype_cast_keeps_fp8_storage():
    layer = FP8Linear.from_linear(_linear(dtype=torch.float32), "weight_only")
    scale = layer.weight_scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and isinstance(layer.weight, nn.Parameter)
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.bfloat16


def test_state_dict_roundtrip_on_meta():
    from safetensors.torch import load, save

    src = FP8Linear.from_linear(_linear(), "static")
    src.set_input_scale(3.0)
    blob = save(src.state_dict())  # fp8 survives safetensors (F8_E4M3)
    sd = load(blob)
    assert set(sd) == {"weight", "weight_scale", "bias", "input_scale"}
    dst = FP8Linear.empty(512, 256, bias=True, mode="static")
    assert dst.weight.device.type == "meta"
    dst.load_state_dict(sd, assign=True)
    assert dst.weight.device.type == "cpu" and not dst.weight.requires_grad
    x = _randn(4, 512, dtype=torch.bfloat16)
    assert torch.equal(dst(x), src(x))


def test_from_fp8_plain_and_scaled():
    w = _randn(64, 32).to(torch.float8_e4m3fn)
    plain = FP8Linear.from_fp8(w, 1.0, None, "weight_only")  # plain fp8 file: scale 1
    assert plain.granularity == "tensor"
    x = _randn(2, 32)
    torch.testing.assert_close(plain(x), x @ w.float().t())
    with pytest.raises(InputError):
        FP8Linear.from_fp8(w.float(), 1.0)


# --------------------------------------------------------------------------- device / mode choice


def test_choose_mode_on_cpu_and_fake_device(monkeypatch, caplog):
    monkeypatch.delenv(fp8_device.MODE_ENV, raising=False)
    assert fp8_compute_capability("cpu")  # torch CPU implements _scaled_mm here
    mode, reason = choose_mode(None, "cpu")
    assert mode == "dynamic" and "FP8 matmul available" in reason
    assert choose_mode("static", "cpu")[0] == "static"

    _no_fp8(monkeypatch)
    assert choose_mode(None, "cpu")[0] == "weight_only"
    with caplog.at_level(logging.WARNING):
        mode, reason = choose_mode("dynamic", "cpu")
    assert mode == "weight_only" and "needs FP8 matmul" in reason
    assert "needs FP8 matmul" in caplog.text
    layer = FP8Linear.from_linear(_linear(k=32, n=32), "dynamic")
    with pytest.raises(DeviceError, match="choose_mode"):
        layer(torch.randn(2, 32, dtype=torch.bfloat16))


def test_choose_mode_env_and_validation(monkeypatch):
    monkeypatch.setenv(fp8_device.MODE_ENV, "weight_only")
    assert choose_mode(None, "cpu")[0] == "weight_only"
    assert choose_mode("dynamic", "cpu")[0] == "dynamic"  # the argument wins over the env var
    monkeypatch.setenv(fp8_device.MODE_ENV, "int8")
    with pytest.raises(InputError, match="SD35FP8_FP8_MODE"):
        choose_mode(None, "cpu")


# --------------------------------------------------------------------------- model pass


class TinyBlockModel(nn.Module):
    """Names like the MMDiT's so the default policy applies."""

    def __init__(self, d=256):
        super().__init__()
        self.context_embedder = nn.Linear(128, d)
        self.blocks = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(3 * d, d)})
        self.final_layer = nn.ModuleDict({"linear": nn.Linear(d, 64)})

    def forward(self, x):  # [B, T, 128]
        h = self.context_embedder(x)  # [B, T, D]
        h = h + self.blocks(h)
        h = h + self.attn["proj"](self.attn["qkv"](h))
        return self.final_layer["linear"](h)  # [B, T, 64]


def _tiny_model():
    torch.manual_seed(0)
    return TinyBlockModel().to(torch.bfloat16).eval()


@pytest.mark.parametrize("mode", MODES)
def test_quantize_model_sqnr_and_policy(mode):
    model = _tiny_model()
    x = _randn(2, 24, 128, dtype=torch.bfloat16, seed=7)
    with torch.no_grad():
        ref = model.float()(x.float())
    model.to(torch.bfloat16)
    report = quantize_model(model, "weight_only" if mode == "static" else mode)
    if mode == "static":
        amax = collect_activation_amax(model, lambda m: m(x))
        assert set(amax) >= {"blocks.0", "attn.qkv", "context_embedder"}
        assert apply_static_scales(model, amax) == sorted(report.converted)
    assert sorted(report.converted) == ["attn.proj", "attn.qkv", "blocks.0", "blocks.2"]
    assert set(report.kept) == {"context_embedder", "final_layer.linear"}
    assert type(model.context_embedder) is nn.Linear and model.context_embedder.weight.dtype == torch.bfloat16
    assert isinstance(model.blocks[0], FP8Linear) and model.blocks[0].mode == mode
    assert report.bytes_after < 0.6 * report.bytes_before
    assert "FP8Linear" in report.describe()
    with torch.no_grad():
        out = model(x)
    assert sqnr(ref, out.float()) >= MODEL_DB


def test_apply_static_scales_requires_every_layer():
    model = _tiny_model()
    quantize_model(model, "weight_only")
    with pytest.raises(InputError, match="no activation amax"):
        apply_static_scales(model, {"blocks.0": 1.0})


def test_policy_json_roundtrip():
    p = Policy(keep=("final_layer.*", "joint_blocks.23.*"), include=("joint_blocks.*",))
    assert Policy.from_json(p.to_json()) == p
    assert Policy.from_json(Policy().to_json()) == Policy()
    assert p.decide("joint_blocks.23.x_block.mlp.fc1") is not None
    assert p.decide("joint_blocks.3.x_block.mlp.fc1") is None
    assert p.decide("context_embedder") is not None  # not included
    with pytest.raises(InputError, match="unknown fields"):
        Policy.from_json('{"keep": [], "skip": []}')


def test_quantized_model_state_dict_roundtrip_meta():
    model = _tiny_model()
    quantize_model(model, "dynamic")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    with torch.device("meta"):
        fresh = TinyBlockModel().to(torch.bfloat16)
    quantize_model(fresh, "dynamic")  # builds meta FP8Linear layers, no allocation
    assert fresh.blocks[0].weight.device.type == "meta"
    fresh.load_state_dict(sd, assign=True)
    x = _randn(1, 8, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_weight_bytes_about_half_of_bf16():
    lin = _linear(k=1024, n=1024)
    bf16 = model_weight_bytes(lin)
    fp8 = model_weight_bytes(FP8Linear.from_linear(lin))
    assert bf16 == (1024 * 1024 + 1024) * 2
    assert fp8 == 1024 * 1024 + 1024 * 4 + 1024 * 2  # weight 1 B, [N,1] fp32 scale, bf16 bias
    assert 0.49 < fp8 / bf16 < 0.51
