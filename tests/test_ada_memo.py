"""fast/ada_memo.py: the fused adaLN's memo. Its lookup in torch on the CPU; the gemv kernel and the engine
with the memo under Triton's interpreter (CI) and on CUDA (GPU-only test)."""

from __future__ import annotations

import pytest
import torch

from sd35fp8.errors import InputError
from sd35fp8.fast import ada_memo
from sd35fp8.fast.ada_memo import AdaMemo

CUDA = torch.cuda.is_available()


def _rows(*vals: float, k: int = 5) -> torch.Tensor:
    return torch.stack([torch.full((k,), v, dtype=torch.bfloat16) for v in vals])


def test_lookup_hits_known_rows_and_fills_fresh_slots_round_robin():
    memo = AdaMemo(8, 5, 3, torch.bfloat16, torch.bfloat16, torch.device("cpu"))
    seen = []
    for rows in ((1, 2), (1, 2), (3, 4), (1, 5), (1, 2), (3, 4), (6, 7), (8, 9), (1, 2)):
        idx, flag = memo.lookup(_rows(*rows))
        seen.append((idx.tolist(), int(flag)))
    assert seen == [
        ([0, 1], 1),  # new: two fresh slots
        ([0, 1], 0),  # known: their slots, nothing to compute
        ([2, 3], 1),
        ([4, 5], 1),  # one row known, one new: the call computes both into fresh slots
        ([0, 1], 0),  # 1.0 sits in slots 0 and 4: the first match
        ([2, 3], 0),
        ([6, 7], 1),
        ([0, 1], 1),  # the cursor wrapped: slots 0 and 1 now hold 8.0 and 9.0
        ([2, 3], 1),  # 1.0 is still in slot 4, but 2.0 went with slot 1: computed again
    ]
    assert memo.stats() == {"calls": 9, "computed": 6}
    memo.clear()
    assert int(memo.lookup(_rows(8, 9))[1]) == 1


def test_lookup_is_bitwise_and_clear_forgets():
    memo = AdaMemo(8, 5, 3, torch.float32, torch.float32, torch.device("cpu"))
    a = torch.randn(2, 5)
    memo.lookup(a)
    b = a.clone()
    b[1, 3] = torch.nextafter(b[1, 3], torch.tensor(float("inf")))
    assert int(memo.lookup(a.clone())[1]) == 0
    assert int(memo.lookup(b)[1]) == 1  # one ulp apart: another row


def test_memo_slots_env(monkeypatch):
    monkeypatch.delenv(ada_memo.MEMO_ENV, raising=False)
    assert ada_memo.memo_slots() == ada_memo.DEFAULT_SLOTS == 0  # opt-in until measured on a GPU
    monkeypatch.setenv(ada_memo.MEMO_ENV, "64")
    assert ada_memo.memo_slots() == 64
    monkeypatch.setenv(ada_memo.MEMO_ENV, "0")
    assert ada_memo.memo_slots() == 0
    for bad in ("-1", "x", "3"):
        monkeypatch.setenv(ada_memo.MEMO_ENV, bad)
        with pytest.raises(InputError, match="SD35FP8_ADA_MEMO"):
            ada_memo.memo_slots()


def test_no_memo_without_a_kernel_road(monkeypatch):
    """On the CPU (no interpreter checks) the engine keeps its torch matmul: no memo is built."""
    monkeypatch.setenv(ada_memo.MEMO_ENV, "64")
    from sd35fp8.fast import MMDiTEngine
    from sd35fp8.fp8.quantize import quantize_model
    from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

    model = init_random_(MMDiT(MMDiTConfig.tiny()), torch.Generator().manual_seed(0)).eval()
    quantize_model(model, "dynamic")
    assert MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=False).ada_memo is None


CHILD = r"""
import json
import dataclasses
import torch
from sd35fp8.fast import ada_memo, kernels as k
from sd35fp8.fast import MMDiTEngine
from sd35fp8.fp8.quantize import quantize_model
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

out = {}
torch.manual_seed(0)
M, K, N = 2, 96, 200  # N not a multiple of the kernel's 64 columns
a = torch.randn(M, K, dtype=torch.bfloat16)
w = torch.randn(N, K) * 0.1
w8 = w.to(torch.float8_e4m3fn)
ws = torch.rand(1, N) + 0.5
b = torch.randn(N, dtype=torch.bfloat16)
a8, as_ = k._plain_torch(a, "dynamic", None)
as_ = as_.float().reshape(-1).contiguous()
cases = {
    "dynamic": (a8, as_, w8, ws, (a8.float() * as_[:, None]) @ (w8.float() * ws.t()).t()),
    "weight_only": (a, None, w8, ws, a.float() @ (w8.float() * ws.t()).t()),
    "none": (a, None, w.to(torch.bfloat16), None, a.float() @ w.to(torch.bfloat16).float().t()),
}
for name, (x, xs, wt, wsc, ref) in cases.items():
    y = k.gemv(x, xs, wt, wsc, b, torch.empty(M, N, dtype=torch.float32))
    out[name] = sqnr(ref + b.float(), y)
# memo form: rows go to out[idx]; flag 0 leaves out untouched
vals = torch.zeros(6, N)
idx = torch.tensor([4, 1])
k.gemv(a8, as_, w8, ws, b, vals, idx, torch.tensor([1], dtype=torch.int32))
y = k.gemv(a8, as_, w8, ws, b, torch.empty(M, N))
out["memo_rows"] = bool(torch.equal(vals[4], y[0]) and torch.equal(vals[1], y[1]))
out["memo_rest_zero"] = bool(vals[[0, 2, 3, 5]].abs().sum() == 0)
before = vals.clone()
k.gemv(torch.zeros_like(a), None, w8, ws, b, vals, idx, torch.tensor([0], dtype=torch.int32))
out["flag0_untouched"] = bool(torch.equal(vals, before))

# the engine: memo on (slots 16) and off (0) give the same bits; the memo computes only new rows
ada_memo._ALLOW_CPU = True
cfg = dataclasses.replace(MMDiTConfig.tiny(), depth=3, x_block_self_attn_layers=())
model = init_random_(MMDiT(cfg), torch.Generator().manual_seed(0)).eval().requires_grad_(False)
quantize_model(model, "dynamic")
g = torch.Generator().manual_seed(1)
x = torch.randn(2, cfg.in_channels, 16, 12, generator=g)
ctx = torch.randn(2, 21, cfg.context_dim, generator=g)
pooled = torch.randn(2, cfg.pooled_dim, generator=g)
import os
res = {}
for slots in ("16", "0"):
    os.environ["SD35FP8_ADA_MEMO"] = slots
    eng = MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=False)
    res[slots] = [eng(x, torch.tensor([s, s]), ctx, pooled) for s in (0.9, 0.5, 0.9, 0.5, 0.3)]
    if slots == "16":
        out["stats"] = eng.ada_memo.stats()
        out["memo_bytes"] = eng.ada_memo.nbytes()
    else:
        out["memo_off"] = eng.ada_memo is None
# memo off: the engine's own matmul (torch here, cuBLAS on CUDA): close, not the same bits
out["vs_matmul_road"] = min(sqnr(q, p) for p, q in zip(res["16"], res["0"]))
out["repeat_bits"] = bool(torch.equal(res["16"][0], res["16"][2]))  # a hit gives the miss's bits
os.environ["SD35FP8_ADA_MEMO"] = "8"  # a memo too small for the rows: every call computes, the same bits again
eng = MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=False)
small = [eng(x, torch.tensor([s, s]), ctx, pooled) for s in (0.9, 0.5, 0.3, 0.2, 0.1, 0.9)]
out["small_same_bits"] = bool(torch.equal(small[0], res["16"][0]) and torch.equal(small[5], res["16"][0]))
out["small_stats"] = eng.ada_memo.stats()
print(json.dumps(out))
"""


def test_gemv_kernel_and_engine_memo_in_the_interpreter():
    pytest.importorskip("triton")
    from interpreted import run_interpreted  # tests/ helper

    res = run_interpreted(CHILD)
    for name in ("dynamic", "weight_only", "none"):
        assert res[name] > 40, (name, res)
    assert res["memo_rows"] and res["memo_rest_zero"] and res["flag0_untouched"], res
    assert res["memo_off"] and res["repeat_bits"] and res["small_same_bits"], res
    assert res["stats"] == {"calls": 5, "computed": 3}, res  # 0.9, 0.5 and 0.3 computed once each
    assert res["small_stats"] == {"calls": 6, "computed": 6}, res  # 8 slots, 2 rows a call: 0.9 gone by the 6th
    assert res["vs_matmul_road"] > 30, res


@pytest.mark.skipif(not CUDA or ada_memo.kernels.triton is None, reason="needs CUDA and Triton")
def test_engine_memo_gpu_graphs(monkeypatch):
    """On CUDA with graphs: a step whose rows the memo holds gives the bits of the step that computed them, close to
    the memo-off (cuBLAS) step, and a LoRA-style weight rewrite (refresh_weights) forgets them."""
    import dataclasses

    from sd35fp8.fast import MMDiTEngine
    from sd35fp8.fp8.quantize import quantize_model
    from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

    dev = torch.device("cuda")
    cfg = dataclasses.replace(MMDiTConfig.tiny(), depth=3, x_block_self_attn_layers=())
    model = init_random_(MMDiT(cfg), torch.Generator().manual_seed(0)).eval().requires_grad_(False)
    quantize_model(model, "dynamic")
    model = model.to(dev, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g).to(dev, torch.bfloat16)
    ctx = torch.randn(2, 21, cfg.context_dim, generator=g).to(dev, torch.bfloat16)
    pooled = torch.randn(2, cfg.pooled_dim, generator=g).to(dev, torch.bfloat16)
    outs = {}
    for slots in ("16", "0"):
        monkeypatch.setenv(ada_memo.MEMO_ENV, slots)
        eng = MMDiTEngine(model, "dynamic", compile=False, cuda_graphs=True)
        outs[slots] = [eng(x, torch.full((2,), s, device=dev), ctx, pooled).clone() for s in (0.9, 0.5, 0.9, 0.5)]
        if slots == "16":
            assert eng.ada_memo.stats()["computed"] <= 3  # the graph's warm-up / capture may compute once more
            eng.refresh_weights()
            assert torch.equal(eng(x, torch.full((2,), 0.9, device=dev), ctx, pooled), outs["16"][0])
    from sd35fp8.fp8.scaling import sqnr

    assert torch.equal(outs["16"][0], outs["16"][2]) and torch.equal(outs["16"][1], outs["16"][3])  # hits = misses
    for p, q in zip(outs["16"], outs["0"]):  # memo off: cuBLAS's adaLN, the last places differ
        assert sqnr(q.float(), p.float()) > 40
