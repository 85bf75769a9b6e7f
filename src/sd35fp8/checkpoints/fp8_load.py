"""Load an MMDiT or T5 straight into FP8: meta model -> FP8Linear slots -> tensors streamed in.

Formats read (told apart by keys, see `fp8_format`):
    "none"          16/32-bit weights. With an fp8 mode requested each selected Linear weight is
                    quantised on `device` as it streams in (never a full bf16 copy first).
    "plain"         float8 Linear weights, scale 1 (ComfyUI `*_fp8_e4m3fn.safetensors`).
    "comfy_scaled"  ComfyUI scaled fp8: marker `scaled_fp8`, scalar fp32 `<layer>.scale_weight`,
                    optional `<layer>.scale_input`.
    "native"        ours (checkpoints/export.py): `<layer>.weight_scale` [N,1] fp32 + `<layer>.input_scale`.
Stored float8 weights are copied to the device as float8: no round trip through bf16 memory.

Why not checkpoints.stream.load_into: it casts every floating tensor to the compute dtype (fp32
scales would become bf16) and refuses float8 targets with a `.scale_weight`. `stream_into` below
is the minimal loop that keeps fp8 weights and fp32 scales; it checks keys the same way
(missing / unexpected / shape, all named before reading anything).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from transformers.models.t5 import modeling_t5 as t5

from sd35fp8.checkpoints.sources import (COMFY_INPUT_SCALE, COMFY_WEIGHT_SCALE, FP8_DTYPES, FP8_MARKER, METADATA_KEY,
                                         NATIVE_INPUT_SCALE, NATIVE_WEIGHT_SCALE, SCALE_LEAVES, Components,
                                         TensorSource, fp8_format)
from sd35fp8.checkpoints.stream import load_into, model_shapes, source_of
from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.fp8.calibrate import Recipe
from sd35fp8.fp8.device import MODES, choose_mode
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.fp8.policy_sd35 import default_policy, default_t5_policy
from sd35fp8.fp8.quantize import Policy, model_weight_bytes
from sd35fp8.fp8.scaling import FP8_DTYPE, quantize_weight
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig
from sd35fp8.text.encoders import build_t5, plan_text_encoder_keys, t5_config_from_state_dict

log = logging.getLogger(__name__)

LOAD_MODES = (None, "none") + MODES
IGNORED = {"logit_scale", "text_model.embeddings.position_ids"}  # as in checkpoints.stream.IGNORED_KEYS


# ---- report ----------------------------------------------------------------------------------------------
@dataclass
class FP8LoadReport:
    """What an fp8 load did; attached to the model as `model.fp8_report`."""

    requested: str | None
    mode: str  # mode the FP8Linear layers run in ("none" when nothing is fp8)
    reason: str
    file_format: str
    fp8_layers: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # Linear layers left in high precision
    granularity: dict[str, int] = field(default_factory=dict)  # "channel"/"tensor" -> count
    quantized_on_load: int = 0  # layers quantised from 16/32-bit weights while loading
    fallback: dict[str, str] = field(default_factory=dict)  # layer -> why it runs weight_only
    weight_bytes: int = 0

    def describe(self) -> str:
        gran = ", ".join(f"{n} {g}" for g, n in sorted(self.granularity.items())) or "-"
        return (f"fp8 {self.mode} (requested {self.requested or 'file precision'}; {self.reason}): file "
                f"{self.file_format}, {len(self.fp8_layers)} FP8Linear ({gran} scales, {self.quantized_on_load} "
                f"quantised on load), {len(self.kept)} Linear kept, {len(self.fallback)} weight_only by shape, "
                f"weights {self.weight_bytes / 2**20:.1f} MiB")


# ---- streaming -----------------------------------------------------------------------------------------
def _set(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = None if tensor is None else nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise CheckpointError(f"module has no parameter or buffer {name}", keys=[name])


def _scale_key(source_keys: set[str], layer: str, kinds: tuple[str, str]) -> str | None:
    for leaf in kinds:
        if f"{layer}.{leaf}" in source_keys:
            return f"{layer}.{leaf}"
    return None


def _dequantize_stored(source: TensorSource, present: set[str], key: str, t: torch.Tensor,
                       device: torch.device) -> torch.Tensor:
    """A stored fp8 tensor `t` (file key `key`) times its `.scale_weight` / `.weight_scale` (1 when
    absent; a per-channel scale broadcasts over dim 0) -> float32."""
    sk = _scale_key(present, key[: -len(".weight")], (COMFY_WEIGHT_SCALE, NATIVE_WEIGHT_SCALE))
    s = source.get(sk, device).float() if sk else torch.ones((), device=device)
    return t.float() * (s.reshape(-1, *([1] * (t.ndim - 1))) if s.numel() > 1 else s.reshape(()))


@torch.no_grad()
def stream_into(model: nn.Module, source: TensorSource, device: torch.device, dtype: torch.dtype,
                fp8_layers: Mapping[str, str], key_of: Mapping[str, str] | None = None,
                input_scales: Mapping[str, float] | None = None, weight_clip: Mapping[str, object] | None = None,
                ignore: set[str] = IGNORED) -> int:
    """Fill a meta `model` whose `fp8_layers` {name: granularity} are FP8Linear.empty slots.

    key_of: model key -> file key (identity when None; T5's tied embedding maps both names to one
    key). FP8 layers take a stored fp8 weight as is (scale from `.scale_weight`/`.weight_scale`, else
    1) or quantise a 16/32-bit one on `device` (`weight_clip` ratios applied). `input_scales`
    {layer: scale} override stored ones. Returns how many layers were quantised here.
    """
    targets = model.state_dict(keep_vars=True)
    key_of = dict(key_of or {k: k for k in targets})
    present = set(source.keys())
    slot_leaves = (NATIVE_WEIGHT_SCALE, NATIVE_INPUT_SCALE)
    plain_keys = [k for k in targets if not (k.rpartition(".")[0] in fp8_layers and k.rpartition(".")[2]
                                              in slot_leaves + ("weight",))]
    used: set[str] = set()
    missing = []
    for k in plain_keys:
        (used.add(key_of[k]) if key_of.get(k) in present else missing.append(k))
    for layer in fp8_layers:
        fk = key_of.get(f"{layer}.weight", f"{layer}.weight")
        if fk not in present:
            missing.append(f"{layer}.weight")
            continue
        used.add(fk)
        base = fk[: -len(".weight")]
        for kinds in ((COMFY_WEIGHT_SCALE, NATIVE_WEIGHT_SCALE), (COMFY_INPUT_SCALE, NATIVE_INPUT_SCALE)):
            sk = _scale_key(present, base, kinds)
            if sk:
                used.add(sk)
    # scales of layers that stay high precision are consumed by dequantisation
    for k in plain_keys:
        base = key_of.get(k, k)[: -len(".weight")] if k.endswith(".weight") else None
        if base:
            for leaf in SCALE_LEAVES:
                if f"{base}.{leaf}" in present:
                    used.add(f"{base}.{leaf}")
    unexpected = [k for k in present - used if k not in ignore and k != FP8_MARKER]
    if missing or unexpected:
        raise CheckpointError(f"{source.name} does not match {type(model).__name__}: missing {sorted(missing)[:10]} "
                              f"({len(missing)}), unexpected {sorted(unexpected)[:10]} ({len(unexpected)})",
                              keys=sorted(missing) + sorted(unexpected))
    wrong = [k for k in plain_keys + [f"{n}.weight" for n in fp8_layers]
             if tuple(source.shape(key_of.get(k, k))) != tuple(targets[k].shape)]
    if wrong:
        raise CheckpointError(f"{len(wrong)} wrongly shaped keys in {source.name}: " + ", ".join(
            f"{k}: file {source.shape(key_of.get(k, k))} vs model {tuple(targets[k].shape)}" for k in wrong[:5]),
            keys=wrong)

    loaded: dict[str, torch.Tensor] = {}  # file key -> tensor (tied names share one Parameter)
    for k in plain_keys:
        fk = key_of[k]
        if fk not in loaded:
            t = source.get(fk, device)
            if t.dtype in FP8_DTYPES:  # a stored fp8 tensor of a layer kept high precision: dequantise
                t = _dequantize_stored(source, present, fk, t, device)
            loaded[fk] = t.to(dtype) if t.is_floating_point() else t
        _set(model, k, loaded[fk])
    if "shared.weight" in targets and "encoder.embed_tokens.weight" in targets:  # T5: one Parameter, two names
        model.encoder.embed_tokens.weight = model.shared.weight

    quantized = 0
    for layer, gran in fp8_layers.items():
        fk = key_of.get(f"{layer}.weight", f"{layer}.weight")
        base = fk[: -len(".weight")]
        mod = model.get_submodule(layer)
        w = source.get(fk, device)
        sk = _scale_key(present, base, (COMFY_WEIGHT_SCALE, NATIVE_WEIGHT_SCALE))
        if w.dtype == FP8_DTYPE:
            scale = source.get(sk, device).float() if sk else torch.ones((), device=device)
            scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)  # [] or [N, 1]
        else:
            if w.dtype in FP8_DTYPES:  # e.g. float8_e5m2: dequantise, then quantise to e4m3 like 16-bit weights
                w = _dequantize_stored(source, present, fk, w, device)
            clip = 1.0 if weight_clip is None else weight_clip.get(layer, 1.0)
            w, scale = quantize_weight(w, gran, torch.as_tensor(clip, dtype=torch.float32, device=device))
            quantized += 1
        mod._parameters["weight"] = nn.Parameter(w, requires_grad=False)
        mod._buffers["weight_scale"] = scale
        xs = None
        if input_scales is not None and layer in input_scales:
            xs = torch.tensor(float(input_scales[layer]), dtype=torch.float32, device=device)
        else:
            ik = _scale_key(present, base, (COMFY_INPUT_SCALE, NATIVE_INPUT_SCALE))
            if ik:
                xs = source.get(ik, device).float().reshape(())
                if float(xs) == 1.0:  # ComfyUI convert_old_quants: a scale_input of 1.0 is a placeholder
                    xs = None
        mod._buffers["input_scale"] = xs
        del w
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t is not None and t.is_meta]
    if left:
        raise CheckpointError(f"{type(model).__name__} from {source.name}: {len(left)} tensors never set: {left[:5]}",
                              keys=left)
    return quantized


# ---- shared driver -------------------------------------------------------------------------------------
def _fp8_plan(model: nn.Module, source: TensorSource, fmt: str, policy: Policy | None, quantize: bool,
              key_of: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """{layer: granularity} of the Linear layers that become FP8Linear, and the kept ones."""
    present = set(source.keys())
    plan: dict[str, str] = {}
    kept: list[str] = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear:
            continue
        fk = key_of.get(f"{name}.weight", f"{name}.weight")
        stored_fp8 = fk in present and source.dtype(fk) == FP8_DTYPE  # e5m2 layers are dequantised (kept)
        if fmt != "none":
            if not stored_fp8:
                kept.append(name)
                continue
            sk = _scale_key(present, fk[: -len(".weight")], (COMFY_WEIGHT_SCALE, NATIVE_WEIGHT_SCALE))
            plan[name] = "channel" if sk and source.shape(sk) not in ((), (1,)) else "tensor"
        elif quantize and (policy is None or policy.decide(name) is None):
            plan[name] = "channel"
        else:
            kept.append(name)
    return plan, kept


def _swap_empty(model: nn.Module, plan: Mapping[str, str], dtype: torch.dtype) -> None:
    for name, gran in plan.items():
        lin = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear.empty(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                               device="meta", granularity=gran, bias_dtype=dtype))


def _finish(model: nn.Module, requested: str | None, fmt: str, device: torch.device, plan: Mapping[str, str],
            kept: list[str], quantized: int, unscaled: str | None = None) -> FP8LoadReport:
    """Set every FP8 layer's mode. `requested` None: static when every layer has an input scale,
    else `unscaled` (None: the fastest the device has)."""
    layers = {n: model.get_submodule(n) for n in plan}
    if not layers:
        report = FP8LoadReport(requested, "none", "no fp8 layers", fmt, kept=kept)
    else:
        want = requested
        if want is None:  # the file's precision: static where every layer carries an input scale
            want = "static" if all(m.input_scale is not None for m in layers.values()) else unscaled
        if want == "static":
            bare = [n for n, m in layers.items() if m.input_scale is None]
            if bare:
                raise InputError(f"fp8 mode 'static' needs input scales, which {len(bare)} layers lack (e.g. "
                                 f"{bare[:3]}): pass a recipe from `sd35fp8 calibrate` or use mode 'dynamic'")
        mode, reason = choose_mode(want, device)
        for m in layers.values():
            m.set_mode(mode)
        gran: dict[str, int] = {}
        for m in layers.values():
            gran[m.granularity] = gran.get(m.granularity, 0) + 1
        report = FP8LoadReport(requested, mode, reason, fmt, list(layers), kept, gran, quantized,
                               {n: m.fallback_reason for n, m in layers.items() if m.fallback_reason})
    report.weight_bytes = model_weight_bytes(model)
    model.fp8_report = report
    log.info("%s", report.describe())
    return report


def _check_mode(mode: str | None) -> None:
    if mode not in LOAD_MODES:
        raise InputError(f"fp8 mode {mode!r} is not one of {[m for m in LOAD_MODES if m]} (or None: file precision)")


def _recipe_parts(recipe) -> tuple[Mapping[str, float] | None, Mapping[str, object] | None, Policy | None]:
    if recipe is None:
        return None, None, None
    r = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    return r.input_scales, r.weight_clip, r.policy


def load_mmdit_fp8(source: str | Path | Components | TensorSource, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.bfloat16, mode: str | None = None, *, recipe=None,
                   policy: Policy | None = None) -> nn.Module:
    """MMDiT with FP8Linear layers; mode None keeps the file's precision (an fp8 file runs as FP8).

    mode "none": every weight in `dtype` (fp8 files dequantised). "weight_only" | "dynamic" |
    "static": fp8 files keep their fp8 layers; 16/32-bit files are quantised per output channel as
    they stream in, on the layers `policy` selects (default: the measured SD3.5 policy, or the
    recipe's). A mode needing FP8 matmul on a device without it runs weight_only (logged, and in
    `model.fp8_report`). `recipe`: a calibration recipe (path, dict or Recipe) for static input scales
    and weight clipping.
    """
    _check_mode(mode)
    device = torch.device(device)
    src = source_of(source, "mmdit")
    fmt = fp8_format(src)
    config = MMDiTConfig.from_state_dict({k: v for k, v in model_shapes(src).items()
                                          if k.rpartition(".")[2] not in SCALE_LEAVES}, src.name)
    log.info("%s: %s", src.name, config.describe())
    with torch.device("meta"):
        model = MMDiT(config)
    if mode == "none" and fmt != "native":
        load_into(model, src, device, dtype)
        _finish(model, mode, fmt, device, {}, [], 0)
        return model.eval()
    input_scales, clip, recipe_policy = _recipe_parts(recipe)
    pol = policy or recipe_policy or default_policy()
    plan, kept = _fp8_plan(model, src, fmt, pol, mode not in (None, "none"), {})
    if mode == "none":
        plan, kept = {}, kept + list(plan)
    _swap_empty(model, plan, dtype)
    quantized = stream_into(model, src, device, dtype, plan, input_scales=input_scales, weight_clip=clip)
    _finish(model, mode, fmt, device, plan, kept, quantized)
    return model.eval()


class _NoCastGatedFF(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)  # [B, L, d_ff]
        return self.wo(self.dropout(h))


class _NoCastFF(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(self.act(self.wi(hidden_states))))


def patch_t5_for_fp8(model: nn.Module) -> nn.Module:
    """Drop transformers' `hidden.to(wo.weight.dtype)` in T5's feed-forward (T5DenseGatedActDense /
    T5DenseActDense): with an FP8Linear `wo` it would cast activations to unscaled float8. Same math
    otherwise; harmless for nn.Linear. Needed by any FP8 pass over a T5 (also quantize_model)."""
    for base, fix in ((t5.T5DenseGatedActDense, _NoCastGatedFF), (t5.T5DenseActDense, _NoCastFF)):
        patched = type("FP8" + base.__name__, (fix, base), {})
        for mod in model.modules():
            if type(mod) is base:
                mod.__class__ = patched
    return model


def load_t5_fp8(source: str | Path | Components | TensorSource, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.bfloat16, mode: str | None = None, *, policy: Policy | None = None
                ) -> nn.Module:
    """T5-XXL encoder (transformers T5EncoderModel) with FP8Linear layers; modes as load_mmdit_fp8,
    except that `mode=None` runs weight_only (fp8 storage, 16-bit matmuls), also where the file
    stores input scales (ComfyUI never applies a text encoder's scale_input): T5 runs once per
    prompt, so its speed hardly counts, and per-token activation scaling costs it ~3 dB
    (benchmarks/fp8_accuracy.py).

    Default policy for 16/32-bit files: the shipped T5-XXL policy (policies/t5xxl_default.json,
    `default_t5_policy`) keeps the measured least robust Linears 16-bit; every other Linear becomes
    FP8 (embedding, norms and the relative attention bias stay in `dtype`).
    """
    _check_mode(mode)
    device = torch.device(device)
    src = source_of(source, "t5xxl")
    fmt = fp8_format(src)
    shapes = {k: v for k, v in model_shapes(src).items() if k.rpartition(".")[2] not in SCALE_LEAVES}
    model = build_t5(t5_config_from_state_dict(shapes))
    keys = plan_text_encoder_keys("t5xxl", src.keys(), list(model.state_dict(keep_vars=True)))
    ignore = set(keys.ignored) | IGNORED
    if policy is None:
        policy = default_t5_policy(model.config.num_layers)
    plan, kept = _fp8_plan(model, src, fmt, policy, mode not in (None, "none"), keys.source)
    if mode == "none":
        plan, kept = {}, kept + list(plan)
    _swap_empty(model, plan, dtype)
    patch_t5_for_fp8(model)
    quantized = stream_into(model, src, device, dtype, plan, key_of=keys.source, ignore=ignore)
    # mode None: weight_only even where the file stores input scales (ComfyUI's text encoders never apply
    # scale_input: sd1_clip.py builds them with fp8_matrix_mult=False)
    _finish(model, mode or "weight_only", fmt, device, plan, kept, quantized)
    return model.eval()


_patch_t5_ff = patch_t5_for_fp8  # earlier name, used by tests/test_offload.py
