"""FP8Linear: a Linear layer with float8_e4m3fn weights and three ways to multiply.

State (what `state_dict` holds; survives `load_state_dict(assign=True)` and `.to(device)`):
    weight        float8_e4m3fn [N, K]  Parameter(requires_grad=False)
    weight_scale  float32 [N, 1] (per output channel) or [] (per tensor, ComfyUI scale_weight)
    bias          optional [N] Parameter(requires_grad=False), bf16 or fp32
    input_scale   optional float32 [] static activation scale (ComfyUI scale_input); buffer
Real weight W = weight * weight_scale (see fp8/scaling.py for the convention).

Modes (runtime attribute, not saved):
    "weight_only"  W dequantised to x.dtype, F.linear (fp8 storage, bf16 math). Any device.
    "dynamic"      per-token activation scale [M,1] computed each call + rowwise `_scaled_mm` (or, without
                   a rowwise kernel, the scales applied after a scale-1 fp8 GEMM; see below).
    "static"       activation quantised with the calibrated scalar `input_scale` + `_scaled_mm`.
Kernel scaling in dynamic/static, by (activation scale, weight scale):
    scalar x scalar              tensorwise `_scaled_mm` (a CPU without rowwise kernel: the last road)
    any other + rowwise kernel   rowwise `_scaled_mm`, scalars broadcast to [M,1] / [1,N]
    no rowwise kernel            the per-token / per-channel scales are applied after a scale-1 fp8
                                 GEMM (fp8.device.fp8_gemm_fp32; on the CPU an fp32 matmul of the upcast
                                 fp8 operands, not torch's slow CPU tensorwise kernel), as the engine's
                                 fast/step.py does: per-token activation scales on every torch, so a row's
                                 result does not depend on the other rows of its batch
The FP8 matmul always outputs bf16 with a bf16 bias added in the kernel, then casts to `out_dtype`
(default: x.dtype, so fp32 inputs work: activations are quantised from fp32 directly). Measured on
H100 (torch 2.11+cu130): bias must be bf16/fp16 matching out_dtype, and no bias is allowed with an
fp32 output; scales must be contiguous (a stride-0 expand is refused); M needs no alignment.

A layer with K or N not a multiple of 16 (a CUDA `_scaled_mm` requirement) runs weight_only in
dynamic/static mode; `fallback_reason` says so, `extra_repr` shows it and a warning is logged.
A dynamic/static layer on a device without FP8 matmul raises DeviceError (choose the mode with
fp8.device.choose_mode first); it never quietly runs bf16.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from sd35fp8.errors import DeviceError, InputError
from sd35fp8.fp8.dequant import dequantize
from sd35fp8.fp8.device import MODES, fp8_gemm_fp32, fp8_support
from sd35fp8.fp8.scaling import FP8_DTYPE, amax_to_scale, quantize_rowwise, quantize_tensorwise, to_fp8_saturated

logger = logging.getLogger(__name__)

GRANULARITIES = ("channel", "tensor")
MM_OUT_DTYPE = torch.bfloat16
_ALIGN = 16


class FP8Linear(nn.Module):
    """y = x @ (weight * weight_scale).T + bias with fp8 weights. See the module docstring."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        mode: str = "weight_only",
        input_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.ndim != 2:
            raise InputError(
                f"FP8Linear: weight must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}"
            )
        n, k = weight.shape
        if weight_scale.numel() != 1 and tuple(weight_scale.shape) != (n, 1):
            raise InputError(f"FP8Linear: weight_scale must be [] or [{n}, 1], got {tuple(weight_scale.shape)}")
        if bias is not None and tuple(bias.shape) != (n,):
            raise InputError(f"FP8Linear: bias must be [{n}], got {tuple(bias.shape)}")
        self.in_features = k
        self.out_features = n
        self.out_dtype = out_dtype
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)  # [N, K] fp8
        scale = weight_scale.to(torch.float32)
        self.register_buffer("weight_scale", scale.reshape(()) if scale.ndim == 0 else scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [N]
        self.register_buffer("input_scale", None if input_scale is None else input_scale.to(torch.float32).reshape(()))
        self.mode = "weight_only"
        self.fallback_reason: str | None = None
        self.set_mode(mode)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "weight_only", granularity: str = "channel") -> FP8Linear:
        """Quantise a high-precision nn.Linear: per output channel ([N,1]) or per tensor ([])."""
        if granularity not in GRANULARITIES:
            raise InputError(f"FP8Linear.from_linear: granularity {granularity!r} not in {GRANULARITIES}")
        with torch.no_grad():
            w = linear.weight.detach()  # [N, K]
            if granularity == "channel":
                q, scale = quantize_rowwise(w, dim=-1)  # [N, K], [N, 1]
            else:
                q, scale = quantize_tensorwise(w)  # [N, K], []
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias, mode=mode)

    @classmethod
    def from_fp8(
        cls,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor | float,
        bias: torch.Tensor | None = None,
        mode: str = "weight_only",
        input_scale: torch.Tensor | float | None = None,
    ) -> FP8Linear:
        """Wrap already-quantised weights (e.g. a ComfyUI scaled-fp8 file; plain fp8 => scale 1.0)."""
        dev = weight_fp8.device
        ws = torch.as_tensor(weight_scale, dtype=torch.float32, device=dev)
        xs = None if input_scale is None else torch.as_tensor(input_scale, dtype=torch.float32, device=dev)
        return cls(weight_fp8, ws, bias, mode=mode, input_scale=xs)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "weight_only",
        device: torch.device | str = "meta",
        granularity: str = "channel",
        bias_dtype: torch.dtype = torch.bfloat16,
        static_input_scale: bool = False,
    ) -> FP8Linear:
        """Uninitialised layer (meta by default) to be filled by load_state_dict(assign=True).

        `static_input_scale=True` (or mode="static") reserves the `input_scale` slot.
        """
        if granularity not in GRANULARITIES:
            raise InputError(f"FP8Linear.empty: granularity {granularity!r} not in {GRANULARITIES}")
        w = torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device)
        shape = (out_features, 1) if granularity == "channel" else ()
        ws = torch.ones(shape, dtype=torch.float32, device=device)
        b = torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None
        xs = torch.ones((), dtype=torch.float32, device=device) if (static_input_scale or mode == "static") else None
        return cls(w, ws, b, mode=mode, input_scale=xs)

    # ----------------------------------------------------------------- mode handling
    @property
    def granularity(self) -> str:
        return "tensor" if self.weight_scale.numel() == 1 and self.weight_scale.ndim == 0 else "channel"

    def set_mode(self, mode: str) -> None:
        """Switch mode; records (and logs) a weight_only fallback for shapes _scaled_mm cannot take."""
        if mode not in MODES:
            raise InputError(f"FP8Linear: mode {mode!r} not in {MODES}")
        self.mode = mode
        self.fallback_reason = None
        if mode != "weight_only" and (self.in_features % _ALIGN or self.out_features % _ALIGN):
            self.fallback_reason = (
                f"K={self.in_features} or N={self.out_features} not a multiple of {_ALIGN}: "
                "runs weight_only (fp8 storage, bf16 math)"
            )
            logger.warning("FP8Linear %dx%d: %s", self.out_features, self.in_features, self.fallback_reason)

    def requantize_(self, weight: torch.Tensor) -> None:
        """Store a new high-precision weight [N, K]: quantised again at this layer's granularity, with fresh scales
        (a LoRA fused in, merged models)."""
        with torch.no_grad():
            w = weight.float().to(self.weight.device)
            q, scale = quantize_rowwise(w, dim=-1) if self.granularity == "channel" else quantize_tensorwise(w)
            self.weight.data.copy_(q)
            self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))

    def set_input_scale(self, amax: torch.Tensor | float, margin: float = 1.0) -> None:
        """Static calibration: input_scale = amax * margin / 448 (fp32 scalar)."""
        a = torch.as_tensor(amax, dtype=torch.float32, device=self.weight.device) * margin
        self.input_scale = amax_to_scale(a).reshape(())

    @property
    def effective_mode(self) -> str:
        return "weight_only" if self.fallback_reason else self.mode

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"mode={self.mode}",
            f"granularity={self.granularity}",
        ]
        if self.input_scale is not None and self.input_scale.device.type != "meta":
            parts.append(f"input_scale={float(self.input_scale):.4g}")
        if self.fallback_reason:
            parts.append(f"fallback={self.fallback_reason!r}")
        return ", ".join(parts)

    # ----------------------------------------------------------------- storage dtypes
    def _apply(self, fn, recurse: bool = True):
        """Keep fp8 weight and fp32 scales through `module.to(dtype)` / `.half()` (devices still move).

        Without this, `model.to(torch.bfloat16)` would turn the fp8 weight into bf16 and round the
        scales to bf16. Only `bias` follows the requested dtype.
        """
        # detach(): a new tensor object on the same storage, untouched by `param.data = ...`.
        stored = {"weight": self.weight, "weight_scale": self.weight_scale, "input_scale": self.input_scale}
        keep = {name: (None if t is None else t.detach()) for name, t in stored.items()}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if old is None or new is None or new.dtype == old.dtype:
                continue
            restored = old.to(device=new.device)
            if isinstance(new, nn.Parameter):
                new.data = restored
            else:
                self._buffers[name] = restored
        return self

    # ----------------------------------------------------------------- forward
    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W = weight * weight_scale in `dtype` ([N, K]); written so torch.compile fuses it into one op."""
        return dequantize(self.weight, self.weight_scale, dtype)  # one Triton pass eager on CUDA, else torch ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InputError(f"FP8Linear: input last dim {x.shape[-1]} != in_features {self.in_features}")
        out_dtype = self.out_dtype or x.dtype
        if self.effective_mode == "weight_only":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight(x.dtype), bias).to(out_dtype)

        support = fp8_support(x.device)
        if not support.tensorwise:
            raise DeviceError(
                f"FP8Linear mode {self.mode!r} needs FP8 matmul, which {support.describe()} lacks; "
                "pick the mode with sd35fp8.fp8.device.choose_mode"
            )
        lead = x.shape[:-1]
        # [M, K] row-major, as _scaled_mm needs: a [1, L, K] view of a channel-first buffer (a PatchEmbed
        # output's layout) reshapes to a column-major [L, K] view without copying
        x2 = x.reshape(-1, self.in_features).contiguous()
        if self.mode == "dynamic":
            xq, xs = quantize_rowwise(x2, dim=-1)  # [M, K] fp8, [M, 1]
        else:  # static
            if self.input_scale is None:
                raise InputError(
                    "FP8Linear in static mode has no input_scale: calibrate with "
                    "fp8.quantize.collect_activation_amax + apply_static_scales"
                )
            xs = self.input_scale  # []
            xq = to_fp8_saturated(x2, xs)  # [M, K] fp8
        y = scaled_matmul(xq, xs, self.weight, self.weight_scale, self.bias, support.rowwise)  # [M, N]
        return y.to(out_dtype).reshape(*lead, self.out_features)


def scaled_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    rowwise_ok: bool,
) -> torch.Tensor:
    """(xq * x_scale) @ (wq * w_scale).T + bias -> bf16 [M, N] via torch._scaled_mm.

    xq [M, K] fp8 row-major; x_scale [] or [M, 1]; wq [N, K] fp8 row-major (passed as the
    column-major [K, N] view wq.t()); w_scale [] or [N, 1].
    """
    m, n = xq.shape[0], wq.shape[0]
    b = None if bias is None else bias.to(MM_OUT_DTYPE)
    x_tensorwise = x_scale.ndim == 0
    w_tensorwise = w_scale.ndim == 0
    # CPU without a rowwise kernel (torch <= 2.12): the tensorwise road below, whose GEMM is not torch's slow
    # CPU tensorwise kernel (fp8.device.fp8_gemm_fp32)
    cpu_tensorwise_only = xq.device.type == "cpu" and not rowwise_ok
    if x_tensorwise and w_tensorwise and not cpu_tensorwise_only:
        return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, bias=b, out_dtype=MM_OUT_DTYPE)
    if rowwise_ok:
        sa = x_scale.reshape(1, 1).expand(m, 1).contiguous() if x_tensorwise else x_scale  # [M, 1]
        sb = w_scale.reshape(1, 1).expand(1, n).contiguous() if w_tensorwise else w_scale.reshape(1, n)  # [1, N]
        return torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=MM_OUT_DTYPE)
    # Scale-1 fp8 GEMM, the scales applied afterwards (exact: they factor out of the K sum).
    y = fp8_gemm_fp32(xq, wq) * x_scale  # [M, N]; x_scale [] or [M, 1]
    y = y * w_scale.reshape(1, -1)  # [1, N] or [1, 1]
    if b is not None:
        y = y + b.to(torch.float32)
    return y.to(MM_OUT_DTYPE)
