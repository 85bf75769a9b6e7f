"""The fused step's Triton kernels changed without a GPU run compile for sm_90 offline (Triton's wheel ships ptxas;
benchmarks/kernel_sass.py does the same to read their SASS): the adaLN gemv in each of its forms (fast/kernels.py
`_gemv_kernel`: the memo's flag-guarded form, fp8 or 16-bit input and weight) and the residual-LN kernel reading
a padded GEMM's strided rows. Catches what the interpreter does not check: Triton's frontend and the sm_90
lowering of the kernel as the GPU compiles it."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")


def _compile(fn, sig: dict, cst: dict, num_warps: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**sig, **{n: "constexpr" for n in cst}}
    try:
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cst), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    except Exception as err:  # a toolchain without the NVIDIA backend's binaries: nothing to check here
        if "ptxas" in str(err) and ("not found" in str(err) or "No such file" in str(err)):
            pytest.skip(f"no ptxas in this Triton: {err}")
        raise


@pytest.mark.parametrize("a_dtype,w_dtype,has_as,has_ws,memo", [
    ("fp8e4nv", "fp8e4nv", True, True, True),    # dynamic / static adaLN with the memo (the CUDA default)
    ("fp8e4nv", "fp8e4nv", True, True, False),   # the memo off (SD35FP8_ADA_MEMO=0)
    ("bf16", "fp8e4nv", False, True, True),      # weight_only
    ("bf16", "bf16", False, False, True),        # 16-bit adaLN weights
])
def test_gemv_kernel_compiles_for_sm90(a_dtype, w_dtype, has_as, has_ws, memo):
    from sd35fp8.fast import kernels as k

    sig = {"A": f"*{a_dtype}", "AS": "*fp32", "W": f"*{w_dtype}", "WS": "*fp32", "BIAS": "*bf16", "OUT": "*bf16",
           "IDX": "*i64", "FLAG": "*i32", "M": "i32", "N": "i32", "K": "i32"}
    launch = dict(k.GEMV_LAUNCH)
    cst = dict(HAS_AS=has_as, HAS_WS=has_ws, HAS_BIAS=True, MEMO=memo, BLOCK_N=launch.pop("BLOCK_N"),
               BLOCK_K=launch["BLOCK_K"], BLOCK_M=2)
    compiled = _compile(k._gemv_kernel, sig, cst, launch["num_warps"])
    assert compiled.asm["cubin"]


def test_residual_kernel_with_row_stride_compiles_for_sm90():
    from sd35fp8.fast import kernels as k

    launch = k.row_launch(2432)
    sig = {n: "*bf16" for n in ("X", "Y", "GATE", "SHIFT", "SCALE", "XOUT")}
    sig.update({"Q": "*fp8e4nv", "S": "*fp32", "SSTATIC": "*fp32", "L": "i32", "C": "i32", "LDY": "i32", "QS": "i32",
                "stride_mod": "i32"})
    cst = dict(EPS=k.NORM_EPS, BLOCK_A=launch["BLOCK_A"], BLOCK_B=launch["BLOCK_B"], MODE=1)
    assert _compile(k._residual_ln_modulate_kernel, sig, cst, launch["num_warps"]).asm["cubin"]
