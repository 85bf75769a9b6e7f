"""A ControlNet applied to a conditioning: hint, strength, step window, chaining (ComfyUI ControlBase).

    apply = ControlApply(net, image, strength=0.7, start_percent=0.0, end_percent=1.0, vae=vae)
    Conditioning(context, pooled, control=apply)        # sampling/guidance.py calls it per model call

`ControlApply(x, sigma, context, pooled, model, model_sampling)` returns the residuals for the base
model's joint blocks (MMDiT.forward's `control`), or None outside its window. In a batched CFG call
sampling/guidance.py runs one ControlApply shared by the cond and the uncond (ControlNetApplyAdvanced
makes it so) once over both rows (`chunks=2`); different ones run on their own rows and are
scattered. On an MMDiTEngine the ControlNet runs on the engine's machinery (fast/controlnet.py).
Several ControlNets chain through `previous` (ComfyUI set_previous_controlnet); their residuals add up.
The control image is resized to the latent's pixel size as ComfyUI does (common_upscale,
nearest-exact, centre crop), preprocessed per control type and VAE-encoded once per size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sd35fp8.errors import InputError
from sd35fp8.models.controlnet import ControlNet, hint_latent
from sd35fp8.models.mmdit import MMDiT
from sd35fp8.image_ops import common_upscale


def base_mmdit(model: Any) -> MMDiT:
    """The MMDiT behind a velocity model (an MMDiT, or an engine exposing `.model`)."""
    base = model if isinstance(model, MMDiT) else getattr(model, "model", None)
    if not isinstance(base, MMDiT):
        raise InputError(f"ControlNet needs an SD3 MMDiT as the base model, got {type(model).__name__}")
    return base


def add_residuals(a: list | None, b: list | None) -> list | None:
    """Per-block sum of two residual lists (None entries: nothing). A pair of tensors met again (a layer's
    output feeding two blocks in both lists) is added once and the sum shared, as the inputs were."""
    if a is None or b is None:
        return b if a is None else a
    sums: dict[tuple[int, int], torch.Tensor] = {}

    def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        key = (id(x), id(y))
        if key not in sums:
            sums[key] = x + y
        return sums[key]

    return [y if x is None else x if y is None else add(x, y) for x, y in zip(a, b)]


def broadcast_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """Hint batch -> n rows (ComfyUI broadcast_image_to: 1 expands, fewer repeat, more are cut)."""
    if t.shape[0] == n or t.shape[0] == 1:
        return t
    reps = -(-n // t.shape[0])
    return t.repeat(reps, 1, 1, 1)[:n]


@dataclass(eq=False)
class ControlApply:
    net: ControlNet
    image: torch.Tensor  # ComfyUI IMAGE [B, H, W, 3] in [0, 1]
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    vae: Any = None
    previous: ControlApply | None = None
    _hints: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.vae is None:  # every SD3 ControlNet takes a latent hint (ComfyUI's message)
            raise InputError("This Controlnet needs a VAE but none was provided, please use a ControlNetApply "
                             "node with a VAE input and connect it.")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise InputError(f"ControlNet start_percent {self.start_percent} / end_percent {self.end_percent} must "
                             "satisfy 0 <= start <= end <= 1")

    def hint(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """The hint latent [Bi, 16, h, w] for a latent of h x w cells (cached per size)."""
        key = (h, w, str(device))
        if key not in self._hints:
            img = self.image.movedim(-1, 1).float()  # [Bi, 3, H, W]
            img = common_upscale(img, w * 8, h * 8, "nearest-exact", "center")
            vae_dtype = next(self.vae.parameters()).dtype
            img = img.to(device=next(self.vae.parameters()).device, dtype=vae_dtype)
            self._hints = {key: hint_latent(img, self.vae, self.net.config).to(device)}
        return self._hints[key]

    # sampling/guidance.py may call it once over the cond and uncond rows of a batched CFG call (`chunks`)
    batches_rows = True

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 model: Any, model_sampling: Any, chunks: int = 1) -> list[torch.Tensor | None] | None:
        """x [n, 16, h, w] (model space), sigma [n] -> residuals per base joint block, or None.

        chunks: x's rows are that many equal parts (the conditionings of one batched CFG call), each
        given the hint broadcast to its own rows as ComfyUI broadcasts it per conditioning; one
        ControlNet call covers them all. On an MMDiTEngine the ControlNet runs as its engine
        (fast/controlnet.py: fused FP8 step, CUDA graphs); on a plain MMDiT as the eager net."""
        prev = self.previous(x, sigma, context, pooled, model, model_sampling, chunks) if self.previous else None
        s = float(sigma.reshape(-1)[0])
        hi, lo = model_sampling.percent_to_sigma(self.start_percent), model_sampling.percent_to_sigma(self.end_percent)
        if s > hi or s < lo:  # ComfyUI ControlNet.get_control: outside (start, end) the previous one only
            return prev
        base = base_mmdit(model)
        n = x.shape[0]
        if chunks < 1 or n % chunks:
            raise InputError(f"ControlApply: {n} rows are not {chunks} equal conditionings")
        hint = broadcast_rows(self.hint(x.shape[-2], x.shape[-1], x.device), n // chunks)
        if chunks > 1 and hint.shape[0] > 1:
            hint = torch.cat([hint] * chunks)
        from sd35fp8.fast.step import MMDiTEngine

        if isinstance(model, MMDiTEngine):
            from sd35fp8.fast.controlnet import controlnet_engine

            res = controlnet_engine(self.net, model)(x, sigma, context, pooled, hint, self.strength)
            return add_residuals(prev, res)
        dtype = self.net.dtype
        with torch.no_grad():
            res = self.net(x.to(dtype), sigma.float(), context.to(dtype), pooled.to(dtype), hint.to(dtype), base,
                           self.strength)
        return add_residuals(prev, res)
