"""The Large step with and without session 31's two changes, side by side in one process (CUDA):
the fused adaLN's memo (fast/ada_memo.py) and the padded proj / fc2 rows (fast/weights.py pad_output_rows).

    python benchmarks/ada_pad_step.py [--reps 10] [--out benchmarks/results/ada_pad_step_<device>.json]

Random-weight SD3.5 Large MMDiT (fp8 dynamic, faster.py's setup), 1024², CFG batch 2, 154 context tokens, auto's
attention (FlashAttention-3 where installed): step ms (CUDA graph replay, median) without either (today's default),
with the memo (SD35FP8_ADA_MEMO=64), with the padding (SD35FP8_PAD_N=1), with both, and without either again;
each road's SQNR against the float32 forward; the adaLN
matmul alone (cuBLAS against the gemv kernel's tiles and the memo's hit: faster.py adaln_gemv_bench)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
from faster import RESULTS, _median_ms, adaln_gemv_bench, large_step_inputs, random_large_mmdit  # benchmarks/ is this script's folder
from results_io import device_slug, versions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from sd35fp8.fast import ada_memo, build_engine
    from sd35fp8.fast import weights as fast_weights
    from sd35fp8.fp8.scaling import sqnr

    dev = torch.device("cuda")
    x, sigma, ctx, pooled = large_step_inputs(dev)
    mmdit, ref32 = random_large_mmdit(dev, (x, sigma, ctx, pooled))
    torch.cuda.empty_cache()
    eng = build_engine(mmdit, dev)
    res: dict = {"device": device_slug(dev), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                 "versions": versions(), "attention": eng.attention_backend,
                 "config": {"model": "Large", "weights": "random fp8 dynamic", "size": 1024, "cfg_batch": 2,
                            "context_tokens": 154}, "step_ms": {}, "sqnr_db": {}}

    def road(name: str, use_memo: bool, pad: bool) -> None:
        os.environ[fast_weights.PAD_ENV] = "1" if pad else "0"
        os.environ[ada_memo.MEMO_ENV] = str(ada_memo.SUGGESTED_SLOTS) if use_memo else "0"
        eng.refresh_weights()  # the padding and the memo follow the variables; the graphs dropped
        eng.graphs.clear()
        out = eng(x, sigma, ctx, pooled).float().clone()  # capture
        ms = _median_ms(lambda: eng(x, sigma, ctx, pooled), args.reps)
        res["step_ms"][name], res["sqnr_db"][name] = ms, float(sqnr(ref32, out))
        print(f"step {name}: {ms:.2f} ms, SQNR {res['sqnr_db'][name]:.2f} dB", flush=True)

    for name, use_memo, pad in (("neither", False, False), ("memo", True, False), ("pad", False, True),
                                ("both", True, True), ("neither_again", False, False)):
        road(name, use_memo, pad)
    res["adaln_gemv"] = adaln_gemv_bench(eng, args.reps)
    print(f"adaln gemv: {res['adaln_gemv']}", flush=True)
    out = Path(args.out) if args.out else RESULTS / f"ada_pad_step_{res['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
