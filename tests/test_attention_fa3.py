"""fast/attention_fa3.py: FlashAttention-3's FP8 forward as the opt-in attention kind "fa3_fp8". Without a Hopper GPU
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
    assert sqnr(ref, out) > sqnr(ref, ours) - 2.0
