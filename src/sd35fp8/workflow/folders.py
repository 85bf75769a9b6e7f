"""ComfyUI-style models folder resolution (folder_paths.py + utils/extra_config.py semantics).

`ModelFolders(base_dir)` knows the kinds ComfyUI knows for this project:
checkpoints, diffusion_models (legacy name: unet), text_encoders (legacy: clip), vae, loras,
controlnet. Each kind has an ordered list of folders; `get_filename_list(kind)` lists model files
(recursively, relative names with "/"), `get_full_path(kind, name)` finds the first folder that
holds the file. Extra search paths come from an `extra_model_paths.yaml`.
"""

from __future__ import annotations

import os
from pathlib import Path

from sd35fp8.errors import InputError

# ComfyUI's folder_paths.supported_pt_extensions.
SUPPORTED_PT_EXTENSIONS = frozenset({".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

# kind -> sub-folders of <base>/models, in ComfyUI's order (first one is the default for that kind).
_DEFAULT_SUBDIRS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "diffusion_models": ("unet", "diffusion_models"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "loras": ("loras",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "vae_approx": ("vae_approx",),  # TAESD decoders for live previews (workflow/previews.py)
    "upscale_models": ("upscale_models",),  # ESRGAN-family image upscalers (workflow/nodes_upscale.py)
    "diffusers": ("diffusers",),  # diffusers-format model folders (DiffusersLoader)
}
LEGACY_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}
_EXCLUDED_DIR_NAMES = {".git"}


def canonical_kind(kind: str) -> str:
    """Map ComfyUI's legacy folder names (unet, clip) to the current ones."""
    return LEGACY_NAMES.get(kind, kind)


FOLDER_TYPES = ("output", "input", "temp")  # ComfyUI's file types (view, upload, annotated names)


def split_annotation(name: str, default: str) -> tuple[str, str]:
    """ComfyUI folder_paths.annotated_filepath: 'a.png [output]' -> ('a.png', 'output'); a name without
    a ' [input]' / ' [output]' / ' [temp]' suffix -> (name, default)."""
    for kind in FOLDER_TYPES:
        if isinstance(name, str) and name.endswith(f"[{kind}]"):
            return name[: -len(kind) - 2].rstrip(), kind
    return name, default


def safe_relative_name(name: str, what: str = "file name") -> str:
    """Reject absolute names, names that climb out of their folder ('..'), and names no filesystem takes (a NUL
    character, a part longer than 255 bytes)."""
    if not isinstance(name, str) or name == "" or "\x00" in name:
        raise InputError(f"invalid {what}: {name!r}")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or os.path.isabs(name) or (len(norm) > 1 and norm[1] == ":"):
        raise InputError(f"{what} must be relative to its models folder, got {name!r}")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or not parts:
        raise InputError(f"{what} escapes its models folder: {name!r}")
    if any(len(p.encode("utf-8", "surrogatepass")) > 255 for p in parts) or len(norm) > 4096:
        raise InputError(f"{what} is too long: {name[:80]!r}...")
    return "/".join(parts)


class ModelFolders:
    """Ordered search folders per model kind, rooted at a ComfyUI-like base directory.

    base_dir may be a ComfyUI root (holding models/) or the models/ folder itself: when
    `<base_dir>/models` exists it is used, otherwise base_dir is taken as the models folder.
    input/ output/ temp/ sit beside models/ unless given.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike,
        output_dir: str | os.PathLike | None = None,
        input_dir: str | os.PathLike | None = None,
        temp_dir: str | os.PathLike | None = None,
        extra_config: str | os.PathLike | None = None,
    ):
        base = Path(base_dir).expanduser().resolve()
        models = base / "models" if (base / "models").is_dir() else base
        root = base if models != base else base.parent
        self.base_dir = base
        self.models_dir = models
        self.output_dir = Path(output_dir).resolve() if output_dir else root / "output"
        self.input_dir = Path(input_dir).resolve() if input_dir else root / "input"
        self.temp_dir = Path(temp_dir).resolve() if temp_dir else root / "temp"
        self._paths: dict[str, list[Path]] = {
            kind: [models / sub for sub in subs] for kind, subs in _DEFAULT_SUBDIRS.items()
        }
        if extra_config is not None:
            self.load_extra_config(extra_config)

    # ---- folder registry -------------------------------------------------------------------
    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._paths)

    def folders(self, kind: str) -> list[Path]:
        kind = canonical_kind(kind)
        if kind not in self._paths:
            raise InputError(f"unknown model folder kind {kind!r}; known: {', '.join(self._paths)}")
        return list(self._paths[kind])

    def add_folder(self, kind: str, path: str | os.PathLike, is_default: bool = False) -> None:
        """ComfyUI add_model_folder_path: append, or put first when is_default."""
        kind = canonical_kind(kind)
        p = Path(os.path.normpath(os.path.abspath(os.fspath(path))))
        paths = self._paths.setdefault(kind, [])
        if p in paths:
            if is_default:
                paths.remove(p)
                paths.insert(0, p)
            return
        if is_default:
            paths.insert(0, p)
        else:
            paths.append(p)

    def load_extra_config(self, yaml_path: str | os.PathLike) -> None:
        """Read an extra_model_paths.yaml: sections with base_path, is_default and kind: sub-paths
        (one per line in a block string). Relative paths are taken from the yaml's folder."""
        import yaml

        yaml_path = Path(yaml_path)
        try:
            with open(yaml_path, encoding="utf-8") as f:
                config = yaml.safe_load(f)
        except OSError as e:
            raise InputError(f"cannot read extra model paths file {yaml_path}: {e}") from e
        except yaml.YAMLError as e:
            raise InputError(f"invalid YAML in {yaml_path}: {e}") from e
        if config is None:
            return
        if not isinstance(config, dict):
            raise InputError(f"{yaml_path}: expected sections (a mapping) at top level")
        yaml_dir = yaml_path.resolve().parent
        for section, conf in config.items():
            if conf is None:
                continue
            if not isinstance(conf, dict):
                raise InputError(f"{yaml_path}: section {section!r} must be a mapping")
            conf = dict(conf)
            base_path = conf.pop("base_path", None)
            if base_path is not None:
                base_path = os.path.expandvars(os.path.expanduser(str(base_path)))
                if not os.path.isabs(base_path):
                    base_path = os.path.abspath(os.path.join(yaml_dir, base_path))
            is_default = bool(conf.pop("is_default", False))
            for kind, value in conf.items():
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise InputError(f"{yaml_path}: {section}.{kind} must be a path string, got {value!r}")
                for line in value.split("\n"):
                    line = line.strip()
                    if not line:
                        continue
                    if base_path:
                        full = os.path.join(base_path, line)
                    elif not os.path.isabs(line):
                        full = os.path.join(yaml_dir, line)
                    else:
                        full = line
                    self.add_folder(kind, full, is_default)

    # ---- listing and lookup ----------------------------------------------------------------
    def get_filename_list(self, kind: str) -> list[str]:
        """Sorted model file names (relative, '/'-separated) across all folders of a kind."""
        names: set[str] = set()
        for folder in self.folders(kind):
            names.update(_walk_files(folder, SUPPORTED_PT_EXTENSIONS))
        return sorted(names)

    def get_full_path(self, kind: str, name: str) -> Path | None:
        """First existing file `name` in the folders of `kind`; None when absent.
        Names that are absolute or climb out with '..' raise InputError."""
        rel = safe_relative_name(name, f"{canonical_kind(kind)} file name")
        for folder in self.folders(kind):
            path = folder / rel
            if path.is_file():
                return path
        return None

    def get_full_path_or_raise(self, kind: str, name: str) -> Path:
        path = self.get_full_path(kind, name)
        if path is None:
            searched = ", ".join(str(f) for f in self.folders(kind))
            raise InputError(f"model file {name!r} not found in {canonical_kind(kind)} folders ({searched})")
        return path

    def input_images(self) -> list[str]:
        """Image files directly in input/ (LoadImage's list)."""
        if not self.input_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.input_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )

    def output_images(self) -> list[str]:
        """Image files under output/, subfolders included, newest first (LoadImageOutput's list; the web UI refreshes
        it from /internal/files/output, which lists output/'s own files)."""
        if not self.output_dir.is_dir():
            return []
        found = [p for p in self.output_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        found.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [p.relative_to(self.output_dir).as_posix() for p in found]

    def diffusers_models(self) -> list[str]:
        """Folders holding a model_index.json under the diffusers/ folders (DiffusersLoader's list, as ComfyUI)."""
        out = []
        for base in self.folders("diffusers"):
            if base.is_dir():
                for root, dirs, files in os.walk(base, followlinks=True):
                    dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIR_NAMES]
                    if "model_index.json" in files:
                        out.append(Path(os.path.relpath(root, base)).as_posix())
        return sorted(out)

    def diffusers_model_path(self, name: str) -> Path:
        rel = safe_relative_name(name, "diffusers model folder")
        for base in self.folders("diffusers"):
            if (base / rel / "model_index.json").is_file():
                return base / rel
        raise InputError(f"diffusers model folder {name!r} not found under {', '.join(map(str, self.folders('diffusers')))}"
                         " (a folder with a model_index.json)")

    def folder_of(self, kind: str) -> Path | None:
        """The folder of a ComfyUI file type ("output", "input", "temp"); None for any other."""
        return {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(kind)

    def annotated_path(self, name: str, default: str = "input", what: str = "image") -> Path:
        """ComfyUI folder_paths.get_annotated_filepath: 'a.png [output]' / '[input]' / '[temp]' picks the
        folder (else `default`); subfolders ('pasted/a.png') stay inside it. `what` names the file in errors."""
        name, kind = split_annotation(name, default)
        return self.folder_of(kind) / safe_relative_name(name, f"{kind} {what} name")

    def input_latents(self) -> list[str]:
        """.latent files directly in input/ (LoadLatent's list)."""
        if not self.input_dir.is_dir():
            return []
        return sorted(p.name for p in self.input_dir.iterdir() if p.is_file() and p.name.endswith(".latent"))

    def input_image_path(self, name: str) -> Path:
        path = self.annotated_path(name)
        if not path.is_file():
            raise InputError(f"input image {name!r} not found ({path})")
        return path


def _walk_files(folder: Path, extensions: frozenset[str]) -> list[str]:
    if not folder.is_dir():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIR_NAMES]
        for fn in filenames:
            if os.path.splitext(fn)[1].lower() in extensions:
                rel = os.path.relpath(os.path.join(dirpath, fn), folder)
                out.append(rel.replace(os.sep, "/"))
    return out
