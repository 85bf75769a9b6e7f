"""Which FP8 compute a device offers, and which FP8Linear mode to use there.

FP8 *storage* works everywhere (weights are dequantised to bf16 for the matmul: "weight_only").
FP8 *matmul* (`torch._scaled_mm`) needs:
    CUDA  compute capability >= 8.9 (RTX 40xx / L4 = 8.9, H100 / H200 = 9.0);
    CPU   the torch build implements it (torch 2.13 CPU does, tensorwise and rowwise).
Whether it really runs is decided by a probe (one tiny `_scaled_mm` per device, cached),
so a build without a kernel is detected instead of failing mid-denoise.

What `_scaled_mm` supports depends on the torch version and the device (`matmul_scaling`):
    "rowwise"      scale_a [M,1] x scale_b [1,N] in the kernel (CUDA sm_89+; CPU from torch 2.13)
    "tensorwise"   scalar scales only (CPU up to torch 2.12: "only supports per-tensor scaling for
                   CPU backend"): per-token / per-channel scales are applied to the fp32 result of
                   a scale-1 fp8 GEMM (same math, one extra elementwise pass; `fp8_gemm_fp32`)
    "none"         no fp8 GEMM: weight_only (fp8 storage, bf16 math)
The choice is logged once per device (INFO), e.g.
    fp8 matmul on cpu (torch 2.11.0+cu130): tensorwise: per-token/per-channel scales applied after the fp8 GEMM
    (no rowwise _scaled_mm in this torch build for this device); the fp8 GEMM: an fp32 matmul of the upcast
    fp8 operands (fp8_gemm_fp32)

Mode selection (`choose_mode`), first match wins:
    1. `requested` argument ("weight_only" | "dynamic" | "static")
    2. environment variable SD35FP8_FP8_MODE (same values), e.g. to force weight_only on an H100
       for a measurement
    3. automatic: "dynamic" where FP8 matmul exists, else "weight_only".
A mode needing FP8 matmul on a device without it becomes "weight_only" with a logged warning
and a reason string; it never happens silently.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from sd35fp8.errors import InputError

logger = logging.getLogger(__name__)

MODES = ("weight_only", "dynamic", "static")  # THE vocabulary of FP8 modes (FP8Linear, loaders, engine, CLI)
MATMUL_MODES = ("dynamic", "static")  # the modes that multiply in fp8 (torch._scaled_mm)
MODE_ENV = "SD35FP8_FP8_MODE"
MIN_CUDA_CAPABILITY = (8, 9)

# Errors torch raises when a kernel or scaling configuration is missing.
_KERNEL_ERRORS = (RuntimeError, ValueError, NotImplementedError, TypeError)


@dataclass(frozen=True)
class FP8Support:
    """What `torch._scaled_mm` can do on one device (float8_e4m3fn inputs, bf16 output)."""

    device: str
    tensorwise: bool  # scalar scale_a / scale_b
    rowwise: bool  # scale_a [M,1], scale_b [1,N]
    detail: str  # why not, or which hardware

    def describe(self) -> str:
        return f"{self.device}: fp8 matmul tensorwise={self.tensorwise} rowwise={self.rowwise} ({self.detail})"


_SUPPORT_CACHE: dict[str, FP8Support] = {}


def _device_key(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@torch.compiler.disable
def _probe(dev: torch.device, rowwise: bool) -> tuple[bool, str]:
    """Run one 16x16x16 `_scaled_mm` on `dev`; (ok, error text). Eager even under torch.compile."""
    a = torch.ones(16, 16, device=dev).to(torch.float8_e4m3fn)  # [M, K] row-major
    b = torch.ones(16, 16, device=dev).to(torch.float8_e4m3fn).t()  # [K, N] column-major
    if rowwise:
        sa = torch.ones(16, 1, device=dev)
        sb = torch.ones(1, 16, device=dev)
    else:
        sa = torch.ones((), device=dev)
        sb = torch.ones((), device=dev)
    try:
        out = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    except _KERNEL_ERRORS as err:
        return False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if not bool((out.float() == 16.0).all()):
        return False, "_scaled_mm ran but returned wrong values"
    return True, ""


def fp8_support(device: torch.device | str) -> FP8Support:
    """Probe (once per device, cached) which `_scaled_mm` scalings run on `device`."""
    dev = _device_key(device)
    key = str(dev)
    if key in _SUPPORT_CACHE:
        return _SUPPORT_CACHE[key]
    if dev.type == "meta":
        support = FP8Support(key, False, False, "meta device has no kernels")
    elif dev.type == "cuda" and not torch.cuda.is_available():
        support = FP8Support(key, False, False, "CUDA is not available in this torch build")
    else:
        detail = "torch kernel"
        cc_ok = True
        if dev.type == "cuda":
            cc = torch.cuda.get_device_capability(dev)
            name = torch.cuda.get_device_name(dev)
            cc_ok = tuple(cc) >= MIN_CUDA_CAPABILITY
            detail = f"{name}, compute capability {cc[0]}.{cc[1]}"
            if not cc_ok:
                detail += f" < {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]}: fp8 is storage only"
        tw, tw_err = _probe(dev, rowwise=False) if cc_ok else (False, "")
        rw, rw_err = _probe(dev, rowwise=True) if tw else (False, "")
        if cc_ok and not tw:
            detail += f"; tensorwise probe failed ({tw_err})"
        elif tw and not rw:
            detail += f"; rowwise probe failed ({rw_err})"
        support = FP8Support(key, tw, rw, detail)
    _SUPPORT_CACHE[key] = support
    logger.debug("fp8 support %s", support.describe())
    text = _SCALING_TEXT[_scaling_of(support)]
    if dev.type == "cpu" and _scaling_of(support) == "tensorwise":
        text += "; the fp8 GEMM: an fp32 matmul of the upcast fp8 operands (fp8_gemm_fp32)"
    logger.info("fp8 matmul on %s (torch %s): %s", key, torch.__version__, text)
    return support


_SCALING_TEXT = {
    "rowwise": "rowwise (per-token x per-channel scales inside _scaled_mm)",
    "tensorwise": "tensorwise: per-token/per-channel scales applied after the fp8 GEMM (no rowwise _scaled_mm "
                  "in this torch build for this device)",
    "none": "none: fp8 weights are dequantised to bf16 (weight_only)",
}


def _scaling_of(support: FP8Support) -> str:
    return "rowwise" if support.rowwise else "tensorwise" if support.tensorwise else "none"


def matmul_scaling(device: torch.device | str) -> str:
    """'rowwise' | 'tensorwise' | 'none': which `_scaled_mm` scaling runs on `device` (module docstring)."""
    return _scaling_of(fp8_support(device))


def fp8_gemm_fp32(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a [M, K] fp8 @ w [N, K] fp8 .T -> fp32 [M, N], scale 1: the fp8 GEMM of the "tensorwise" road.

    CUDA: `torch._scaled_mm` with scalar scales 1. CPU: one fp32 matmul of the operands upcast to fp32.
    That is the same math (e4m3 values and their pairwise products are exact in fp32; the sums are
    fp32, as in the kernel; results equal up to the summation order) and what the CPU rowwise
    `_scaled_mm` of torch 2.13 runs as fast: torch's CPU tensorwise kernel is a slow path on x86
    without fp8 instructions. Measured on the 2-core Xeon dev box (AMX, no fp8), 200x128x384, one
    thread: tensorwise `_scaled_mm` 520 ms on torch 2.11.0 and 2.13.0 alike, the upcast matmul
    0.5-1 ms; with the kernel the shipped model's 3-step 32x32 image took minutes per image on
    torch 2.11 CPU (tests/test_scale_ray.py's references did not finish in 10 minutes).
    """
    if a.device.type == "cpu":
        return a.float() @ w.float().t()
    one = torch.ones((), device=a.device, dtype=torch.float32)
    return torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)


@torch.compiler.assume_constant_result
def rowwise_scaled_mm(device: torch.device) -> bool:
    """True when `_scaled_mm` takes rowwise scales on `device`; a constant inside torch.compile."""
    return fp8_support(device).rowwise


def fp8_compute_capability(device: torch.device | str) -> bool:
    """True when FP8 matmul (`torch._scaled_mm`, at least tensorwise) runs on `device`."""
    return fp8_support(device).tensorwise


def choose_mode(requested: str | None, device: torch.device | str) -> tuple[str, str]:
    """Pick the FP8Linear mode for `device` -> (mode, reason). See the module docstring."""
    source = "requested"
    if requested is None:
        env = os.environ.get(MODE_ENV, "").strip()
        if env:
            requested, source = env, f"${MODE_ENV}"
    if requested is not None and requested not in MODES:
        raise InputError(f"fp8 mode {requested!r} (from {source}) is not one of {MODES}")

    support = fp8_support(device)
    if requested is None:
        if support.tensorwise:
            return "dynamic", f"auto: FP8 matmul available on {support.describe()}"
        return "weight_only", f"auto: no FP8 matmul on {support.describe()}; fp8 storage, bf16 math"
    if requested == "weight_only":
        return "weight_only", f"{source}: weight_only (fp8 storage, bf16 math) on {support.device}"
    if support.tensorwise:
        return requested, f"{source}: {requested} on {support.describe()}"
    reason = (
        f"{source} fp8 mode {requested!r} needs FP8 matmul, which {support.describe()} lacks: "
        "using weight_only (fp8 storage, bf16 math)"
    )
    logger.warning(reason)
    return "weight_only", reason


def clear_support_cache() -> None:
    """Forget probe results (tests monkeypatch devices)."""
    _SUPPORT_CACHE.clear()
