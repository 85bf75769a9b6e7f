"""LoraSet: named LoRA adapters over one set of loaded models, switched per request.

    loras = LoraSet({"mmdit": mmdit, "clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5}, dtype)
    loras.load("hands.safetensors", "hands")          # parsed, checked against the models' layers
    loras.set_active({"hands": 0.8, "style": 0.5})    # unmerged: slots updated, weights untouched
    loras.fuse()                                      # merge the active set into the weights
    loras.unfuse(); loras.unload("hands")

A component module may be the MMDiT itself or anything exposing it as `.model` (the engine, an
offload wrapper); text encoders are the ClipTextEncoder / T5EncoderModel modules. The set of active
(name, strength) pairs is `key()`: prompts with the same key may share a batch.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from sd35fp8.errors import CheckpointError, InputError

from .apply import activate, check_term, fuse, lora_slot, remove_slot, unfuse
from .files import LoraFile, LoraTerm, read_lora

log = logging.getLogger(__name__)


def _inner(module: nn.Module) -> nn.Module:
    """The MMDiT behind an engine / offload wrapper (their `.model`), else the module itself."""
    seen = 0
    while hasattr(module, "model") and isinstance(module.model, nn.Module) and seen < 4:
        module, seen = module.model, seen + 1
    return module


def lora_key(active: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """A hashable description of a LoRA set (strength-0 entries dropped): the batching key part."""
    return tuple(sorted((str(k), float(v)) for k, v in active.items() if float(v) != 0.0))


class LoraSet:
    def __init__(self, components: Mapping[str, nn.Module | None], dtype: torch.dtype | None = None,
                 part: bool = False):
        self.components = {k: _inner(v) for k, v in components.items() if v is not None}
        # part=True: this set serves some of a LoRA's models (a ComfyUI MODEL or CLIP); the file's terms
        # for the others are applied by their own set, so they are left out here instead of refused
        self.part = part
        self.dtype = dtype
        self.adapters: dict[str, LoraFile] = {}
        self.active: dict[str, float] = {}
        self.fused: dict[str, float] = {}
        self._touched: set[tuple[str, str]] = set()  # layers with a slot
        self._fused_layers: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ loading
    def _depth(self) -> int | None:
        mm = self.components.get("mmdit")
        cfg = getattr(mm, "config", None)
        return getattr(cfg, "depth", None)

    def _module(self, component: str, name: str, lora: LoraFile) -> nn.Module:
        root = self.components.get(component)
        if root is None:
            raise CheckpointError(f"LoRA {lora.path} targets {component}, which is not loaded", lora.path)
        try:
            return root.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"LoRA {lora.path}: {component} has no layer {name}; is it a LoRA for another "
                                  "model?", lora.path, [name]) from None

    def load(self, source: str | Path | LoraFile, name: str | None = None, strength: float | None = 1.0) -> str:
        """Parse and check a LoRA; `strength` not None also activates it (added to the active set)."""
        lora = source if isinstance(source, LoraFile) else read_lora(source, self._depth(), name)
        name = name or lora.name
        if self.part:
            lora = replace(lora, terms={k: v for k, v in lora.terms.items() if k[0] in self.components})
        if name in self.adapters:
            raise InputError(f"a LoRA named {name!r} is already loaded; unload it or pick another adapter_name")
        for (comp, mod), terms in lora.terms.items():
            module = self._module(comp, mod, lora)
            for t in terms:
                check_term(module, t, f"{comp} layer {mod}")
        if lora.skipped:
            log.warning("LoRA %s: %d keys match no SD3.5 layer and are skipped: %s", lora.path, len(lora.skipped),
                        ", ".join(lora.skipped[:8]) + (" ..." if len(lora.skipped) > 8 else ""))
        self.adapters[name] = lora
        if strength is not None:
            self.set_active({**self.active, name: strength})
        return name

    def unload(self, name: str | None = None) -> None:
        """Forget one adapter (or all); the slots are rebuilt without it."""
        if self.fused:
            self.unfuse()
        names = list(self.adapters) if name is None else [name]
        for n in names:
            if n not in self.adapters:
                raise InputError(f"no LoRA named {n!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
            del self.adapters[n]
            self.active.pop(n, None)
        self.set_active(self.active)
        if not self.adapters:
            for comp, mod in self._touched:
                remove_slot(self.components[comp].get_submodule(mod))
            self._touched.clear()

    # ------------------------------------------------------------------ switching
    def _per_layer(self, active: Mapping[str, float]) -> dict[tuple[str, str], list[tuple[LoraTerm, float]]]:
        layers: dict[tuple[str, str], list[tuple[LoraTerm, float]]] = {}
        for name, strength in active.items():
            if name not in self.adapters:
                raise InputError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.adapters) or 'none'})")
            for key, terms in self.adapters[name].terms.items():
                layers.setdefault(key, []).extend((t, float(strength)) for t in terms)
        return layers

    def set_active(self, active: Mapping[str, float]) -> None:
        """Make exactly these adapters active with these strengths (unmerged)."""
        layers = self._per_layer(active)
        for key in self._touched - set(layers):
            lora_slot(self.components[key[0]].get_submodule(key[1])).clear()
        for (comp, mod), terms in layers.items():
            module = self.components[comp].get_submodule(mod)
            dtype = self.dtype or _compute_dtype(module)
            lora_slot(module)[:] = activate(module, terms, dtype)
            self._touched.add((comp, mod))
        self.active = {k: float(v) for k, v in active.items()}

    def key(self) -> tuple[tuple[str, float], ...]:
        return lora_key({**self.fused, **self.active})

    # ------------------------------------------------------------------ merging
    def fuse(self, names: list[str] | None = None, strength: float = 1.0) -> None:
        """Merge the given (default: the active) adapters into the weights; they stop being unmerged."""
        if self.fused:
            raise InputError(f"LoRAs {', '.join(self.fused)} are already fused; unfuse_lora first")
        chosen = dict(self.active) if names is None else {n: self.active.get(n, 1.0) for n in names}
        chosen = {n: s * strength for n, s in chosen.items()}
        for (comp, mod), terms in self._per_layer(chosen).items():
            fuse(self.components[comp].get_submodule(mod), terms)
            self._fused_layers.add((comp, mod))
        self.fused = chosen
        self.set_active({n: s for n, s in self.active.items() if n not in chosen})

    def unfuse(self) -> None:
        for comp, mod in self._fused_layers:
            unfuse(self.components[comp].get_submodule(mod))
        self._fused_layers.clear()
        restored, self.fused = self.fused, {}
        self.set_active({**restored, **self.active})

    def _wanted(self, entries: Sequence[tuple[str | Path, float]]) -> dict[str, float]:
        """(file, strength) pairs -> adapter strengths (files loaded on first use, named by their path; a file
        listed twice adds its strengths, as chained LoraLoader nodes do)."""
        wanted: dict[str, float] = {}
        for path, strength in entries:
            name = str(path)
            if name not in self.adapters:
                self.load(path, name, strength=None)
            wanted[name] = wanted.get(name, 0.0) + float(strength)
        return wanted

    def layer_terms(self, entries: Sequence[tuple[str | Path, float]]
                    ) -> dict[tuple[str, str], list[tuple[LoraTerm, float]]]:
        """(component, layer) -> the (term, strength) pairs these entries put on it (apply.merged_weight bakes
        them: model merging and the save nodes)."""
        return self._per_layer(self._wanted(entries))

    @contextmanager
    def using(self, entries: Sequence[tuple[str | Path, float]]) -> Iterator[None]:
        """Within the block exactly these (file, strength) pairs are active (files loaded on first use,
        named by their path; a file listed twice adds its strengths, as chained LoraLoader nodes do)."""
        wanted = self._wanted(entries)
        previous = dict(self.active)
        self.set_active(wanted)
        try:
            yield
        finally:
            self.set_active(previous)

    def describe(self) -> str:
        parts = [f"{n}:{s:g}" for n, s in self.active.items()] + [f"{n}:{s:g} (fused)" for n, s in self.fused.items()]
        return ", ".join(parts) or "none"


_SHARED_ATTR = "sd35_lora_set"


def shared_lora_set(components: Mapping[str, nn.Module | None]) -> LoraSet:
    """The one LoraSet of these loaded models (kept on the first component's module), so every
    workflow that uses the same cached models shares parsed files and layer slots."""
    anchor = _inner(next(m for m in components.values() if m is not None))
    found = getattr(anchor, _SHARED_ATTR, None)
    if found is None:
        found = LoraSet(components, part=True)
        setattr(anchor, _SHARED_ATTR, found)
    return found


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer's inputs arrive in: its weight's, or for FP8 layers the bias' / bfloat16."""
    w = module.weight
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        b = getattr(module, "bias", None)
        return b.dtype if b is not None else torch.bfloat16
    return w.dtype
