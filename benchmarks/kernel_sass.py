"""Compile the fused step's Triton kernels for sm_90 without a GPU and count their instructions (SASS).

Triton compiles for a named target offline (ptxas and cuobjdump ship in its wheel), so a kernel's register
count, spills, shared memory and the instruction mix of its inner loop can be read on any machine:

    pip install triton==3.6.0        # the CPU build of torch has no Triton; a separate --target dir will do
    python benchmarks/kernel_sass.py [--out FILE.json]

Kernels: the FP8 attention kernel (`_attn_fwd`, FP8 path, the pinned sm_90 tile) and the residual-LN kernel
(`_residual_ln_modulate_kernel`, dynamic e4m3, Large's C = 2432). Pointer and
stride arguments carry Triton's divisibility-by-16 hint where Large's launch would (the launcher adds it
for values divisible by 16), so the code matches what the GPU runs (checked against the SASS opcode counts
of the device build in attention_variants_nvidia-h100-80gb-hbm3.json). For each: cuobjdump's resource
line, the whole kernel's opcode counts and those of its first loop (between a backward branch and its
target): for the attention kernel the loop over unmasked key blocks, per [BLOCK_M, BLOCK_N] tile.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def sass(compiled) -> tuple[str, str]:
    """(SASS text, resource usage line) of a compiled kernel, by the cuobjdump in Triton's wheel."""
    import triton.backends.nvidia as nv
    tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return text, res.strip().splitlines()[-1].strip()


def histograms(text: str) -> tuple[dict, dict, int]:
    """(opcode counts of the kernel, of its first loop, that loop's instruction count)."""
    ins = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    loops = []
    for addr, op, rest in ins:
        t = re.search(r"0x([0-9a-f]+)", rest)
        if op == "BRA" and t and int(t.group(1), 16) < addr:
            loops.append((int(t.group(1), 16), addr))
    start, end = loops[0] if loops else (0, -1)  # the first loop in code order (attention: the unmasked blocks)
    whole = collections.Counter(op.split(".")[0] for _, op, _ in ins)
    loop = collections.Counter(op.split(".")[0] for a, op, _ in ins if start <= a <= end)
    return dict(whole.most_common()), dict(loop.most_common()), sum(loop.values())


def compile_attention(out_mode: int = 0):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sd35fp8.fast import attention_triton as at

    cfg = at.PINNED_CONFIGS[((9, 0), 64, True)]
    sig = {"Q": "*fp8e4nv", "K": "*fp8e4nv", "V": "*fp8e4nv", "OC": "*bf16", "OX": "*bf16", "SCALE": "*fp32",
           "OSCALE": "*fp32", "SROWC": "*fp32", "SROWX": "*fp32", "sm_scale_log2e": "fp32"}
    sig.update({n: "i32" for n in "sqb sqh sqm skb skh skn svb svh svn svd H L LC".split()})
    cst = dict(HEAD_DIM=64, FP8=True, P_SHIFT=at.P_LOG2_SCALE, OUT_MODE=out_mode, EXP=1,
               BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], H_P2=64)
    if out_mode:
        sig.update(OC="*fp8e4nv", OX="*fp8e4nv")
    sig.update({k: "constexpr" for k in cst})
    names = list(sig)
    aligned = "Q K V OC OX SCALE OSCALE SROWC SROWX sqb sqh sqm skb skh skn svb svh svd".split()  # svn = 1, H, L, LC odd
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn=at._attn_fwd, signature=sig, constexprs=cst, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}), cfg


def compile_residual_ln():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sd35fp8.fast import kernels as k

    launch = k.row_launch(2432)
    sig = {n: "*bf16" for n in ("X", "Y", "GATE", "SHIFT", "SCALE", "XOUT")}
    sig.update({"Q": "*fp8e4nv", "S": "*fp32", "SSTATIC": "*fp32", "L": "i32", "C": "i32", "LDY": "i32", "QS": "i32",
                "stride_mod": "i32"})
    cst = dict(EPS=k.NORM_EPS, BLOCK_A=launch["BLOCK_A"], BLOCK_B=launch["BLOCK_B"], MODE=1)
    sig.update({n: "constexpr" for n in cst})
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]]
             for n in ("X", "Y", "GATE", "SHIFT", "SCALE", "XOUT", "Q", "S", "L", "C", "LDY", "QS", "stride_mod")}
    return triton.compile(ASTSource(fn=k._residual_ln_modulate_kernel, signature=sig, constexprs=cst, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": launch["num_warps"]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file for the counts")
    args = ap.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("kernel_sass.py needs Triton (pip install triton; the CPU build of torch has none)", file=sys.stderr)
        return 2
    result = {"triton": triton.__version__, "target": "cuda sm_90", "kernels": {}}
    attn, cfg = compile_attention()
    cases = [(f"attention_fp8 {cfg}", attn), (f"attention_fp8 {cfg} e4m3 out per batch row (OUT_MODE 2)",
                                              compile_attention(2)[0]), ("residual_ln", compile_residual_ln())]
    keys = ["MUFU", "F2FP", "FFMA", "FADD", "FMUL", "FMNMX", "IMAD", "SHFL", "PRMT", "QGMMA", "LDGSTS", "LDG",
            "STG", "LDS", "STS", "STL", "LDL"]
    for name, ck in cases:
        text, res = sass(ck)
        whole, loop, n_loop = histograms(text)
        result["kernels"][name] = {"resources": res, "whole": whole, "loop": loop, "loop_instructions": n_loop}
        print(f"{name}\n  {res}\n  first loop: {n_loop} instructions a thread per iteration")
        print("  " + " ".join(f"{k} {loop.get(k, 0)}/{whole.get(k, 0)}" for k in keys) + "   (loop / whole)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
