"""Write the tiny model as a ComfyUI-style all-in-one SD3.5 checkpoint, and load it back with the
project's own loaders to prove the layout.

Key layout (the inverse of `checkpoints.sources` / `checkpoints.load`):
  model.diffusion_model.<MMDiT key>             (joint_blocks.*, x_embedder.*, pos_embed, ...)
  first_stage_model.<LDM VAE key>               (encoder.down.*, decoder.up.*, ...)
  text_encoders.clip_l.transformer.<HF key>     (text_model.*, text_projection.weight)
  text_encoders.clip_g.transformer.<HF key>
  text_encoders.t5xxl.transformer.<HF key>      (shared.weight, encoder.block.*, encoder.final_layer_norm.*)
Floats are stored as float16 (as the public all-in-ones). Generation defaults go to the metadata
key `sd35fp8.defaults` (JSON); `spiece.model` is copied next to the file, where `SD3Tokenizer`'s
search (`text.t5_tokenizer.find_t5_tokenizer(near=[file])`) finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints.export import export
from ..checkpoints.load import load_mmdit, load_text_encoders, load_vae
from ..defaults import DEFAULTS_METADATA_KEY
from ..errors import CheckpointError, InputError
from ..sampling import check_scheduler, get_sampler
from ..text.clip_tokenizer import CLIPBPE
from ..text.t5_tokenizer import T5Tokenizer, find_t5_tokenizer
from ..text.tokenizer import SD3Tokenizer
from . import SHIPPED_FP8_MMDIT

CHECKPOINT_NAME = "sd35fp8_tiny.safetensors"
PREFIXES = {
    "mmdit": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
# T5's encoder.embed_tokens is tied to shared: one stored tensor (the loaders feed both names).
_T5_TIED = "encoder.embed_tokens.weight"


def component_state(name: str, module: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One component's tensors under its original keys, cast to `dtype` (floats only), contiguous, on CPU."""
    out = {}
    for key, tensor in module.state_dict().items():
        if name == "t5xxl" and key == _T5_TIED:
            continue
        t = tensor.detach().to("cpu")
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous().clone()
    return out


def export_checkpoint(path: str | Path, mmdit: nn.Module, vae: nn.Module, clip_l: nn.Module, clip_g: nn.Module,
                      t5: nn.Module, defaults: dict, info: dict | None = None, spiece: str | Path | None = None,
                      dtype: torch.dtype = torch.float16) -> Path:
    """Write the all-in-one file (and copy `spiece` beside it); returns the file path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in (("mmdit", mmdit), ("vae", vae), ("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5)):
        for key, t in component_state(name, module, dtype).items():
            tensors[PREFIXES[name] + key] = t
    metadata = {DEFAULTS_METADATA_KEY: json.dumps(defaults, sort_keys=True),
                "modelspec.title": "sd35fp8 tiny (procedural shapes world, 128 px)",
                "modelspec.architecture": "stable-diffusion-v3.5-large (tiny width)"}
    if info is not None:
        metadata["sd35fp8.tiny"] = json.dumps(info, sort_keys=True)
    save_file(tensors, str(path), metadata=metadata)
    if spiece is not None and Path(spiece).resolve() != (path.parent / "spiece.model").resolve():
        shutil.copyfile(spiece, path.parent / "spiece.model")
    return path


def read_component(path: str | Path, name: str) -> dict[str, torch.Tensor]:
    """One component's tensors of an all-in-one written by `export_checkpoint`, under the module's own
    keys (the prefix stripped; T5's tied `encoder.embed_tokens.weight` restored), for a strict
    `load_state_dict` into a module built from the same spec. Raises CheckpointError when absent."""
    if name not in PREFIXES:
        raise CheckpointError(f"unknown component {name!r}: one of {sorted(PREFIXES)}", str(path))
    prefix, out = PREFIXES[name], {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.startswith(prefix):
                out[key[len(prefix):]] = f.get_tensor(key)
    if not out:
        raise CheckpointError(f"{path} holds no {name} tensors (prefix {prefix})", str(path))
    if name == "t5xxl" and "shared.weight" in out:
        out[_T5_TIED] = out["shared.weight"]
    return out


def load_component_(module: nn.Module, path: str | Path, name: str) -> nn.Module:
    """Copy a component of `path` into `module` in place (strict: every key, every shape)."""
    sd = read_component(path, name)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {name} does not match the module built from the spec: {e}",
                              str(path)) from e
    return module


def load_back(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(mmdit, vae, text encoders, SD3Tokenizer) loaded by the project's loaders from an exported file.

    Raises CheckpointError when a component is missing or spiece.model is not beside the file.
    """
    path = Path(path)
    mmdit = load_mmdit(path, device, dtype)
    vae = load_vae(path, device, dtype)
    text = load_text_encoders(path, device, dtype)
    if text.t5xxl is None:
        raise CheckpointError(f"{path} has no T5 encoder", str(path))
    try:
        spiece = find_t5_tokenizer(near=[path], use_hf_cache=False)
    except InputError as e:
        raise CheckpointError(f"no spiece.model beside {path}: {e}", str(path)) from e
    tokenizer = SD3Tokenizer(CLIPBPE.default(), T5Tokenizer(spiece))
    return mmdit, vae, text, tokenizer


def write_fp8_mmdit(all_in_one: str | Path, out: str | Path) -> Path:
    """The all-in-one's MMDiT as a ComfyUI scaled-fp8 diffusion-model file (original keys, no
    prefix, as in ComfyUI's models/diffusion_models), made by the project's own quantizer
    (`sd35fp8 quantize IN OUT --format comfy`); the generation defaults go along in the metadata."""
    all_in_one, out = Path(all_in_one), Path(out)
    state = read_component(all_in_one, "mmdit")
    with safe_open(str(all_in_one), "pt") as f:
        meta = f.metadata() or {}
    keep = {k: meta[k] for k in (DEFAULTS_METADATA_KEY,) if k in meta}
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "mmdit.safetensors"
        save_file(state, str(plain), metadata=keep)
        export(plain, out, fmt="comfy")
    return out


DEFAULT_FIELDS = {"steps": int, "cfg": float, "sampler": str, "scheduler": str, "shift": float}


def set_defaults(path: str | Path, updates: dict) -> dict:
    """Rewrite (or add) the generation defaults (metadata `sd35fp8.defaults`) of a checkpoint in place;
    the tensors and every other metadata key stay as they are. Returns the new defaults."""
    path = Path(path)
    bad = sorted(set(updates) - set(DEFAULT_FIELDS))
    if bad:
        raise InputError(f"set_defaults: unknown fields {bad}; choose from {', '.join(DEFAULT_FIELDS)}")
    get_sampler(updates.get("sampler", "euler"))  # InputError naming the valid ones
    check_scheduler(updates.get("scheduler", "normal"))
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    # a file without own defaults gets these over the loader's per-model ones (defaults.py)
    defaults = json.loads(meta.get(DEFAULTS_METADATA_KEY, "{}")) | {k: DEFAULT_FIELDS[k](v) for k, v in updates.items()}
    meta[DEFAULTS_METADATA_KEY] = json.dumps(defaults, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(load_file(str(path)), str(tmp), metadata=meta)
    os.replace(tmp, path)
    return defaults


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sd35fp8.tiny.export",
                                description="Write the scaled-fp8 MMDiT file of a tiny all-in-one (the shipped "
                                "pair); --defaults first rewrites the all-in-one's generation defaults.")
    p.add_argument("all_in_one", type=Path)
    p.add_argument("out", type=Path, nargs="?", default=None,
                   help=f"fp8 file (default: {SHIPPED_FP8_MMDIT.name} beside the all-in-one)")
    p.add_argument("--defaults", default=None, metavar="K=V,...",
                   help="e.g. sampler=euler_ancestral,steps=30,cfg=6 (fields: " + ", ".join(DEFAULT_FIELDS) + ")")
    a = p.parse_args(argv)
    if a.defaults:
        pairs = [kv.split("=", 1) for kv in a.defaults.split(",") if kv.strip()]
        if any(len(kv) != 2 for kv in pairs):
            raise SystemExit(f"--defaults {a.defaults!r}: expected K=V,...")
        print(set_defaults(a.all_in_one, {k.strip(): v.strip() for k, v in pairs}))
    print(write_fp8_mmdit(a.all_in_one, a.out or a.all_in_one.with_name(SHIPPED_FP8_MMDIT.name)))
    return 0


if __name__ == "__main__":  # python -m sd35fp8.tiny.export ALL_IN_ONE [OUT] [--defaults K=V,...]
    raise SystemExit(main())
