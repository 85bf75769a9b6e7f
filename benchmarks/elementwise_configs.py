"""Sweep the lane layout and launch width (num_warps) of the fused step's row kernels (fast/kernels.py) at
the SD3.5 Large shapes (CFG batch 2, 4096 + 154 tokens, C = 2432, MLP 9728), FP8 dynamic: time and
achieved GB/s of each. Layouts: "one block" (a row in next_power_of_2(n) lanes, the kernels before
session 20) and "split" (`row_blocks`: two power-of-2 parts, fewer masked lanes). Then the FP8
attention's amax and quantise passes (fast/attention_triton.py AMAX_LAUNCH / QUANT_LAUNCH) over
BLOCK_L x num_warps.

    python benchmarks/elementwise_configs.py --out benchmarks/results/elementwise_configs_<device>.json   # CUDA

Kernels: GELU + per-token e4m3 (fc2 input, `_act_rows_kernel`), per-token e4m3 alone (proj input, the same
kernel), x + gate * y then LayerNorm, modulate, e4m3 (`_residual_ln_modulate_kernel`; several rows a program were
swept in session 22 and were slower, residual_rows_nvidia-h100-80gb-hbm3.json). Bytes = what each must
read and write once (bf16 in, e4m3 + fp32 row scales out, bf16 x out); the project's choice is marked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096 + 154)
    ap.add_argument("--hidden", type=int, default=2432)
    ap.add_argument("--only", choices=("all", "rows", "attention", "persistent"), default="all")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("elementwise_configs.py needs CUDA", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    from sd35fp8.fast import kernels as k

    dev = torch.device("cuda")
    B, L, C = 2, args.tokens, args.hidden
    M, F = B * L, 4 * C
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(M, F, device=dev, generator=g).to(torch.bfloat16)  # fc1 output
    o = torch.randn(M, C, device=dev, generator=g).to(torch.bfloat16)  # attention output
    x = torch.randn(B, L, C, device=dev, generator=g).to(torch.bfloat16)
    y = torch.randn(M, C, device=dev, generator=g).to(torch.bfloat16)
    mods = torch.randn(B, 3 * C, device=dev, generator=g).to(torch.bfloat16)
    gate, shift, scale = mods[:, :C], mods[:, C:2 * C], mods[:, 2 * C:]
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "shape": {"B": B, "L": L, "C": C, "mlp": F}, "kernels": {}}

    def layouts(n):
        return {"one block": (triton.next_power_of_2(n), 1), "split": k.row_blocks(n)}

    def sweep(name, n, nbytes, launch):
        rows = []
        for layout, (ba, bb) in layouts(n).items():
            for w in (4, 8, 16):
                fn = lambda: launch(dict(BLOCK_A=ba, BLOCK_B=bb, num_warps=w))  # noqa: E731
                fn()
                ms = do_bench(fn, warmup=10, rep=100)
                rows.append({"layout": layout, "lanes": ba + bb, "num_warps": w, "ms": ms, "gb_s": nbytes / ms / 1e6,
                             "project": k.row_launch(n) == dict(BLOCK_A=ba, BLOCK_B=bb, num_warps=w)})
        res["kernels"][name] = rows

    def rows_case(name, t, gelu):
        n = t.shape[1]
        q = torch.empty(t.shape, device=dev, dtype=torch.float8_e4m3fn)
        s = torch.empty(t.shape[0], 1, device=dev, dtype=torch.float32)
        sweep(name, n, t.numel() * 2 + q.numel() + s.numel() * 4,
              lambda meta: k._act_rows_kernel[(t.shape[0],)](t, q, s, q, n, n, 1, 1, 0, MODE=1, GELU=gelu,
                                                             **meta))  # LI, LO, OFF: each row reads itself

    if args.only in ("all", "rows"):
        rows_case("gelu_quant_fc2_input", h, True)
        rows_case("quant_proj_input", o, False)
        x_new = torch.empty_like(x)
        q = torch.empty(M, C, device=dev, dtype=torch.float8_e4m3fn)
        s = torch.empty(M, 1, device=dev, dtype=torch.float32)
        nbytes = x.numel() * 2 * 2 + y.numel() * 2 + q.numel() + s.numel() * 4
        sweep("residual_ln_modulate_quant", C, nbytes,
              lambda meta: k._residual_ln_modulate_kernel[(M,)](x, y, gate, shift, scale, x_new, q, s, q, L, C, C, C,
                                                                mods.stride(0), EPS=k.NORM_EPS, MODE=1, **meta))

    if args.only in ("all", "rows", "persistent"):
        persistent_rows(res, k, x, y, gate, shift, scale, mods, h, M, L, C, dev, do_bench)
    for name, rows in res["kernels"].items():
        print(name)
        for r in rows:
            print(f"  {r['layout']:9s} {r['lanes']:5d} lanes, warps {r['num_warps']:2d}: {r['ms'] * 1000:7.1f} us  "
                  f"{r['gb_s']:7.0f} GB/s{'  <- project' if r['project'] else ''}{'  ' + r['error'] if 'error' in r else ''}")
    if args.only in ("all", "attention"):
        attention_quantize(res, B, args.tokens - 4096, 4096, C, dev, g, do_bench)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def persistent_rows(res: dict, k, x, y, gate, shift, scale, mods, h, M, L, C, dev, do_bench) -> None:
    """The persistent row passes (row_persistent_kernels.py) over programs per SM x num_stages x num_warps, beside a
    torch copy of the same tensors (the bandwidth a plain read + write reaches here)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from row_persistent_kernels import gelu_rows, residual_ln
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    x_new = torch.empty_like(x)
    q = torch.empty(M, C, device=dev, dtype=torch.float8_e4m3fn)
    s = torch.empty(M, 1, device=dev, dtype=torch.float32)
    qh = torch.empty(h.shape, device=dev, dtype=torch.float8_e4m3fn)
    nbytes_res = x.numel() * 2 * 2 + y.numel() * 2 + q.numel() + s.numel() * 4
    nbytes_gelu = h.numel() * 2 + qh.numel() + s.numel() * 4
    out = res["kernels"]
    for name, t in (("copy_x", x), ("copy_fc1_out", h)):
        dst = torch.empty_like(t)
        ms = do_bench(lambda: dst.copy_(t), warmup=10, rep=100)  # noqa: B023
        out[name] = [{"layout": "torch copy", "lanes": 0, "num_warps": 0, "ms": ms,
                      "gb_s": t.numel() * 4 / ms / 1e6, "project": False}]
    rows_res, rows_gelu = [], []
    for per_sm in (2, 4, 8, 16):
        for stages in (1, 2, 3):
            for w in (4, 8):
                grid = (min(M, sms * per_sm),)
                ba, bb = k.row_blocks(C)
                meta = dict(BLOCK_A=ba, BLOCK_B=bb, STAGES=stages, num_warps=w)
                fn = lambda: residual_ln[grid](x, y, gate, shift, scale, x_new, q, s, M, L, C, C,  # noqa: E731,B023
                                               mods.stride(0), EPS=k.NORM_EPS, **meta)  # noqa: B023
                try:
                    fn()
                    ms = do_bench(fn, warmup=10, rep=100)
                    rows_res.append({"layout": f"persistent {per_sm}/SM, {stages} stages", "lanes": ba + bb,
                                     "num_warps": w, "ms": ms, "gb_s": nbytes_res / ms / 1e6, "project": False})
                except Exception as err:  # noqa: BLE001
                    rows_res.append({"layout": f"persistent {per_sm}/SM, {stages} stages", "num_warps": w,
                                     "error": f"{type(err).__name__}: {str(err)[:200]}", "ms": 0, "gb_s": 0,
                                     "lanes": 0, "project": False})
                ba, bb = k.row_blocks(h.shape[1])
                meta = dict(BLOCK_A=ba, BLOCK_B=bb, STAGES=stages, num_warps=2 * w)
                fn = lambda: gelu_rows[grid](h, qh, s, M, h.shape[1], **meta)  # noqa: E731,B023
                try:
                    fn()
                    ms = do_bench(fn, warmup=10, rep=100)
                    rows_gelu.append({"layout": f"persistent {per_sm}/SM, {stages} stages", "lanes": ba + bb,
                                      "num_warps": 2 * w, "ms": ms, "gb_s": nbytes_gelu / ms / 1e6, "project": False})
                except Exception as err:  # noqa: BLE001
                    rows_gelu.append({"layout": f"persistent {per_sm}/SM, {stages} stages", "num_warps": 2 * w,
                                      "error": f"{type(err).__name__}: {str(err)[:200]}", "ms": 0, "gb_s": 0,
                                      "lanes": 0, "project": False})
    out["residual_ln_modulate_quant_persistent"] = rows_res
    out["gelu_quant_fc2_input_persistent"] = rows_gelu


def attention_quantize(res: dict, B: int, lc: int, lx: int, C: int, dev, g, do_bench) -> None:
    """The FP8 attention's two quantisation passes (fast/attention_triton.py) over BLOCK_L x num_warps:
    the amax pass (reads v) and the quantise pass (reads q, k, v; RMS-norm, Hadamard, e4m3; writes q8, k8,
    v8 transposed), each timed alone on the qkv outputs of one Large joint block; then both without the
    qk RMS-norm (SD3 2B's layout: the amax pass reads and rotates q and k as well)."""
    from sd35fp8.fast import attention_triton as at

    H, D = C // 64, 64
    qkv_c = torch.randn(B, lc, 3 * C, device=dev, generator=g).to(torch.bfloat16)
    qkv_x = torch.randn(B, lx, 3 * C, device=dev, generator=g).to(torch.bfloat16)
    w = [(1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(torch.bfloat16) for _ in range(4)]
    ctx, x, norms = at._joint_split(qkv_c, qkv_x, lc, H, *w)
    scale = at.amax_to_scale(at._amax(ctx, x, norms, True, qk_bound=True)).view(3, B, H)[:, 0]  # [3, H]
    L, lp = lc + lx, -(-(lc + lx) // at.PAD) * at.PAD
    qkv = 3 * B * L * C * 2 + 3 * B * lp * C
    n_bytes = {"amax": B * L * C * 2, "quantize": qkv, "amax_no_norm": 3 * B * L * C * 2, "quantize_no_norm": qkv}
    runs = {"amax": (lambda: at._amax(ctx, x, norms, True, qk_bound=True)),  # SD3.5: q, k by their norm bound
            "quantize": (lambda: at._quantize(ctx, x, norms, True, scale=scale)),
            # SD3 (no qk-norm): the amax pass reads and rotates q and k too
            "amax_no_norm": (lambda: at._amax(ctx, x, None, True)),
            "quantize_no_norm": (lambda: at._quantize(ctx, x, None, True, scale=scale))}
    for name, launch in (("amax", "AMAX_LAUNCH"), ("quantize", "QUANT_LAUNCH"), ("amax_no_norm", "AMAX_LAUNCH"),
                         ("quantize_no_norm", "QUANT_LAUNCH")):
        project = dict(getattr(at, launch))
        rows = []
        for bl in (32, 64, 128):
            for nw in (1, 2, 4, 8):
                setattr(at, launch, {"BLOCK_L": bl, "num_warps": nw})
                try:
                    runs[name]()
                    ms = do_bench(runs[name], warmup=10, rep=100)
                except Exception as e:  # a config Triton cannot build: listed, not fatal
                    print(f"  BLOCK_L {bl}, warps {nw}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                rows.append({"BLOCK_L": bl, "num_warps": nw, "ms": ms, "gb_s": n_bytes[name] / ms / 1e6,
                             "project": project == {"BLOCK_L": bl, "num_warps": nw}})
        setattr(at, launch, project)
        res["kernels"][f"attention_{name}"] = rows
        print(f"attention_{name}")
        for r in rows:
            print(f"  BLOCK_L {r['BLOCK_L']:3d}, warps {r['num_warps']}: {r['ms'] * 1000:7.1f} us  {r['gb_s']:7.0f} GB/s"
                  f"{'  <- project' if r['project'] else ''}")


if __name__ == "__main__":
    sys.exit(main())
