"""Model merging as ComfyUI computes it (comfy_extras/nodes_model_merging.py: ModelMergeSimple / Blocks / Add /
Subtract and the model-specific block nodes).

ComfyUI patches model1 with model2's weights, key by key (ModelPatcher.add_patches(patch, strength_patch,
strength_model), then comfy.lora.calculate_weight's "diff" patch), in float32:

    w = w1 * strength_model + strength_patch * w2          (w1 * strength_model only where strength_model != 1)

then casts back to the stored dtype. A key only model1 has, or one whose shape differs in model2, keeps model1's
weight (ComfyUI logs "shape mismatch, weight not merged").

Here both models are loaded MMDiTs (inside their engines), read as TensorSources: `ModuleSource` gives a model's
weights by their original keys, an FP8 layer dequantised to float32; `MergedSource` computes each merged tensor when
the loader asks for it. The merged model then loads through the ordinary loader (checkpoints/load.load_mmdit):
tensor by tensor, quantised to model1's FP8 mode as it streams in, so no second full-precision copy is ever held.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import torch
from torch import nn

from sd35fp8.checkpoints.sources import TensorSource
from sd35fp8.errors import InputError
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.lora.apply import merged_weight

log = logging.getLogger(__name__)

# (key) -> (strength_patch, strength_model) for model2's tensor at that key
Strengths = Callable[[str], tuple[float, float]]


def base_mmdit(mmdit: nn.Module) -> nn.Module:
    """The MMDiT inside an engine (fast.MMDiTEngine, a parallel wrapper): the module holding joint_blocks."""
    seen = 0
    while not hasattr(mmdit, "joint_blocks"):
        inner = getattr(mmdit, "model", None)
        if inner is None or seen > 4:
            raise InputError(f"model merging: {type(mmdit).__name__} holds no MMDiT")
        mmdit, seen = inner, seen + 1
    return mmdit


class ModuleSource(TensorSource):
    """A loaded model's weights by original key (what its file held); FP8 linears dequantised to float32, their
    scale buffers left out, so the loader sees a plain 16/32-bit model. `lora`: layer name -> (term, strength)
    pairs baked into that layer's weight (float32, lora/apply.merged_weight), as ComfyUI patches a model's LoRAs
    into its weights before merging or saving it."""

    def __init__(self, model: nn.Module, name: str, component: str = "mmdit",
                 lora: Mapping[str, list] | None = None):
        self.model = model
        self.name = f"{component} ({name})"
        self.component, self.layout, self.files = component, "loaded model", ()
        self._fp8: dict[str, FP8Linear] = {}  # weight key -> its FP8 layer
        self._stored: dict[str, torch.dtype] = {}  # the dtype a save writes where it is not the tensor's
        dropped: set[str] = set()
        for mod_name, mod in model.named_modules():
            if isinstance(mod, FP8Linear):
                prefix = f"{mod_name}." if mod_name else ""
                self._fp8[f"{prefix}weight"] = mod
                self._stored[f"{prefix}weight"] = torch.bfloat16
                dropped |= {f"{prefix}weight_scale", f"{prefix}input_scale"}
        self._tensors = {k: v for k, v in model.state_dict().items() if k not in dropped}
        self._lora = {f"{mod}.weight": (mod, terms) for mod, terms in (lora or {}).items() if terms}
        for key in self._lora:
            if key not in self._tensors:
                raise InputError(f"baking a LoRA: {self.name} has no weight {key}")
            self._stored.setdefault(key, self._tensors[key].dtype)

    def stored_dtype(self, key: str) -> torch.dtype:
        """What a save writes: an FP8 weight as bfloat16, a LoRA-baked one in its layer's dtype, else as held."""
        return self._stored.get(key) or self._tensor(key).dtype

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            raise InputError(f"model merging: no {key} in {self.name}")
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def baked(self) -> list[str]:
        """The weights a LoRA is baked into."""
        return list(self._lora)

    def computed(self, key: str) -> bool:
        """Whether get() computes this weight in float32 (an FP8 layer dequantised, or a LoRA baked in)."""
        return key in self._fp8 or key in self._lora

    def dtype(self, key: str) -> torch.dtype:
        return torch.float32 if self.computed(key) else self._tensor(key).dtype

    def nbytes(self, key: str) -> int:
        t = self._tensor(key)
        return t.numel() * (4 if self.computed(key) else t.element_size())

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        t = self._tensor(key)
        if key in self._lora:
            mod, terms = self._lora[key]
            return merged_weight(self.model.get_submodule(mod), terms).reshape(t.shape).to(device)
        if key in self._fp8:
            return self._fp8[key].dequantized_weight(torch.float32).to(device)
        return t.to(device, copy=True)


class MergedSource(TensorSource):
    """model1's keys, each tensor merged with model2's when the loader reads it (module doc)."""

    def __init__(self, base: TensorSource, other: TensorSource, strengths: Strengths, name: str):
        self.base, self.other, self.strengths = base, other, strengths
        self.name = f"{base.component} ({name})"
        self.component, self.layout, self.files = base.component, "merged models", ()
        self.mismatched = [k for k in base.keys() if k in other and other.shape(k) != base.shape(k)]
        self.merged = [k for k in base.keys() if k in other and other.shape(k) == base.shape(k)]
        for k in self.mismatched:
            log.warning("model merging: %s has shape %s in model1, %s in model2: weight not merged", k,
                        base.shape(k), other.shape(k))
        if not self.merged:
            log.warning("model merging: the two models share no weight of the same shape; model1 is unchanged")

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, key: str) -> bool:
        return key in self.base

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.base.dtype(key)

    def nbytes(self, key: str) -> int:
        return self.base.nbytes(key)

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        w = self.base.get(key, device)
        if key not in self.other or self.other.shape(key) != tuple(w.shape):
            return w
        strength_patch, strength_model = self.strengths(key)
        out = w.float()
        if strength_model != 1.0:
            out = out * strength_model
        out = out + strength_patch * self.other.get(key, device).float()
        return out.to(w.dtype)


def merged_source(model1: nn.Module, model2: nn.Module, strengths: Strengths, name1: str, name2: str,
                  lora1: Mapping[str, list] | None = None, lora2: Mapping[str, list] | None = None) -> MergedSource:
    """Two MMDiTs (or their engines), each with its LoRAs baked in -> the merged model's TensorSource."""
    a, b = base_mmdit(model1), base_mmdit(model2)
    return MergedSource(ModuleSource(a, name1, lora=lora1), ModuleSource(b, name2, lora=lora2), strengths,
                        f"{name1} + {name2}")


def ratio_strengths(ratio: float) -> Strengths:
    """ModelMergeSimple: add_patches(model2, 1 - ratio, ratio): w1 * ratio + w2 * (1 - ratio)."""
    return lambda key: (1.0 - ratio, ratio)


def block_strengths(ratios: dict[str, float]) -> Strengths:
    """ModelMergeBlocks and the model-specific nodes: each key takes the ratio of the longest argument name it starts
    with (the first argument's when none matches), then as ModelMergeSimple."""
    if not ratios:
        raise InputError("model merging: no block ratios given")
    default = next(iter(ratios.values()))

    def strengths(key: str) -> tuple[float, float]:
        ratio, size = default, 0
        for prefix, r in ratios.items():
            if key.startswith(prefix) and size < len(prefix):
                ratio, size = r, len(prefix)
        return 1.0 - ratio, ratio

    return strengths


def assign(root: nn.Module, key: str, value: torch.Tensor) -> None:
    """Write one tensor of `root`'s state dict in place: an FP8 layer's weight quantised again at its own
    granularity (FP8Linear.requantize_), anything else cast to the tensor's dtype."""
    mod_name, _, leaf = key.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if isinstance(mod, FP8Linear) and leaf == "weight":
        mod.requantize_(value)
        return
    t = getattr(mod, leaf)
    with torch.no_grad():
        t.data.copy_(value.to(device=t.device, dtype=t.dtype))
