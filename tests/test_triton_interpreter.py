"""fast/kernels.py's Triton row kernels and the FP8 attention kernel run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1), held to their torch references: the CUDA tests' checks, in CI. The interpreter is chosen when `triton.jit`
decorates, so the kernels run in a child process with the variable set. Skips without Triton (the CPU
build of torch has none; the test extra installs it on Linux x86-64).

The interpreter's casts (fp32 -> bf16 / e4m3) do not round as the GPU does, so values are compared by SQNR
against the torch reference here, loosely (the CUDA tests hold them bit for bit or code for code). Not here:
the GELU pass (inline PTX tanh.approx, which the interpreter does not run): CUDA tests. The FP8 attention kernel
runs here with tl.math.exp2 in place of its inline-PTX exponential (EXP 0), against the torch emulation.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from interpreted import run_interpreted  # noqa: E402  (tests/ helper)

CHILD = r"""
import json
import torch
from sd35fp8.fast import kernels as k
from sd35fp8.fp8.scaling import sqnr

k.act_impl = lambda t, impl="auto": "triton"  # the Triton kernels on CPU tensors (interpreted)
torch.manual_seed(0)
B, L, C = 2, 37, 2432  # Large's width: rows over 2048 + 512 lanes (384 used)
x = torch.randn(B, L, C, dtype=torch.bfloat16)
mods = torch.randn(B, 3 * C, dtype=torch.bfloat16) * 0.3
gate, shift, scale = mods[:, :C], mods[:, C:2 * C], mods[:, 2 * C:]
y = torch.randn(B * L, C, dtype=torch.bfloat16)
h = torch.randn(B * L, 4 * C, dtype=torch.bfloat16) * 2  # an fc1 output (the plain e4m3 pass)
out = {}


def deq(q, s):
    return q.float() * (s if s is not None else 1)


for mode in (None, "dynamic", "static"):
    st = torch.tensor(0.02) if mode == "static" else None
    ref_x, _ = k._residual_ln_modulate_torch(x, gate, y, shift, scale, mode, st)
    xn, (q, s) = k.residual_ln_modulate_act(x, gate, y, shift, scale, mode, st)
    lq, ls = k._ln_modulate_torch(xn, shift, scale, mode, st)  # the LN part, from the kernel's own x + gate * y
    out[f"residual {mode}"] = {
        "x_sqnr": sqnr(ref_x.float(), xn.float()),
        "sqnr": sqnr(deq(lq, ls), deq(q.view(lq.dtype), s)),
    }
    for name, fn, ref_fn, args in (("ln", k.ln_modulate_act, k._ln_modulate_torch, (x, shift, scale)),
                                   ("plain", k.plain_act, k._plain_torch, (h,))):
        if name == "plain" and mode is None:
            continue
        q, s = fn(*args, mode, st)
        qr, sr = ref_fn(*args, mode, st)
        out[f"{name} {mode}"] = {"sqnr": sqnr(deq(qr, sr), deq(q, s))}
    if mode == "dynamic":  # the proj inputs read in place from a joint output [B, Lc + Lx, C] (FA3's)
        for start, n in ((0, 5), (5, L - 5)):
            q, s = k.plain_act_window(x, start, n, mode)
            qr, sr = k._plain_torch(x[:, start:start + n].reshape(B * n, C), mode, None)
            out[f"window {start} {mode}"] = {"sqnr": sqnr(deq(qr, sr), deq(q, s)), "shape": list(q.shape)}
print(json.dumps(out))
"""


def test_row_kernels_match_torch_in_the_interpreter():
    res = run_interpreted(CHILD)
    assert len(res) == 10, res
    assert res["window 0 dynamic"]["shape"] == [2 * 5, 2432] and res["window 5 dynamic"]["shape"] == [2 * 32, 2432]
    for name, r in res.items():
        # the interpreter's fp32 -> e4m3 / bf16 casts do not round as the GPU's (measured: ~22 dB against
        # torch's e4m3 codes where the GPU is code for code, ~48 dB in bf16): enough to catch a wrong row,
        # column, scale or mask (those land below 5 dB), not the last bit, which the CUDA tests hold
        assert r["sqnr"] > (40 if name.endswith("None") else 20), (name, r)
        if name.startswith("residual"):
            assert r["x_sqnr"] > 40, (name, r)


ATTENTION_CHILD = r"""
import json
import torch
from sd35fp8.fast import attention_triton as at
from sd35fp8.fp8.scaling import sqnr

at._ALLOW_CPU = True  # interpreter launches (fixed tile at._CPU_CONFIG, 64 x 64)
torch.manual_seed(0)


def torch_qkv8(q, k, v):
    # quantize_qkv's layouts and scales from its torch reference, as the emulation quantises (the quantise
    # passes' bf16 Hadamard MMA does not run in the interpreter, which has no bf16 dot)
    B, L, H, D = q.shape
    Lp = -(-L // at.PAD) * at.PAD
    x8, s = at.quantize_qkv_reference(q, k, v)
    x8 = [torch.nn.functional.pad(t.transpose(1, 2).float(), (0, 0, 0, Lp - L)).to(at.FP8_DTYPE) for t in x8]
    return at.QKV8(x8[0], x8[1], x8[2].transpose(2, 3).contiguous(), torch.stack(s).reshape(3, B, H), L)

out = {}
for L in (200, 333):  # a tail block (200 = 3 x 64 + 8); 333: 5 full blocks + 13
    q, k, v = torch.randn(3, 2, L, 3, 64).bfloat16()
    pre = torch_qkv8(q, k, v)
    out_k = at.attention_fp8(pre)  # [B, L, H*D]
    ref = at.fp8_attention_emulated(q, k, v, block_n=at._CPU_CONFIG["BLOCK_N"])
    out[str(L)] = {"vs_emulation": sqnr(ref, out_k.float())}
    # e4m3 outputs with one scale per batch row (OUT_MODE 2), split at 50 context rows
    oc8, ox8, sc, sx = at._attention_fp8_split(pre, 50, torch.bfloat16, None, rows=True)
    s_b = pre.scale[2].amax(1)  # [B]: max over heads of v's scale
    deq = torch.cat([oc8.float() * sc.view(2, 50, 1), ox8.float() * sx.view(2, L - 50, 1)], 1)
    out[f"{L} rows"] = {"vs_emulation": sqnr(ref, deq), "vs_bf16_out": sqnr(out_k.float(), deq),
                        "dtype": str(oc8.dtype), "scales": bool(torch.equal(sc.view(2, 50), s_b[:, None].expand(2, 50))
                                                                and torch.equal(sx.view(2, -1)[:, -1], s_b))}
# the quantise pass's V layouts: V^T [B, H, D, Lp] (our kernel) or [B, H, Lp, D] (v_transposed=False), same codes
# (without the Hadamard rotation: its bf16 MMA does not run in the interpreter)
a = at._quantize(None, (q, k, v), None, hadamard=False, v_transposed=True)
b = at._quantize(None, (q, k, v), None, hadamard=False, v_transposed=False)
out["v_layout"] = {"equal": bool(torch.equal(a.vt.transpose(2, 3).float(), b.vt.float())
                                 and torch.equal(a.q.float(), b.q.float())), "shape": list(b.vt.shape)}
print(json.dumps(out))
"""


def test_fp8_attention_kernel_in_the_interpreter():
    res = run_interpreted(ATTENTION_CHILD)
    v_layout = res.pop("v_layout")
    assert v_layout["equal"] and v_layout["shape"] == [2, 3, 384, 64], v_layout
    assert len(res) == 4, res
    for L, r in res.items():
        # the emulation's numerics but for summation order and the interpreter's fp32 -> e4m3 cast of P, which
        # does not round as the GPU's (measured ~23.6 dB; the CUDA tests hold the kernel to the emulation closely):
        # a wrong block, scale or mask lands near or below 0 dB
        assert r["vs_emulation"] > 15, (L, r)
        if L.endswith("rows"):  # one more e4m3 rounding of the output, per batch row: the row scales are s_b
            assert r["dtype"] == "torch.float8_e4m3fn" and r["scales"], (L, r)
            assert r["vs_bf16_out"] > 15, (L, r)
