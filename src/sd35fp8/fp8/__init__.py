"""FP8 (E4M3) math: scaling functions, FP8Linear, the model quantisation pass, device checks."""

from __future__ import annotations

from sd35fp8.fp8.device import FP8Support, choose_mode, fp8_compute_capability, fp8_support
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.fp8.quantize import (
    Policy,
    QuantReport,
    apply_static_scales,
    collect_activation_amax,
    model_weight_bytes,
    quantize_model,
)
from sd35fp8.fp8.scaling import (
    E4M3_MAX,
    amax_to_scale,
    dequantize,
    quantize_rowwise,
    quantize_tensorwise,
    sqnr,
    to_fp8_saturated,
)

__all__ = [
    "E4M3_MAX",
    "FP8Linear",
    "FP8Support",
    "Policy",
    "QuantReport",
    "amax_to_scale",
    "apply_static_scales",
    "choose_mode",
    "collect_activation_amax",
    "dequantize",
    "fp8_compute_capability",
    "fp8_support",
    "model_weight_bytes",
    "quantize_model",
    "quantize_rowwise",
    "quantize_tensorwise",
    "sqnr",
    "to_fp8_saturated",
]
