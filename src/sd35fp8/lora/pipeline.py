"""diffusers' LoRA methods on SD35Pipeline (mixed in by pipeline.py), over one `LoraSet`.

    pipe.load_lora_weights("hands.safetensors", adapter_name="hands")   # active with weight 1.0
    pipe.set_adapters(["hands", "style"], adapter_weights=[0.8, 0.5])   # per request, no reload
    pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights(); pipe.get_active_adapters()

Differences from diffusers, on purpose: loading adds the new adapter to the active set (stacked
with the ones already active) instead of needing set_adapters; the file layout is inferred
(diffusers, kohya, Stability, ComfyUI, DoRA), not only diffusers'. peft is not used at run time:
its LoraLayer wraps nn.Linear (not our FP8Linear, nor the fused engine's weight dicts) and
switching adapters per request means re-wrapping; here a switch is a list update per layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

from sd35fp8.errors import InputError

from .adapters import LoraSet
from .files import parse_lora

log = logging.getLogger(__name__)


class LoraPipelineMixin:
    """Needs `self.mmdit` and `self.text_encoder` (SD3TextEncoder: clip_l, clip_g, t5)."""

    _loras: LoraSet | None = None
    _lora_disabled: dict[str, float] | None = None  # disable_lora(): the active set that enable_lora() restores

    @property
    def loras(self) -> LoraSet:
        if self._loras is None:
            te = self.text_encoder
            self._loras = LoraSet({"mmdit": self.mmdit, "clip_l": getattr(te, "clip_l", None),
                                   "clip_g": getattr(te, "clip_g", None), "t5xxl": getattr(te, "t5", None)})
        return self._loras

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, torch.Tensor],
                          adapter_name: str | None = None, weight: float = 1.0, **kwargs) -> str:
        """Load a LoRA file (or a state dict) as adapter `adapter_name` (default: the file's stem)."""
        if kwargs.get("weight_name"):
            pretrained_model_name_or_path_or_dict = Path(pretrained_model_name_or_path_or_dict) / kwargs["weight_name"]
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, Mapping):
            depth = getattr(getattr(self.loras.components.get("mmdit"), "config", None), "depth", None)
            source = parse_lora(dict(source), "<state dict>", depth, adapter_name or "default")
        return self.loras.load(source, adapter_name, strength=weight)

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None
                     ) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise InputError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights")
        self.loras.set_active(dict(zip(names, weights)))
        self._lora_disabled = None  # an explicit choice of adapters turns them on, as peft's set_adapter does

    def disable_lora(self) -> None:
        """diffusers' disable_lora: the unfused adapters stop acting (loaded and weighted as they were, for
        enable_lora); adapters merged by fuse_lora stay merged (unfuse_lora takes them out)."""
        if self._loras is None or self._lora_disabled is not None:
            return
        self._lora_disabled = dict(self._loras.active)
        self._loras.set_active({})
        if self._loras.fused:
            log.info("disable_lora: the fused adapters %s stay merged (unfuse_lora removes them)",
                     ", ".join(self._loras.fused))

    def enable_lora(self) -> None:
        """diffusers' enable_lora: the adapters disable_lora turned off act again, with their weights."""
        if self._lora_disabled is None:
            return
        active, self._lora_disabled = self._lora_disabled, None
        self.loras.set_active({n: w for n, w in active.items() if n in self.loras.adapters})

    def get_active_adapters(self) -> list[str]:
        return [n for n, s in {**self.loras.fused, **self.loras.active}.items()]

    def get_list_adapters(self) -> dict[str, list[str]]:
        comps = {c for lora in self.loras.adapters.values() for c in lora.components()}
        return {c: [n for n, lora in self.loras.adapters.items() if c in lora.components()] for c in sorted(comps)}

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None, **kwargs) -> None:
        """Merge the active adapters (or `adapter_names`) into the weights (FP8: requantised)."""
        self.loras.fuse(None if adapter_names is None else list(adapter_names), lora_scale)
        self._refresh_engine()

    def unfuse_lora(self, **kwargs) -> None:
        self.loras.unfuse()
        self._refresh_engine()

    def _refresh_engine(self) -> None:
        """A fused engine keeps copies of some weights (concatenated adaLN, per-tensor scales as rows):
        it re-reads them after a merge rewrote the layers."""
        refresh = getattr(self.mmdit, "refresh_weights", None)
        if refresh is not None:
            refresh()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self.loras.unload(name)

    def unload_lora_weights(self) -> None:
        if self._loras is not None:
            self._loras.unload()

    def lora_key(self) -> tuple[tuple[str, float], ...]:
        """The active LoRA set as a hashable key (prompts with equal keys may share a batch)."""
        return () if self._loras is None else self._loras.key()
