"""fast/mlp_triton.py: the MLP's FP8 GEMMs in Triton with GELU + a 1 x 128 block e4m3 quantise in fc1's epilogue
(opt-in, fast/step.py MLP_FUSED). Run by Triton's interpreter on the CPU (a child process with TRITON_INTERPRET=1,
as tests/test_triton_interpreter.py), both fc1 kernels (plain, persistent TMA) against float32 math on the same e4m3
operands; on a GPU, the fused MLP against the step's own road (cuBLAS fc1, the GELU row pass, cuBLAS fc2)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from interpreted import run_interpreted  # noqa: E402  (tests/ helper)

CHILD = r"""
import json, math
import torch
from sd35fp8.fast import mlp_triton as mt
from sd35fp8.fp8.scaling import sqnr

def case(m, k, n1, n2, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=g)
    sa = (x.abs().amax(1, keepdim=True) / 448)
    a8 = (x / sa).to(torch.float8_e4m3fn)
    w1 = torch.randn(n1, k, device=device, generator=g) / math.sqrt(k)
    w2 = torch.randn(n2, n1, device=device, generator=g) / math.sqrt(n1)
    s1, s2 = w1.abs().amax(1, keepdim=True) / 448, w2.abs().amax(1, keepdim=True) / 448
    w18, w28 = (w1 / s1).to(torch.float8_e4m3fn), (w2 / s2).to(torch.float8_e4m3fn)
    b1 = (torch.randn(n1, device=device, generator=g) * 0.1).bfloat16()
    return a8, sa, w18, s1.reshape(1, -1).contiguous(), b1, w28, s2.reshape(1, -1).contiguous()

a8, sa, w18, s1, b1, w28, s2 = case(70, 256, 512, 128)
h = a8.float() @ w18.float().t() * sa * s1 + b1.float()
ref = torch.nn.functional.gelu(h, approximate="tanh") @ (w28.float() * s2.reshape(-1, 1)).t()
out = {}
mt.FC1_TILE, mt.FC2_TILE = (32, 256, 128, 4, 2), (32, 128, 128, 4, 2)
for tma in (False, True):
    mt.FC1_TMA = tma
    y = mt.mlp_fused(a8, sa, w18, s1, b1, w28, s2, None)
    out[f"tma {tma}"] = {"sqnr": sqnr(ref, y.float()), "shape": list(y.shape), "dtype": str(y.dtype),
                         "fits": mt.fits(256, 512, 128), "fits_odd": mt.fits(200, 512, 128)}
print(json.dumps(out))
"""


def test_mlp_fused_kernels_in_the_interpreter():
    res = run_interpreted(CHILD)
    assert len(res) == 2, res
    for name, r in res.items():
        # e4m3 rounding of GELU's output per 1 x 128 block (~26 dB measured), the interpreter's e4m3 casts
        assert r["sqnr"] > 20 and r["shape"] == [70, 128] and r["dtype"] == "torch.bfloat16", (name, r)
        assert r["fits"] and not r["fits_odd"], (name, r)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs fp8 tensor cores (sm_89+)")
def test_mlp_fused_close_to_the_step_road_gpu(monkeypatch):
    from torch import nn

    from sd35fp8.fast import step
    from sd35fp8.fast.kernels import ln_modulate_act
    from sd35fp8.fast.weights import linear_weights, put
    from sd35fp8.fp8.scaling import sqnr

    torch.manual_seed(0)
    B, L, C, H = 2, 150, 256, 1024  # fits the default tiles: C % 128, H % 256
    p: dict = {}
    for name, (n, k) in (("x.fc1", (H, C)), ("x.fc2", (C, H))):
        lin = nn.Linear(k, n).cuda().bfloat16()
        put(p, name, linear_weights(lin, "dynamic", torch.bfloat16, name))
    x = torch.randn(B, L, C, device="cuda", dtype=torch.bfloat16)
    mods = torch.randn(B, 2 * C, device="cuda", dtype=torch.bfloat16) * 0.3
    act = ln_modulate_act(x, mods[:, :C], mods[:, C:], "dynamic")
    gate = torch.ones(B, C, device="cuda", dtype=torch.bfloat16)
    base = step._mlp_residual(p, "x", x, act, gate, "dynamic", None, "auto")
    monkeypatch.setattr(step, "MLP_FUSED", True)
    assert step._mlp_fused_fits(p, "x", act, "dynamic", "dynamic", None)
    fused = step._mlp_residual(p, "x", x, act, gate, "dynamic", None, "auto")
    assert sqnr((base - x).float(), (fused - x).float()) > 22
