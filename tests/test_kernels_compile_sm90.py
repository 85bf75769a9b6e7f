"""The fused step's Triton kernels changed without a GPU run compile offline for the GPUs they serve (Triton's
wheel ships ptxas; benchmarks/kernel_sass.py does the same to read their SASS): the adaLN gemv in each of its forms
(fast/kernels.py `_gemv_kernel`: the memo's flag-guarded form, fp8 or 16-bit input and weight) and the residual-LN
kernel reading a padded GEMM's strided rows, for sm_90; the weight_only passes (gemv, dequantise) for sm_80 / sm_86
as well, where Triton has no fp8e4nv type and they read the e4m3 weight as bytes (fp8/dequant.py e4m3_operand).
Catches what the interpreter does not check: Triton's frontend and each target's lowering."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


def _compile(fn, sig: dict, cst: dict, num_warps: int, arch: int = 90):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**sig, **{n: "constexpr" for n in cst}}
    try:
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    except Exception as err:  # a toolchain without the NVIDIA backend's binaries: nothing to check here
        if "ptxas" in str(err) and ("not found" in str(err) or "No such file" in str(err)):
            pytest.skip(f"no ptxas in this Triton: {err}")
        raise


@pytest.mark.parametrize("a_dtype,w_dtype,has_as,has_ws,memo,arch", [
    ("fp8e4nv", "fp8e4nv", True, True, True, 90),   # dynamic / static adaLN with the memo (SD35FP8_ADA_MEMO)
    ("fp8e4nv", "fp8e4nv", True, True, False, 90),  # the gemv alone (benchmarks)
    ("bf16", "fp8e4nv", False, True, True, 90),     # weight_only with the memo
    ("bf16", "u8", False, True, False, 86),         # weight_only's every-step GEMV on an RTX 30x0: e4m3 as bytes
    ("bf16", "u8", False, True, False, 80),         # ... and on an A100
    ("bf16", "fp8e4nv", False, True, False, 90),
    ("bf16", "bf16", False, False, True, 90),       # 16-bit adaLN weights
])
def test_gemv_kernel_compiles_for_sm90(a_dtype, w_dtype, has_as, has_ws, memo, arch):
    from sd35fp8.fast import kernels as k

    sig = {"A": f"*{a_dtype}", "AS": "*fp32", "W": f"*{w_dtype}", "WS": "*fp32", "BIAS": "*bf16", "OUT": "*bf16",
           "IDX": "*i64", "FLAG": "*i32", "M": "i32", "N": "i32", "K": "i32"}
    launch = dict(k.GEMV_LAUNCH)
    cst = dict(HAS_AS=has_as, HAS_WS=has_ws, HAS_BIAS=True, MEMO=memo, BLOCK_N=launch.pop("BLOCK_N"),
               BLOCK_K=launch["BLOCK_K"], BLOCK_M=2, W_BITS=w_dtype == "u8")
    compiled = _compile(k._gemv_kernel, sig, cst, launch["num_warps"], arch)
    assert compiled.asm["cubin"]


def test_residual_kernel_with_row_stride_compiles_for_sm90():
    from sd35fp8.fast import kernels as k

    launch = k.row_launch(2432)
    sig = {n: "*bf16" for n in ("X", "Y", "GATE", "SHIFT", "SCALE", "XOUT")}
    sig.update({"Q": "*fp8e4nv", "S": "*fp32", "SSTATIC": "*fp32", "L": "i32", "C": "i32", "LDY": "i32", "QS": "i32",
                "stride_mod": "i32"})
    cst = dict(EPS=k.NORM_EPS, BLOCK_A=launch["BLOCK_A"], BLOCK_B=launch["BLOCK_B"], MODE=1)
    assert _compile(k._residual_ln_modulate_kernel, sig, cst, launch["num_warps"]).asm["cubin"]


@pytest.mark.parametrize("arch,w_dtype", [(80, "u8"), (86, "u8"), (90, "fp8e4nv")])
def test_dequant_kernel_compiles(arch, w_dtype):
    """fp8/dequant.py's weight_only dequantise pass: fp8e4nv on sm_89+, the e4m3 bytes before (Ampere)."""
    from sd35fp8.fp8 import dequant

    sig = {"W": f"*{w_dtype}", "S": "*fp32", "OUT": "*bf16", "N": "i32", "K": "i32"}
    cst = dict(PER_ROW=True, BLOCK_N=dequant._BLOCK_N, BLOCK_K=dequant._BLOCK_K, W_BITS=w_dtype == "u8")
    assert _compile(dequant._dequant_kernel, sig, cst, 8, arch).asm["cubin"]


def test_fp8e4nv_needs_sm89_in_triton():
    """Why the bytes road exists: Triton refuses fp8e4nv before sm_89 (weight_only mode on Ampere used to fail)."""
    from sd35fp8.fp8 import dequant

    sig = {"W": "*fp8e4nv", "S": "*fp32", "OUT": "*bf16", "N": "i32", "K": "i32"}
    cst = dict(PER_ROW=True, BLOCK_N=dequant._BLOCK_N, BLOCK_K=dequant._BLOCK_K, W_BITS=False)
    with pytest.raises(Exception, match="fp8e4nv not supported"):
        _compile(dequant._dequant_kernel, sig, cst, 8, 86)


DECODE_CHILD = r"""
import json
import torch
import triton
import triton.language as tl
from sd35fp8.fp8 import dequant
from sd35fp8.fast import kernels as k

@triton.jit
def _decode(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, dequant.e4m3_bits_to_f32(tl.load(X + offs, mask=offs < n, other=0)), mask=offs < n)

codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
ref = codes.view(torch.float8_e4m3fn).float()
got = torch.empty(256)
_decode[(1,)](codes, got, 256, BLOCK=256)
finite = ~torch.isnan(ref)  # 0x7f, 0xff: NaN codes, not decoded as NaN
same = bool(torch.equal(got[finite], ref[finite])) and bool(torch.equal(torch.signbit(got[finite]), torch.signbit(ref[finite])))
# the two kernels with the weight as bytes against the same kernels on the fp8 tensor
torch.manual_seed(0)
w8 = (torch.randn(100, 192) * 0.3).to(torch.float8_e4m3fn)
ws = torch.rand(1, 100) + 0.5
a = torch.randn(2, 192, dtype=torch.bfloat16)
y_bits = torch.empty(2, 100)
y_fp8 = torch.empty(2, 100)
for w, bits, y in ((w8.view(torch.uint8), True, y_bits), (w8, False, y_fp8)):
    k._gemv_kernel[(triton.cdiv(100, 64),)](a, y, w, ws, y, y, y, y, 2, 100, 192, HAS_AS=False, HAS_WS=True,
                                            HAS_BIAS=False, MEMO=False, BLOCK_N=64, BLOCK_K=128, BLOCK_M=2, W_BITS=bits)
d_bits = torch.empty(100, 192, dtype=torch.bfloat16)
d_fp8 = torch.empty(100, 192, dtype=torch.bfloat16)
s = ws.reshape(-1).contiguous()
for w, bits, out in ((w8.view(torch.uint8), True, d_bits), (w8, False, d_fp8)):
    dequant._dequant_kernel[(triton.cdiv(100, 8), triton.cdiv(192, 1024))](w, s, out, 100, 192, PER_ROW=True,
                                                                           BLOCK_N=8, BLOCK_K=1024, W_BITS=bits)
print(json.dumps({"decode_exact": same, "nan_codes": int((~finite).sum()), "gemv_same": bool(torch.equal(y_bits, y_fp8)),
                  "dequant_same": bool(torch.equal(d_bits, d_fp8))}))
"""


def test_e4m3_bytes_decode_exactly_in_the_interpreter():
    """e4m3_bits_to_f32 gives torch's value for each of the 254 non-NaN codes (signed zeros too), and the gemv /
    dequantise kernels on the weight's bytes give the bits they give on the fp8 tensor."""
    from interpreted import run_interpreted  # tests/ helper

    res = run_interpreted(DECODE_CHILD)
    assert res == {"decode_exact": True, "nan_codes": 2, "gemv_same": True, "dequant_same": True}, res
