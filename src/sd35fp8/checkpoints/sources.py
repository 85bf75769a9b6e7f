"""Tensor sources: one model component's tensors under ORIGINAL key names, whatever the file layout.

Layouts are told apart by their KEYS, never by file names:
- original single file: `model.diffusion_model.*` (MMDiT) + `first_stage_model.*` (VAE);
- ComfyUI all-in-one: + `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*` (HF transformers naming);
- one-component files without prefix: MMDiT (`joint_blocks.*`), VAE (`encoder.down.*`),
  CLIP (`text_model.*`: CLIP-L vs CLIP-G by hidden size), T5 (`encoder.block.*`),
  and diffusers-named transformer / VAE files (converted through a key plan);
- plain fp8 (float8 weights, scale 1) and ComfyUI scaled fp8 (`scaled_fp8` marker,
  `<layer>.scale_weight`, `<layer>.scale_input`): see `fp8_layout`;
- folders: a single-file checkpoint at the root (+ `text_encoders/`), or a diffusers folder
  (`model_index.json`, `transformer/`, `vae/`, `text_encoder{,_2,_3}/`, `tokenizer{,_2,_3}/`);
- Hugging Face repo ids, looked up offline in the hub cache (`hf_cache.py`).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from sd35fp8.checkpoints.hf_cache import looks_like_repo_id, snapshot_dir
from sd35fp8.checkpoints.safetensors_file import INDEX_SUFFIX, SafetensorsFile, is_index
from sd35fp8.errors import CheckpointError

log = logging.getLogger(__name__)

COMPONENTS = ("mmdit", "vae", "clip_l", "clip_g", "t5xxl")
DESCRIPTION = {"mmdit": "MMDiT (diffusion model)", "vae": "VAE", "clip_l": "CLIP-L text encoder",
               "clip_g": "CLIP-G text encoder", "t5xxl": "T5-XXL text encoder"}
FAMILY_OF = {"mmdit": "mmdit", "vae": "vae", "clip_l": "clip", "clip_g": "clip", "t5xxl": "t5"}
FAMILY_DESCRIPTION = {"mmdit": "an MMDiT (diffusion model)", "vae": "a VAE", "clip": "a CLIP text encoder",
                      "t5": "a T5 text encoder", "unknown": "no SD3 component"}

# prefixed single files: key prefix -> component; text encoders nest HF naming under `transformer.`
PREFIXES = {"model.diffusion_model.": "mmdit", "first_stage_model.": "vae", "text_encoders.clip_l.": "clip_l",
            "text_encoders.clip_g.": "clip_g", "text_encoders.t5xxl.": "t5xxl"}
TEXT_INNER_PREFIX = "transformer."
CLIP_HIDDEN = {768: "clip_l", 1280: "clip_g"}  # SD3's CLIP-L and CLIP-G widths
CLIP_WIDTH_KEY = "text_model.final_layer_norm.weight"  # [hidden]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT_SUFFIX = ".scale_weight"
SCALE_INPUT_SUFFIX = ".scale_input"
# FP8 scale leaves: ComfyUI scaled fp8 (scalar fp32) and our native format (per-channel weight scales)
COMFY_WEIGHT_SCALE, COMFY_INPUT_SCALE = "scale_weight", "scale_input"
NATIVE_WEIGHT_SCALE, NATIVE_INPUT_SCALE = "weight_scale", "input_scale"
SCALE_LEAVES = (COMFY_WEIGHT_SCALE, COMFY_INPUT_SCALE, NATIVE_WEIGHT_SCALE, NATIVE_INPUT_SCALE)
METADATA_KEY = "sd35fp8.fp8"

# diffusers folder: component -> subfolder; tokenizer subfolders
DIFFUSERS_FOLDERS = {"mmdit": "transformer", "vae": "vae", "clip_l": "text_encoder", "clip_g": "text_encoder_2",
                     "t5xxl": "text_encoder_3"}
TOKENIZER_FOLDERS = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5xxl": "tokenizer_3"}
STANDARD_WEIGHT_NAMES = ("model", "diffusion_pytorch_model")


# ---- sources ------------------------------------------------------------------------------------------
class TensorSource:
    """One component's tensors by original key (prefix stripped). See docs/ARCHITECTURE.md."""

    name: str  # for errors, e.g. "mmdit (model.diffusion_model.*) in sd3.5_large.safetensors"
    component: str  # one of COMPONENTS, or "clip" while CLIP-L/G is not yet decided
    layout: str  # e.g. "original single file", "ComfyUI all-in-one", "diffusers folder"
    files: tuple[Path, ...]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def nbytes(self, key: str) -> int:
        raise NotImplementedError

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        return key in set(self.keys())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {len(self.keys())} keys>"


class FileSource(TensorSource):
    """Keys of one (logical) safetensors file, optionally under a prefix that is stripped."""

    def __init__(self, file: SafetensorsFile, component: str, key_map: Mapping[str, str], layout: str,
                 label: str = ""):
        self.file = file
        self.component = component
        self.layout = layout
        self.files = file.files
        self._full = dict(key_map)  # stripped key -> key in the file
        self.name = f"{component}{f' ({label})' if label else ''} in {file.path}"

    def keys(self) -> list[str]:
        return list(self._full)

    def __contains__(self, key: str) -> bool:
        return key in self._full

    def _key(self, key: str) -> str:
        if key not in self._full:
            raise CheckpointError(f"missing key {key} in {self.name}", str(self.file.path), [key])
        return self._full[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self.file.shape(self._key(key))

    def dtype(self, key: str) -> torch.dtype:
        return self.file.dtype(self._key(key))

    def nbytes(self, key: str) -> int:
        return self.file.nbytes(self._key(key))

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.file.get(self._key(key), device)


Plan = Mapping[str, tuple[Sequence[str], str]]


class PlannedSource(TensorSource):
    """Original keys built from another naming (diffusers) by a plan {orig: (source keys, op)}.

    Shapes and dtypes come from running the op on meta tensors: nothing is read.
    """

    def __init__(self, base: TensorSource, plan: Plan, apply_op: Callable[[str, list[torch.Tensor]], torch.Tensor],
                 component: str, layout: str, label: str = "diffusers naming, converted"):
        self.base = base
        self.plan = {k: (tuple(srcs), op) for k, (srcs, op) in plan.items()}
        self.apply_op = apply_op
        self.component = component
        self.layout = layout
        self.files = base.files
        self.name = f"{component} ({label}) in {base.name.split(' in ', 1)[-1]}"
        self._meta: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return list(self.plan)

    def __contains__(self, key: str) -> bool:
        return key in self.plan

    def _entry(self, key: str) -> tuple[tuple[str, ...], str]:
        if key not in self.plan:
            raise CheckpointError(f"missing key {key} in {self.name}", str(self.files[0]), [key])
        return self.plan[key]

    def _meta_result(self, key: str) -> torch.Tensor:
        if key not in self._meta:
            srcs, op = self._entry(key)
            parts = [torch.empty(self.base.shape(s), dtype=self.base.dtype(s), device="meta") for s in srcs]
            self._meta[key] = self.apply_op(op, parts)
        return self._meta[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta_result(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._meta_result(key).dtype

    def nbytes(self, key: str) -> int:
        return sum(self.base.nbytes(s) for s in self._entry(key)[0])

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        srcs, op = self._entry(key)
        return self.apply_op(op, [self.base.get(s, device) for s in srcs])


# ---- fp8 ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Layout:
    """How a source stores fp8: "none", "plain" (float8 weights, scale 1) or "scaled" (ComfyUI)."""

    scaling: str
    marker_dtype: torch.dtype | None  # dtype of the `scaled_fp8` marker tensor (names the format)
    fp8_keys: tuple[str, ...]  # keys stored as float8
    scale_weight: dict[str, str]  # weight key -> its `.scale_weight` key
    scale_input: tuple[str, ...]  # `.scale_input` keys (static activation scales; unused when dequantising)

    @property
    def aux_keys(self) -> frozenset[str]:
        """Keys that describe the fp8 format rather than hold model parameters."""
        keys = set(self.scale_weight.values()) | set(self.scale_input)
        if self.marker_dtype is not None:
            keys.add(FP8_MARKER)
        return frozenset(keys)


def fp8_layout(source: TensorSource) -> Fp8Layout:
    keys = source.keys()
    present = set(keys)
    fp8_keys = tuple(k for k in keys if source.dtype(k) in FP8_DTYPES and k != FP8_MARKER)
    # a `.scale_weight` without its `.weight` is left out, so the loader reports it as unexpected
    scale_weight = {k[: -len(SCALE_WEIGHT_SUFFIX)] + ".weight": k for k in keys if k.endswith(SCALE_WEIGHT_SUFFIX)
                    and k[: -len(SCALE_WEIGHT_SUFFIX)] + ".weight" in present}
    scale_input = tuple(k for k in keys if k.endswith(SCALE_INPUT_SUFFIX))
    marker = source.dtype(FP8_MARKER) if FP8_MARKER in present else None
    scaling = "scaled" if marker is not None or scale_weight else "plain" if fp8_keys else "none"
    return Fp8Layout(scaling, marker, fp8_keys, scale_weight, scale_input)


def fp8_format(source: TensorSource) -> str:
    """"none" | "plain" | "comfy_scaled" | "native" from the keys and dtypes of one component."""
    keys = source.keys()
    if any(k.endswith("." + NATIVE_WEIGHT_SCALE) for k in keys):
        return "native"
    if FP8_MARKER in keys or any(k.endswith("." + COMFY_WEIGHT_SCALE) for k in keys):
        return "comfy_scaled"
    if any(source.dtype(k) in FP8_DTYPES for k in keys):
        return "plain"
    return "none"


# ---- key families ----------------------------------------------------------------------------------------
def key_family(keys: Iterable[str]) -> str:
    """"mmdit" | "mmdit_diffusers" | "vae" | "vae_diffusers" | "clip" | "t5" | "unknown" from key names."""
    ks = set(keys)
    if "x_embedder.proj.weight" in ks or any(k.startswith("joint_blocks.") for k in ks):
        return "mmdit"
    if any(k.startswith("transformer_blocks.") for k in ks) and "pos_embed.proj.weight" in ks:
        return "mmdit_diffusers"
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in ks):
        return "vae_diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in ks) or "decoder.conv_in.weight" in ks:
        return "vae"
    if any(k.startswith("text_model.") for k in ks):
        return "clip"
    if any(k.startswith("encoder.block.") for k in ks):
        return "t5"
    return "unknown"


def clip_width(source: TensorSource) -> int:
    if CLIP_WIDTH_KEY not in source:
        raise CheckpointError(f"missing key {CLIP_WIDTH_KEY} in {source.name}: cannot tell the CLIP width",
                              str(source.files[0]), [CLIP_WIDTH_KEY])
    return source.shape(CLIP_WIDTH_KEY)[0]


def _plan_source(base: TensorSource, family: str, layout: str) -> PlannedSource:
    module, fn, component = {"mmdit_diffusers": ("diffusers_mmdit", "mmdit_plan_from_diffusers", "mmdit"),
                              "vae_diffusers": ("diffusers_vae", "vae_plan_from_diffusers", "vae")}[family]
    mod = importlib.import_module(f"sd35fp8.checkpoints.{module}")
    plan = getattr(mod, fn)(base.keys(), base.name)
    return PlannedSource(base, plan, mod.apply_op, component, layout)


def _family_error(path: Path, keys: Sequence[str]) -> CheckpointError:
    sample = ", ".join(keys[:5])
    return CheckpointError(f"{path} holds no SD3 component the loader knows (keys like {sample})", str(path),
                           list(keys[:20]))


def open_file(path: Path, layout: str | None = None) -> dict[str, TensorSource]:
    """Sources found in one safetensors file (or index). A lone CLIP whose width is not 768/1280 is "clip"."""
    sf = SafetensorsFile(path)
    keys = sf.keys()
    if any(k.startswith(tuple(PREFIXES)) for k in keys):
        groups: dict[str, dict[str, str]] = {}
        unknown = []
        for k in keys:
            prefix = next((p for p in PREFIXES if k.startswith(p)), None)
            if prefix is None:
                unknown.append(k)
                continue
            comp, inner = PREFIXES[prefix], k[len(prefix):]
            if FAMILY_OF[comp] in ("clip", "t5") and inner.startswith(TEXT_INNER_PREFIX):
                inner = inner[len(TEXT_INNER_PREFIX):]
            groups.setdefault(comp, {})[inner] = k
        if unknown:
            raise CheckpointError(f"{len(unknown)} keys in {path} belong to no SD3 component (known prefixes "
                                  f"{', '.join(PREFIXES)}): {', '.join(unknown[:10])}", str(path), unknown)
        text = any(FAMILY_OF[c] in ("clip", "t5") for c in groups)
        layout = layout or ("ComfyUI all-in-one" if text else "original single file")
        out: dict[str, TensorSource] = {}
        for comp, key_map in groups.items():
            prefix = next(p for p, c in PREFIXES.items() if c == comp)
            src = FileSource(sf, comp, key_map, layout, f"{prefix}*")
            family = key_family(key_map)
            if family != FAMILY_OF[comp]:
                raise CheckpointError(f"keys under {prefix} in {path} are {FAMILY_DESCRIPTION[family]}, "
                                      f"expected {DESCRIPTION[comp]}", str(path), list(key_map.values())[:5])
            out[comp] = src
        return out

    family = key_family(keys)
    identity = {k: k for k in keys}
    if family == "unknown":
        raise _family_error(path, keys)
    if family in ("mmdit_diffusers", "vae_diffusers"):
        base = FileSource(sf, family.split("_")[0], identity, layout or "diffusers")
        planned = _plan_source(base, family, layout or "diffusers")
        return {planned.component: planned}
    component = {"mmdit": "mmdit", "vae": "vae", "clip": "clip", "t5": "t5xxl"}[family]
    src = FileSource(sf, component, identity, layout or "single component file")
    if component == "clip":
        width = clip_width(src)
        if width in CLIP_HIDDEN:
            src.component = CLIP_HIDDEN[width]
            src.name = f"{src.component} in {sf.path}"
    return {src.component: src}


def assign_clip_slots(clips: list[TensorSource], where: str) -> dict[str, TensorSource]:
    """CLIP-L vs CLIP-G from weights: width 768 / 1280, or for a pair the narrower one is CLIP-L."""
    if len(clips) == 2 and clip_width(clips[0]) != clip_width(clips[1]):
        small, large = sorted(clips, key=clip_width)
        pairs = {"clip_l": small, "clip_g": large}
    else:
        pairs = {}
        for src in clips:
            slot = CLIP_HIDDEN.get(clip_width(src))
            if slot is None:
                raise CheckpointError(f"cannot tell whether {src.name} is CLIP-L or CLIP-G (hidden size "
                                      f"{clip_width(src)}); pass it as clip_l= or clip_g=", str(src.files[0]))
            if slot in pairs:
                raise CheckpointError(f"two {DESCRIPTION[slot]}s in {where}: {pairs[slot].name} and {src.name}",
                                      str(src.files[0]))
            pairs[slot] = src
    for slot, src in pairs.items():
        src.component = slot
        src.name = f"{slot} in {src.name.split(' in ', 1)[-1]}"
    return pairs


# ---- components and resolution ------------------------------------------------------------------------------
@dataclass
class Components:
    """What `resolve` found: one TensorSource per component (None where absent) + tokenizer folders."""

    root: str
    mmdit: TensorSource | None = None
    vae: TensorSource | None = None
    clip_l: TensorSource | None = None
    clip_g: TensorSource | None = None
    t5xxl: TensorSource | None = None
    tokenizers: dict[str, Path] = field(default_factory=dict)  # "clip_l"/"clip_g"/"t5xxl" -> folder
    notes: list[str] = field(default_factory=list)

    def get(self, component: str) -> TensorSource | None:
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        return getattr(self, component)

    def present(self) -> list[str]:
        return [c for c in COMPONENTS if getattr(self, c) is not None]

    @property
    def origins(self) -> dict[str, str]:
        """component -> where it came from (the source's name)."""
        return {c: getattr(self, c).name for c in self.present()}

    def require(self, component: str) -> TensorSource:
        src = self.get(component)
        if src is None:
            held = ", ".join(DESCRIPTION[c] for c in self.present()) or "nothing usable"
            raise CheckpointError(f"no {DESCRIPTION[component]} found in {self.root} (it holds: {held})", self.root)
        return src

    def fill(self, sources: Mapping[str, TensorSource], replace: bool = False) -> None:
        for comp, src in sources.items():
            if replace or getattr(self, comp) is None:
                setattr(self, comp, src)


def _component_file(folder: Path) -> Path | None:
    """The weights of one component folder: a sharded index, or one .safetensors (standard name first)."""
    def pick(paths: list[Path], suffix: str) -> Path | None:
        if len(paths) <= 1:
            return paths[0] if paths else None
        standard = [p for p in paths if p.name in {n + suffix for n in STANDARD_WEIGHT_NAMES}]
        if len(standard) == 1:
            return standard[0]
        raise CheckpointError(f"{folder} holds several weight files ({', '.join(p.name for p in paths)}); "
                              "pass the one to use as a file path", str(folder))

    indexes = sorted(p for p in folder.glob("*.safetensors.index*.json") if is_index(p))
    plain = [p for p in indexes if p.name.endswith(INDEX_SUFFIX)]
    index = pick(plain or indexes, INDEX_SUFFIX if plain else ".json")  # a variant index (.fp16) when alone
    if index is not None:
        return index
    found = pick(sorted(folder.glob("*.safetensors")), ".safetensors")
    if found is None and (any(folder.glob("*.bin")) or any(folder.glob("*.ckpt"))):
        raise CheckpointError(f"{folder} only has pickle weights (.bin/.ckpt): only .safetensors files are loaded",
                              str(folder))
    return found


def _open_text_encoders_folder(folder: Path, comps: Components) -> dict[str, TensorSource]:
    """`text_encoders/` of the official repos: clip_l, clip_g and one or more T5 files, told apart by keys."""
    clips: list[TensorSource] = []
    t5s: list[TensorSource] = []
    for path in sorted(folder.glob("*.safetensors")):
        for comp, src in open_file(path, "text_encoders folder").items():
            if comp in ("clip", "clip_l", "clip_g"):
                clips.append(src)
            elif comp == "t5xxl":
                t5s.append(src)
            else:
                raise CheckpointError(f"{path} in the text encoders folder holds {DESCRIPTION[comp]}", str(path))
    found: dict[str, TensorSource] = assign_clip_slots(clips, str(folder)) if clips else {}
    if t5s:
        # several T5 precisions side by side (t5xxl_fp16, t5xxl_fp8_e4m3fn): use unquantised weights first
        ranked = sorted(t5s, key=lambda s: fp8_layout(s).scaling != "none")
        found["t5xxl"] = ranked[0]
        if len(ranked) > 1:
            comps.notes.append(f"t5xxl: chose {ranked[0].files[0].name} (16/32-bit) over "
                               f"{', '.join(s.files[0].name for s in ranked[1:])}; pass t5xxl= to choose")
    return found


def _open_folder(folder: Path) -> Components:
    comps = Components(root=str(folder))
    singles = []
    for path in sorted(folder.glob("*.safetensors")):
        sf_keys = SafetensorsFile(path).keys()
        if any(k.startswith(tuple(PREFIXES)) for k in sf_keys):
            singles.append(path)
    if len(singles) > 1:
        raise CheckpointError(f"{folder} holds several single-file checkpoints ({', '.join(p.name for p in singles)}); "
                              "pass the file to use", str(folder))
    if singles:
        comps.fill(open_file(singles[0]))
    if (folder / "text_encoders").is_dir():
        comps.fill(_open_text_encoders_folder(folder / "text_encoders", comps))
    for comp, sub in DIFFUSERS_FOLDERS.items():
        if comps.get(comp) is not None or not (folder / sub).is_dir():
            continue
        path = _component_file(folder / sub)
        if path is None:
            comps.notes.append(f"{sub}/ has no weights")
            continue
        found = open_file(path, "diffusers folder")
        if comp in ("clip_l", "clip_g") and "clip" in found:
            found = {comp: found.pop("clip")}
            found[comp].component = comp
            found[comp].name = f"{comp} in {path}"
        if comp not in found:
            what = ", ".join(DESCRIPTION.get(c, c) for c in found)
            raise CheckpointError(f"{folder / sub} should hold the {DESCRIPTION[comp]} but holds {what}", str(path))
        if comp in ("clip_l", "clip_g"):
            _check_clip_slot(found[comp], comp)
        comps.fill({comp: found[comp]})
    for comp, sub in TOKENIZER_FOLDERS.items():
        if (folder / sub).is_dir():
            comps.tokenizers[comp] = folder / sub
    if not comps.present():
        weights = _component_file(folder)  # a lone component folder (e.g. .../transformer) or plain folder
        if weights is None:
            raise CheckpointError(f"no SD3 weights in folder {folder}: looked for a single-file checkpoint "
                                  f"(*.safetensors with model.diffusion_model.*), text_encoders/, diffusers "
                                  f"subfolders ({', '.join(DIFFUSERS_FOLDERS.values())}) and weight files",
                                  str(folder))
        found = open_file(weights)
        if "clip" in found:
            found = assign_clip_slots([found["clip"]], str(folder))
        comps.fill(found)
    return comps


def _check_clip_slot(src: TensorSource, slot: str) -> None:
    """A CLIP given for `slot` must not have the other CLIP's standard width."""
    width = clip_width(src)
    other = CLIP_HIDDEN.get(width)
    if other is not None and other != slot:
        raise CheckpointError(f"{src.files[0]} holds {DESCRIPTION[other]} (hidden {width}), given as {slot}",
                              str(src.files[0]))
    src.component = slot
    src.name = f"{slot} in {src.name.split(' in ', 1)[-1]}"


def _local_path(path_or_repo: str | Path) -> Path:
    text = str(path_or_repo)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if isinstance(path_or_repo, str) and looks_like_repo_id(text):
        return snapshot_dir(text)
    raise CheckpointError(f"checkpoint not found: {path} (no such file or folder)", str(path))


def open_components(path_or_repo: str | Path) -> Components:
    """Every component found at a file, folder or cached repo id (no overrides)."""
    path = _local_path(path_or_repo)
    if path.is_dir():
        comps = _open_folder(path)
    else:
        comps = Components(root=str(path))
        found = open_file(path)
        if "clip" in found:
            found = assign_clip_slots([found["clip"]], str(path))
        comps.fill(found)
    if str(path) != str(path_or_repo):
        comps.root = f"{path_or_repo} ({path})"
    return comps


def open_component(path_or_repo: str | Path, slot: str) -> TensorSource:
    """The `slot` component of a file/folder given explicitly for it (e.g. --t5xxl): wrong kinds raise."""
    path = _local_path(path_or_repo)
    if path.is_dir():
        comps = _open_folder(path)
        found = {c: comps.get(c) for c in comps.present()}
    else:
        found = open_file(path)
    clips = [found[c] for c in ("clip", "clip_l", "clip_g") if c in found]
    if slot in ("clip_l", "clip_g") and slot not in found and len(clips) == 1:
        _check_clip_slot(clips[0], slot)  # a CLIP of non-standard width is accepted for the slot given
        return clips[0]
    if slot in found:
        return found[slot]
    held = ", ".join(FAMILY_DESCRIPTION[FAMILY_OF.get(c, c)] for c in found) or "nothing usable"
    raise CheckpointError(f"{path} was given as {slot} but holds {held}, not {DESCRIPTION[slot]}", str(path))


def resolve(path_or_repo: str | Path, clip_l: str | Path | None = None, clip_g: str | Path | None = None,
            t5xxl: str | Path | None = None, vae: str | Path | None = None) -> Components:
    """Find the components of a checkpoint (file, folder or cached HF repo id); explicit paths win."""
    comps = open_components(path_or_repo)
    for slot, override in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5xxl), ("vae", vae)):
        if override is not None:
            if comps.get(slot) is not None:
                comps.notes.append(f"{slot}: {override} replaces {comps.get(slot).name}")
            comps.fill({slot: open_component(override, slot)}, replace=True)
    for comp, origin in comps.origins.items():
        log.info("%s: %s", comp, origin)
    for note in comps.notes:
        log.info("%s", note)
    return comps
