"""Write FP8 checkpoints tensor by tensor in bounded RAM: ComfyUI scaled fp8 or our native format.

    comfy   `<prefix>scaled_fp8` marker (empty float8_e4m3fn tensor; prefix `model.diffusion_model.`
            in an all-in-one, none in an MMDiT-only file, `text_encoders.t5xxl.transformer.` for an
            all-in-one's T5), per quantised Linear a float8_e4m3fn weight + scalar fp32
            `.scale_weight` (+ scalar `.scale_input` from a recipe). ComfyUI detects the format by
            the marker (comfy/model_detection.py model_config_from_unet, text_encoders t5_xxl_detect).
    native  per-channel fp32 `.weight_scale` [N, 1], static `.input_scale`, recipe and policy in the
            safetensors metadata under `sd35fp8.fp8`.
Everything else (norms, embeddings, biases, convs, the VAE and text encoders of an all-in-one) is
copied unchanged, so an all-in-one stays an all-in-one.

Why our own writer: safetensors' `save_file` takes a dict of every tensor in memory (16 GB for
Large); the format is a JSON header with byte offsets followed by raw bytes, so the header can be
written first from shapes alone and the tensors streamed after it one by one.
"""

from __future__ import annotations

import json
import logging
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from sd35fp8.checkpoints.safetensors_file import DTYPES, SafetensorsFile
from sd35fp8.checkpoints.sources import FP8_DTYPES, FP8_MARKER, PREFIXES, TEXT_INNER_PREFIX, TensorSource, open_file
from sd35fp8.checkpoints.fp8_load import (COMFY_INPUT_SCALE, COMFY_WEIGHT_SCALE, METADATA_KEY, NATIVE_INPUT_SCALE,
                                         NATIVE_WEIGHT_SCALE, SCALE_LEAVES)
from sd35fp8.checkpoints.stream import model_shapes, source_of
from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.fp8.calibrate import Recipe
from sd35fp8.fp8.device import MODES
from sd35fp8.fp8.policy_sd35 import default_policy, default_t5_policy
from sd35fp8.fp8.quantize import Policy
from sd35fp8.fp8.scaling import quantize_weight
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig
from sd35fp8.text.encoders import build_t5, t5_config_from_state_dict

log = logging.getLogger(__name__)

FORMATS = ("comfy", "native")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# safetensors writes tensors sorted by dtype (its enum order, descending), then by name
_DTYPE_RANK = {n: i for i, n in enumerate(
    ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"))}


# ---- streaming safetensors writer ------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def write_safetensors(path: str | Path, entries: Sequence[Entry], produce: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None, progress: bool = False) -> int:
    """Write a safetensors file byte-identical to `save_file` for the same tensors, calling
    `produce(key)` for one tensor at a time in file order. Returns the file size.
    progress: a bar of the bytes written (tqdm, stderr)."""
    order = sorted(entries, key=lambda e: (-_DTYPE_RANK[DTYPE_NAMES[e.dtype]], e.key))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in order:
        header[e.key] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    bar = tqdm(total=offset, desc=f"writing {path.name}", unit="B", unit_scale=True, file=sys.stderr,
               disable=not progress)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for e in order:
                t = produce(e.key)
                if t.dtype != e.dtype or tuple(t.shape) != e.shape:
                    raise CheckpointError(f"writing {path}: {e.key} is {t.dtype} {tuple(t.shape)}, planned "
                                          f"{e.dtype} {e.shape}", str(path), [e.key])
                if e.nbytes:
                    f.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                del t
                bar.update(e.nbytes)
        tmp.replace(path)
    finally:  # an error or Ctrl-C leaves neither a half file nor the .partial
        bar.close()
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


# ---- quantisation plan -----------------------------------------------------------------------------------
@dataclass
class ExportReport:
    out: str
    fmt: str
    components: dict[str, int] = field(default_factory=dict)  # component -> fp8 layers written
    bytes_in: int = 0
    bytes_out: int = 0

    def describe(self) -> str:
        comps = ", ".join(f"{c}: {n} fp8 Linear" for c, n in self.components.items())
        return (f"wrote {self.out} ({self.fmt}): {comps}; {self.bytes_in / 2**30:.2f} GiB -> "
                f"{self.bytes_out / 2**30:.2f} GiB")


def _fp8_layers(component: str, source: TensorSource, policy: Policy | None) -> list[str]:
    """Names of the nn.Linear modules of the component's model (built on meta from shapes) that
    `policy` turns FP8; None: the shipped policy of the component (the T5 one fits its depth)."""
    shapes = {k: v for k, v in model_shapes(source).items() if k.rpartition(".")[2] not in SCALE_LEAVES}
    if component == "mmdit":
        with torch.device("meta"):
            model: nn.Module = MMDiT(MMDiTConfig.from_state_dict(shapes, source.name))
        policy = policy or default_policy()
    elif component == "t5xxl":
        model = build_t5(t5_config_from_state_dict(shapes))
        policy = policy or default_t5_policy(model.config.num_layers)
    else:
        raise InputError(f"export: cannot quantise component {component}")
    return [n for n, m in model.named_modules()
            if type(m) is nn.Linear and f"{n}.weight" in shapes and policy.decide(n) is None]


def _high_precision(source: TensorSource, key: str) -> torch.Tensor:
    """A weight in float32, dequantising a stored fp8 one with its scale (any layout the loaders read)."""
    t = source.get(key)
    if t.dtype not in FP8_DTYPES:
        return t.float()
    base = key[: -len(".weight")]
    for leaf in (COMFY_WEIGHT_SCALE, NATIVE_WEIGHT_SCALE):
        if f"{base}.{leaf}" in source:
            s = source.get(f"{base}.{leaf}").float()
            return t.float() * (s.reshape(()) if s.numel() == 1 else s.reshape(-1, 1))
    return t.float()


class _ComponentPlan:
    """Output entries of one component and how to produce each, under `prefix`."""

    def __init__(self, component: str, source: TensorSource, prefix: str, fmt: str, quantize: bool,
                 policy: Policy | None, recipe: Recipe | None, mode: str | None):
        self.source, self.prefix = source, prefix
        self.entries: list[Entry] = []
        self.produce: dict[str, Callable[[], torch.Tensor]] = {}
        layers: list[str] = []
        if quantize:
            layers = _fp8_layers(component, source, policy or (recipe.policy if recipe else None))
        self.fp8_layers = layers
        scales = dict(recipe.input_scales) if (recipe and mode not in ("weight_only", "dynamic")) else {}
        if fmt == "comfy" and recipe is not None:  # ComfyUI casts x / scale_input to fp8 without a clamp:
            for n, a in recipe.input_amax.items():  # never below the calibrated amax (margin >= 1)
                if n in scales:
                    scales[n] = max(float(scales[n]), float(a) / 448.0)
        clip = recipe.weight_clip if recipe else {}
        fp8_weights = {f"{n}.weight": n for n in layers}
        gran = "tensor" if fmt == "comfy" else "channel"
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def quantized(layer: str) -> tuple[torch.Tensor, torch.Tensor]:
            if layer not in cache:  # weight then scale are consecutive reads of one layer: cache one
                cache.clear()
                cache[layer] = quantize_weight(_high_precision(source, f"{layer}.weight"), gran, clip.get(layer, 1.0))
            return cache[layer]

        for key in source.keys():
            if key == FP8_MARKER or key.rpartition(".")[2] in SCALE_LEAVES:
                continue  # old fp8 bookkeeping: rewritten below for the layers we quantise
            if key in fp8_weights:
                layer = fp8_weights[key]
                n = source.shape(key)[0]
                ws, xs = ((COMFY_WEIGHT_SCALE, COMFY_INPUT_SCALE) if fmt == "comfy"
                          else (NATIVE_WEIGHT_SCALE, NATIVE_INPUT_SCALE))
                self._add(key, torch.float8_e4m3fn, source.shape(key), lambda ly=layer: quantized(ly)[0])
                self._add(f"{layer}.{ws}", torch.float32, () if fmt == "comfy" else (n, 1),
                          lambda ly=layer: quantized(ly)[1])
                if layer in scales:
                    self._add(f"{layer}.{xs}", torch.float32, (),
                              lambda ly=layer: torch.tensor(float(scales[ly]), dtype=torch.float32))
            elif source.dtype(key) in FP8_DTYPES and key.endswith(".weight"):  # fp8 input, layer kept: dequantise
                self._add(key, torch.bfloat16, source.shape(key), lambda k=key: _high_precision(source, k).bfloat16())
            else:
                self._add(key, source.dtype(key), source.shape(key), lambda k=key: source.get(k))
        if layers and fmt == "comfy":
            self._add(FP8_MARKER, torch.float8_e4m3fn, (0,), lambda: torch.empty(0, dtype=torch.float8_e4m3fn))

    def _add(self, key: str, dtype: torch.dtype, shape, fn: Callable[[], torch.Tensor]) -> None:
        full = self.prefix + key
        self.entries.append(Entry(full, dtype, tuple(shape)))
        self.produce[full] = fn


def _file_prefix(file: SafetensorsFile, component: str, source: TensorSource) -> str:
    prefix = next(p for p, c in PREFIXES.items() if c == component)
    if component in ("clip_l", "clip_g", "t5xxl"):
        first = source.keys()[0]
        if prefix + TEXT_INNER_PREFIX + first in file:
            prefix += TEXT_INNER_PREFIX
    return prefix


def export(path_in: str | Path, path_out: str | Path, fmt: str = "comfy", recipe: Recipe | str | Path | None = None,
           mode: str | None = None, t5: bool = False, policy: Policy | None = None,
           all_linears: bool = False, progress: bool = False) -> ExportReport:
    """Quantise the MMDiT (and with `t5` the T5-XXL) of `path_in` into `path_out` (see module doc).

    A single file keeps its layout (all-in-one -> all-in-one, MMDiT-only -> MMDiT-only, T5-only
    -> T5-only); a folder or repo id (e.g. diffusers) gives an MMDiT-only file with original keys.
    `mode` "static" needs a recipe with input scales; "weight_only"/"dynamic" write no input scales.
    progress: a bar of the bytes written on stderr (`sd35fp8 quantize`).
    """
    if fmt not in FORMATS:
        raise InputError(f"export format {fmt!r} not in {FORMATS}")
    if mode is not None and mode not in MODES:
        raise InputError(f"export mode {mode!r} not in {', '.join(MODES)}")
    rec = None if recipe is None else (recipe if isinstance(recipe, Recipe) else Recipe.load(recipe))
    if mode == "static" and not (rec and rec.input_scales):
        raise InputError("export --mode static needs a recipe with input scales (sd35fp8 calibrate)")
    path_in, path_out = Path(path_in), Path(path_out)
    if path_out.resolve() == path_in.resolve():
        raise InputError(f"export: output {path_out} would overwrite the input")
    plans: list[_ComponentPlan] = []
    metadata: dict[str, str] = {}
    if all_linears:  # no layer kept 16-bit (ComfyUI before convert_old_quants casts those to fp8 unscaled)
        policy = Policy(keep=())
    if path_in.is_file() or str(path_in).endswith(".json"):
        file = SafetensorsFile(path_in)
        metadata = dict(file.metadata)
        if "_quantization_metadata" in metadata or any(k.endswith(".comfy_quant") for k in file.keys()):
            raise InputError(f"{path_in} uses ComfyUI's mixed-precision quantisation (comfy_quant), which sd35fp8 "
                             "does not read: quantise from the 16-bit file")
        sources = open_file(path_in)
        if "mmdit" not in sources and "t5xxl" not in sources:
            raise InputError(f"{path_in} holds neither an MMDiT nor a T5-XXL ({', '.join(sources)})")
        prefixed = any(k.startswith(tuple(PREFIXES)) for k in file.keys())
        for comp, src in sources.items():
            prefix = _file_prefix(file, comp, src) if prefixed else ""
            quant = comp == "mmdit" or (comp == "t5xxl" and (t5 or "mmdit" not in sources))
            plans.append(_ComponentPlan(comp, src, prefix, fmt, quant,
                                        policy if comp == "mmdit" or all_linears else None,
                                        rec if comp == "mmdit" else None, mode))
    else:
        if t5:
            raise InputError(f"--t5 with a folder/repo ({path_in}): give the T5 file itself to quantise it")
        src = source_of(path_in, "mmdit")
        plans.append(_ComponentPlan("mmdit", src, "", fmt, True, policy, rec, mode))
    entries = [e for p in plans for e in p.entries]
    produce = {k: fn for p in plans for k, fn in p.produce.items()}
    dup = len(entries) - len({e.key for e in entries})
    if dup:
        raise CheckpointError(f"export: {dup} duplicate output keys", str(path_out))
    if fmt == "native":
        metadata[METADATA_KEY] = json.dumps({"format": "native", "version": 1, "granularity": "channel",
                                             "mode": mode, "recipe": rec.to_dict() if rec else None,
                                             "fp8_layers": {p.prefix or "": len(p.fp8_layers) for p in plans}})
    size = write_safetensors(path_out, entries, lambda k: produce[k](), metadata or None, progress=progress)
    report = ExportReport(str(path_out), fmt, {p.source.component: len(p.fp8_layers) for p in plans},
                          sum(p.source.nbytes(k) for p in plans for k in p.source.keys()), size)
    log.info("%s", report.describe())
    return report
