"""fast/attention_fa3.py: FlashAttention-3's FP8 forward as the opt-in attention kind "fa3_fp8". Without a Hopper GPU
and flash_attn_interface the kind is refused with a DeviceError naming what is missing; with them (GPU tests, skipped
elsewhere) it matches the exact attention as closely as our Triton kernel does, and the engine's step with it stays
as close to the cuDNN step as the Triton kind's."""

from __future__ import annotations

import pytest
import torch

from sd35fp8.errors import DeviceError
from sd35fp8.fast import MMDiTEngine, attention_fa3
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

FA3 = torch.cuda.is_available() and attention_fa3.available("cuda")


def _model(device: str = "cpu") -> MMDiT:
    model = MMDiT(MMDiTConfig.tiny()).eval()
    init_random_(model, torch.Generator().manual_seed(0))
    return model.to(device, torch.bfloat16)


def test_fa3_kind_refused_where_it_cannot_run():
    assert not attention_fa3.available("cpu")
    with pytest.raises(DeviceError, match="sm_90"):
        MMDiTEngine(_model(), "dynamic", attention_backend="fa3_fp8")
    if torch.cuda.is_available() and not FA3:
        with pytest.raises(DeviceError):
            attention_fa3.check("cuda")


@pytest.mark.skipif(not FA3, reason="needs a Hopper GPU and flash_attn_interface (tokenspeed-fa3)")
def test_fa3_joint_op_close_to_ours_gpu():
    import torch.nn.functional as F

    from sd35fp8.fast.attention_triton import joint_attention_fp8_op

    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, D, Lc, Lx = 2, 3, 64, 77, 300
    qkv_c = torch.randn(B, Lc, 3 * H * D, device="cuda", generator=g).bfloat16()
    qkv_x = torch.randn(B, Lx, 3 * H * D, device="cuda", generator=g).bfloat16() * 2
    w = [(torch.rand(D, device="cuda", generator=g) + 0.5).bfloat16() for _ in range(4)]
    qc, kc, vc = qkv_c.view(B, Lc, 3, H, D).unbind(2)
    qx, kx, vx = qkv_x.view(B, Lx, 3, H, D).unbind(2)
    rms = lambda t, wt: F.rms_norm(t, (D,), wt, eps=1e-6)  # noqa: E731
    q = torch.cat([rms(qc, w[0]), rms(qx, w[2])], 1)
    k = torch.cat([rms(kc, w[1]), rms(kx, w[3])], 1)
    v = torch.cat([vc, vx], 1)
    exact = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
    exact = exact.transpose(1, 2).reshape(B, Lc + Lx, H * D)
    oc, ox = attention_fa3.joint_attention_fa3_op(qkv_c, qkv_x, Lc, H, *w)
    assert oc.shape == (B, Lc, H * D) and ox.shape == (B, Lx, H * D) and oc.dtype == torch.bfloat16
    ours = torch.cat(joint_attention_fp8_op(qkv_c, qkv_x, Lc, H, *w), 1)
    fa3_db, ours_db = sqnr(exact, torch.cat([oc, ox], 1).float()), sqnr(exact, ours.float())
    assert fa3_db > ours_db - 2.0, (fa3_db, ours_db)


@pytest.mark.skipif(not FA3, reason="needs a Hopper GPU and flash_attn_interface (tokenspeed-fa3)")
def test_fa3_step_close_to_cudnn_gpu():
    model = _model("cuda")
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    args = (torch.randn(2, cfg.in_channels, 32, 32, generator=g).cuda().bfloat16(), torch.tensor([0.7, 0.7]).cuda(),
            torch.randn(2, 20, cfg.context_dim, generator=g).cuda().bfloat16(),
            torch.randn(2, cfg.pooled_dim, generator=g).cuda().bfloat16())
    with torch.no_grad():
        ref = MMDiTEngine(model, "dynamic", cuda_graphs=False, attention_backend="cudnn")(*args).float()
        ours = MMDiTEngine(model, "dynamic", cuda_graphs=False, attention_backend="triton_fp8")(*args).float()
        fa3 = MMDiTEngine(model, "dynamic", cuda_graphs=True, attention_backend="fa3_fp8")
        assert fa3.attention_backend == "fa3_fp8"
        out = fa3(*args).float()
    assert sqnr(ref, out) > sqnr(ref, ours) - 2.0
