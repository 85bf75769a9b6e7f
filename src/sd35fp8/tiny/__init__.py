"""The small SD3.5-layout model that ships with the package, its procedural world and detector."""

from __future__ import annotations

from pathlib import Path

from sd35fp8.fp8.device import MODES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_CHECKPOINT = WEIGHTS_DIR / "sd35fp8_tiny.safetensors"  # ComfyUI all-in-one (MMDiT+VAE+3 encoders)
SHIPPED_FP8_MMDIT = WEIGHTS_DIR / "sd35fp8_tiny_mmdit_fp8_scaled.safetensors"  # ComfyUI scaled fp8 MMDiT
SHIPPED_T5_TOKENIZER = WEIGHTS_DIR / "spiece.model"
# SD3.5-layout (Stability) ControlNet for the shipped model: Canny edges -> image (tiny/train_controlnet.py)
SHIPPED_CONTROLNET = WEIGHTS_DIR / "sd35fp8_tiny_controlnet_canny.safetensors"

BASELINE = "bf16"  # `sd35fp8 eval`: label of the high-precision run (float32 on CPU; the JSON records the dtype)
FP8_MODES = MODES  # the one vocabulary (fp8/device.py)
ALL_MODES = (BASELINE,) + FP8_MODES
