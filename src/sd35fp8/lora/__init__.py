"""LoRA for SD3.5 on FP8 (and 16/32-bit) models: every common file layout, unmerged or merged.

    read_lora(path, depth)  -> LoraFile (terms on our module names; keys.py has the layouts)
    LoraSet(components)     -> named adapters, set_active({name: strength}) per request, fuse / unfuse
    apply_lora(y, x, slot)  -> the low-rank update the engine's matmul and the layer hooks add
"""

from .adapters import LoraSet, lora_key, shared_lora_set
from .apply import ActiveTerm, apply_lora, existing_slot, fuse, lora_slot, unfuse
from .files import LoraFile, LoraTerm, guess_base, parse_lora, read_lora

__all__ = ["ActiveTerm", "LoraFile", "LoraSet", "LoraTerm", "apply_lora", "existing_slot", "fuse", "guess_base",
           "lora_key", "lora_slot", "shared_lora_set", "parse_lora", "read_lora", "unfuse"]
