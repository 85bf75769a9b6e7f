"""The fused adaLN matmul, with a device-side memo of its output rows (MMDiTEngine._adaln).

Every joint block's shift / scale / gate comes from one matmul per step, silu(c) [M, C] x W [N, C]
(N = 1 099 264 on Large: 2.7 GB of fp8 weights read for 2 rows, ~1.1 ms a step on an H100,
docs/PERF.md session 27). c depends only on the timestep and the pooled text embedding, and a
sampler visits the same few (sigma, prompt) pairs: the schedule's sigmas, cond and uncond. So the
output rows are kept, keyed bit for bit on their input row, and a step whose rows are all known
copies them instead of reading the weight.

Inside a CUDA graph there is no branch on the host, so the decision lives on the device:
`AdaMemo.lookup` (torch ops) compares the rows with the stored keys and yields each row's slot and a
flag "some row missed"; the gemv kernel (fast/kernels.py `gemv`) reads the flag and, when it is 0,
every program returns at once (the weight is not read). A missing row makes the call compute all of
its rows into M fresh slots (round robin), so a row's value is always the kernel's for that input:
hit or miss, the same bits (row-independent kernel, fp32 sums). With the memo off the engine keeps
its matmul (cuBLAS's _scaled_mm in the FP8 matmul modes), whose bits differ in the last places.

Opt-in for now: SD35FP8_ADA_MEMO=<slots> (at least 8; Large: 64 x 2.2 MB = 141 MB) turns it on,
unset or 0 leaves it off. It has not run on a GPU yet (the kernel compiles for sm_90 offline,
tests/test_kernels_compile_sm90.py; the engine's memo road is checked under the interpreter);
`bash benchmarks/gpu_session31_short.sh OUT` measures the step with and without it, and the default
follows from that. Weights rewritten in place (a LoRA fuse, calibration) clear it
(MMDiTEngine._build_adaln / calibrate). Used where the Triton kernel runs: CUDA tensors (and CPU
tensors under the interpreter, `_ALLOW_CPU`).
"""

from __future__ import annotations

import os

import torch

from sd35fp8.errors import InputError
from sd35fp8.fast import kernels
from sd35fp8.fast.kernels import GEMV_MAX_ROWS, gemv, plain_act

MEMO_ENV = "SD35FP8_ADA_MEMO"
DEFAULT_SLOTS = 0  # off until measured on a GPU (module docstring)
SUGGESTED_SLOTS = 64  # a 20-step CFG image is 40 rows; 64 also hold a 28-step one's 56
# Interpreter checks only (TRITON_INTERPRET=1, CPU tensors): set True to take the kernel road on CPU.
_ALLOW_CPU = False


def memo_slots() -> int:
    """Rows the memo keeps: $SD35FP8_ADA_MEMO, else DEFAULT_SLOTS; 0 = no memo (SUGGESTED_SLOTS to try it)."""
    raw = os.environ.get(MEMO_ENV, "").strip()
    if not raw:
        return DEFAULT_SLOTS
    try:
        n = int(raw)
    except ValueError:
        n = -1
    if n < 0:
        raise InputError(f"${MEMO_ENV}={raw!r}: a number of rows >= 0 (0 turns the adaLN memo off)")
    if 0 < n < GEMV_MAX_ROWS:
        raise InputError(f"${MEMO_ENV}={raw!r}: at least {GEMV_MAX_ROWS} rows (one call's), or 0")
    return n


def kernel_road(device: torch.device | str) -> bool:
    """True where the gemv kernel runs: Triton on CUDA (CPU only under the interpreter checks)."""
    dev = torch.device(device)
    return kernels.triton is not None and (dev.type == "cuda" or _ALLOW_CPU)


class AdaMemo:
    """`slots` rows of the adaLN output [slots, N] keyed by their input rows [slots, K], on `device`."""

    def __init__(self, slots: int, k: int, n: int, key_dtype: torch.dtype, out_dtype: torch.dtype,
                 device: torch.device):
        if slots < GEMV_MAX_ROWS:
            raise InputError(f"AdaMemo: {slots} slots, at least {GEMV_MAX_ROWS} (one call's rows)")
        self.slots = slots
        self.keys = torch.zeros(slots, k, dtype=key_dtype, device=device)  # [S, K] silu(c) rows
        self.vals = torch.zeros(slots, n, dtype=out_dtype, device=device)  # [S, N] their outputs
        self.valid = torch.zeros(slots, dtype=torch.bool, device=device)
        self.cursor = torch.zeros((), dtype=torch.int64, device=device)  # next slot to fill (mod S)
        self.misses = torch.zeros((), dtype=torch.int64, device=device)  # calls that computed (stats)
        self.calls = torch.zeros((), dtype=torch.int64, device=device)

    def clear(self) -> None:
        """Forget every row (the weights or scales changed)."""
        self.valid.zero_()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.vals))

    def stats(self) -> dict[str, int]:
        """{"calls", "computed"}: adaLN calls since the memo was built, and how many read the weight (syncs)."""
        return {"calls": int(self.calls), "computed": int(self.misses)}

    def lookup(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a [M, K] -> (idx [M] int64: each row's slot, flag [1] int32: 1 when the gemv must compute).

        All rows known: their slots, flag 0. Otherwise M fresh slots after the cursor (the oldest rows
        go), their keys written now; the gemv fills their values. No host sync (graph-safe)."""
        M = a.shape[0]
        eq = (self.keys.unsqueeze(0) == a.unsqueeze(1)).all(dim=2) & self.valid  # [M, S]
        miss = ~eq.any(dim=1).all()  # [] bool
        fresh = (self.cursor + torch.arange(M, device=a.device)) % self.slots
        idx = torch.where(miss, fresh, eq.to(torch.uint8).argmax(dim=1))  # argmax: the first matching slot
        self.keys.index_copy_(0, idx, a)  # on a hit: the same bits again
        self.valid.index_fill_(0, idx, True)
        step = miss.to(torch.int64)
        self.cursor.add_(step * M)
        self.misses.add_(step)
        self.calls.add_(1)
        return idx, step.to(torch.int32).reshape(1)


def build_memo(ada: dict, mode: str | None, dtype: torch.dtype) -> AdaMemo | None:
    """The memo for the fused adaLN weights `ada` ({"w": [N, K], ...}), or None (off, or no kernel road)."""
    slots = memo_slots()
    w = ada["w"]
    if not slots or not kernel_road(w.device):
        return None
    return AdaMemo(slots, w.shape[1], w.shape[0], dtype, dtype, w.device)


def adaln_gemv(a: torch.Tensor, ada: dict, mode: str | None, out_dtype: torch.dtype,
               memo: AdaMemo | None) -> torch.Tensor:
    """silu(c) rows a [M, K] -> a @ W^T (+ bias) [M, N] through the gemv kernel, the memo's rows where known.

    mode: the adaLN group's FP8 mode. dynamic / static: a quantised to e4m3 per row (plain_act, the
    engine's activation pass) times the per-channel weight scales; weight_only: 16-bit a times the fp8
    weight's codes and scales; None: 16-bit weight."""
    M = a.shape[0]
    if mode in ("dynamic", "static"):
        codes, scale = plain_act(a, mode, ada.get("xs"))
        a_scale = scale.float().reshape(-1).expand(M).contiguous()  # [M] (static: the one scale)
    else:
        codes, a_scale = a, None
    w_scale = ada.get("ws") if mode is not None else None
    if memo is None:
        out = torch.empty(M, ada["w"].shape[0], device=a.device, dtype=out_dtype)
        return gemv(codes, a_scale, ada["w"], w_scale, ada.get("b"), out)
    idx, flag = memo.lookup(a)
    gemv(codes, a_scale, ada["w"], w_scale, ada.get("b"), memo.vals, idx, flag)
    return memo.vals.index_select(0, idx)
