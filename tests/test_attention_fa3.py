"""fast/attention_fa3.py: FlashAttention-3's FP8 forward as the attention kind "fa3_fp8" (auto's pick in dynamic mode where
it is installed). Without a Hopper GPU
and flash_attn_interface the kind is refused with a DeviceError naming what is missing; with them (GPU tests, skipped
elsewhere) the engine's step with it stays as close to the cuDNN step as the Triton kind's; its joint op against the
exact attention: tests/test_attention_triton.py test_joint_op_equals_unfused_path."""

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
        auto = MMDiTEngine(model, "dynamic", compile=True, cuda_graphs=True)  # auto picks FA3 here; compiled blocks
        assert auto.attention_backend == "fa3_fp8"
        compiled = auto(*args).float()
    assert sqnr(ref, out) > sqnr(ref, ours) - 2.0
    assert sqnr(out, compiled) > 30


@pytest.mark.parametrize("key, n_ctx", [("attn", 5), ("x.attn2", 0)])
def test_fa3_road_gives_each_proj_its_rows(monkeypatch, key, n_ctx):
    """fast/step.py's FA3 road on the CPU, FA3 itself stood in for by a known output [B, Lc + Lx, C]: with dynamic
    proj linears each stream gets the per-token e4m3 of its own rows (kernels.plain_act_window: ctx rows first,
    none for a self-attention's missing context); with a proj kept 16-bit, views of its rows in bf16."""
    from sd35fp8.fast import step
    from sd35fp8.fast.kernels import plain_act

    B, Lx, C = 2, 7, 16
    out = torch.randn(B, n_ctx + Lx, C, generator=torch.Generator().manual_seed(0)).bfloat16()
    monkeypatch.setattr(attention_fa3, "joint_attention_fa3_op", lambda *args: out)
    qkv_x = torch.zeros(B, Lx, 3 * C)
    qkv_c = torch.zeros(B, n_ctx, 3 * C) if n_ctx else qkv_x
    _, _, proj_c, proj_x = step.ATTN_KEYS[key]
    p = {n + ".w": torch.zeros(C, C) for n in (proj_c, proj_x) if n is not None}
    oc, ox = step._fp8_attention(p, key, qkv_c, qkv_x, n_ctx, 2, "dynamic", None, "fa3_fp8")
    for act, rows in ((oc, out[:, :n_ctx]), (ox, out[:, n_ctx:])):
        if not n_ctx and act is oc:
            assert act is None
            continue
        q, s = act
        qr, sr = plain_act(rows.reshape(-1, C), "dynamic")
        assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    p[proj_x + ".mode"] = "bf16"  # a policy kept the proj 16-bit: bf16 rows, no quantise pass
    oc, ox = step._fp8_attention(p, key, qkv_c, qkv_x, n_ctx, 2, "dynamic", None, "fa3_fp8")
    assert torch.equal(ox, out[:, n_ctx:]) and torch.equal(oc, out[:, :n_ctx])
