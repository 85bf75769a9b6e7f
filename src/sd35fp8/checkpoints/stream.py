"""Stream a state dict into a model built on the meta device, one tensor at a time from the mmap'd file.

Never two full copies: each tensor is read (mmap), cast on `device`, and assigned as the module's
parameter before the next is read. Every key is accounted for before anything is read:
missing and unexpected keys are reported by name, wrong shapes with both shapes.

fp8 files: plain float8 weights (scale 1) and ComfyUI scaled fp8 (W = W_fp8 * scale_weight) are
dequantised to the compute dtype here. A module whose parameter is itself float8 receives the
file's float8 tensor unchanged (the FP8 engine's modules); checkpoints/fp8_load.py streams FP8
layers with their scales.
"""

from __future__ import annotations

import logging
from itertools import chain
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from sd35fp8.checkpoints.sources import (FP8_DTYPES, Components, Fp8Layout, TensorSource, fp8_layout,
                                         open_components)
from sd35fp8.errors import CheckpointError

log = logging.getLogger(__name__)

# Keys present in some files that are deliberately not loaded (prefix stripped) -> why.
IGNORED_KEYS: dict[str, str] = {
    "text_model.embeddings.position_ids": "CLIP position ids: a constant arange, rebuilt after loading",
    "logit_scale": "CLIP contrastive temperature: not used for text conditioning",
    "scaled_fp8": "ComfyUI scaled-fp8 marker: an empty tensor whose dtype names the format",
}

PathLike = str | Path


def _names(keys: Sequence[str], n: int = 10) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def where(source: TensorSource) -> str:
    return str(source.files[0]) if source.files else source.name


def _alias_groups(module: nn.Module) -> dict[str, list[str]]:
    """first state-dict name -> all names of the same tensor (tied weights, e.g. T5 shared/embed_tokens)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return {names[0]: names for names in groups.values()}


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise CheckpointError(f"module has no parameter or buffer {name}", keys=[name])


def _scale_for(weight: torch.Tensor, scale: torch.Tensor, scale_key: str, source: TensorSource) -> torch.Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == weight.shape[0]:  # per output channel
        return scale.reshape(-1, *([1] * (weight.ndim - 1)))
    raise CheckpointError(f"{scale_key} in {source.name} has shape {tuple(scale.shape)}, which does not scale a "
                          f"weight of shape {tuple(weight.shape)}", where(source), [scale_key])


def _convert(key: str, tensor: torch.Tensor, target: torch.Tensor, dtype: torch.dtype, fp8: Fp8Layout,
             source: TensorSource, device: torch.device) -> torch.Tensor:
    scale_key = fp8.scale_weight.get(key)
    if target.dtype in FP8_DTYPES:  # an FP8-engine module keeps the stored fp8 weight
        if tensor.dtype != target.dtype or scale_key is not None:
            raise CheckpointError(f"{key}: the module keeps {target.dtype} weights, {source.name} stores "
                                  f"{tensor.dtype}{' with scale_weight' if scale_key else ''}; quantise after "
                                  "loading instead", where(source), [key])
        return tensor
    if not target.is_floating_point():
        return tensor.to(target.dtype)
    if scale_key is not None:  # ComfyUI scaled fp8: W = W_fp8 * scale_weight
        scale = source.get(scale_key, device).float()
        return (tensor.float() * _scale_for(tensor, scale, scale_key, source)).to(dtype)
    return tensor.to(dtype)


def load_into(module: nn.Module, source: TensorSource, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.bfloat16, ignore: Mapping[str, str] = IGNORED_KEYS,
              init_buffers: Callable[[nn.Module, torch.device], None] | None = None) -> nn.Module:
    """Stream `source` into `module` (usually built on meta), one tensor at a time; returns `module`.

    Floating tensors are cast to `dtype` (fp8 ones dequantised, scaled by `.scale_weight`) unless the
    module's parameter is float8. Keys in `ignore` are logged and skipped; `.scale_input` keys too
    (static activation scales, unused when dequantising). Raises CheckpointError naming missing,
    unexpected and wrongly shaped keys before reading anything. `init_buffers(module, device)`
    materialises non-persistent buffers left on meta (e.g. CLIP position ids); any tensor still on
    meta afterwards is an error.
    """
    device = torch.device(device)
    groups = _alias_groups(module)
    targets = module.state_dict(keep_vars=True)
    fp8 = fp8_layout(source)
    file_keys = source.keys()
    present = set(file_keys)

    plan: list[tuple[str, list[str]]] = []  # (file key, module names sharing that tensor)
    used: set[str] = set()
    missing: list[str] = []
    for first, names in groups.items():
        found = [n for n in names if n in present]
        if not found:
            missing.append(first)
            continue
        plan.append((found[0], names))
        used.update(found)
        if len(found) > 1:
            log.info("%s: %s are tied; loading %s", source.name, " = ".join(found), found[0])
    ignored = [k for k in file_keys if k not in used and k in ignore]
    skipped_input = [k for k in fp8.scale_input if k not in used]
    unexpected = [k for k in file_keys if k not in used and k not in ignore and k not in fp8.aux_keys]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}")
        raise CheckpointError(f"{source.name} does not match {type(module).__name__}: {'; '.join(parts)}",
                              where(source), missing + unexpected)
    wrong = [f"{key}: file {source.shape(key)} vs model {tuple(targets[names[0]].shape)}"
             for key, names in plan if tuple(source.shape(key)) != tuple(targets[names[0]].shape)]
    if wrong:
        raise CheckpointError(f"{len(wrong)} wrongly shaped keys in {source.name}: {_names(wrong)}",
                              where(source), [w.split(":")[0] for w in wrong])
    for key in ignored:
        log.info("%s: not loading %s (%s)", source.name, key, ignore[key])
    if skipped_input:
        log.info("%s: %d scale_input keys not used (weights are dequantised to %s)", source.name,
                 len(skipped_input), dtype)
    if fp8.scaling != "none":
        log.info("%s: %s fp8 weights (%d tensors) dequantised to %s", source.name, fp8.scaling,
                 len(fp8.fp8_keys), dtype)

    for key, names in plan:
        tensor = _convert(key, source.get(key, device), targets[names[0]], dtype, fp8, source, device)
        is_param = isinstance(targets[names[0]], nn.Parameter)
        value = nn.Parameter(tensor, requires_grad=False) if is_param else tensor
        for name in names:  # tied names get the same Parameter object
            _assign(module, name, value)
        del tensor, value
    if init_buffers is not None:
        init_buffers(module, device)
    _check_complete(module, source)
    return module


def _check_complete(module: nn.Module, source: TensorSource) -> None:
    left = [n for n, t in chain(module.named_parameters(), module.named_buffers()) if t is not None and t.is_meta]
    if left:
        raise CheckpointError(f"{type(module).__name__} from {source.name}: {len(left)} tensors were never set "
                              f"(not in the state dict): {_names(left)}", where(source), left)


def source_of(obj: PathLike | Components | TensorSource, component: str) -> TensorSource:
    """A component's TensorSource from a path, repo id, Components or TensorSource."""
    if isinstance(obj, TensorSource):
        if obj.component != component:
            raise CheckpointError(f"{obj.name} is a {obj.component} source, expected {component}", where(obj))
        return obj
    comps = obj if isinstance(obj, Components) else open_components(obj)
    return comps.require(component)


def model_shapes(source: TensorSource, ignore: Mapping[str, str] = IGNORED_KEYS) -> dict[str, tuple[int, ...]]:
    """key -> shape of the model's tensors (fp8 scale/marker keys and ignored keys left out)."""
    aux = fp8_layout(source).aux_keys
    return {k: source.shape(k) for k in source.keys() if k not in aux and k not in ignore}
