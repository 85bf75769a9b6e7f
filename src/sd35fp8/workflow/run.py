"""`sd35fp8 run WORKFLOW.json [--models DIR] [--set 3.seed=42]`: one workflow, from the shell.

Accepts an API-format prompt (optionally wrapped as {"prompt": ...}), a UI-format workflow, or an
image that carries one as ComfyUI writes it: PNG text chunks "prompt" / "workflow" (SaveImage), WebP
or JPEG EXIF entries "prompt:{...}" / "workflow:{...}" (0x0110 Model / 0x010F Make).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd35fp8.errors import InputError
from sd35fp8.workflow.executor import ExecutionResult, Hooks, PromptExecutor, PromptValidationError
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.graph import parse_prompt
from sd35fp8.workflow.ui_convert import is_ui_workflow, ui_to_api
from sd35fp8.workflow.validate import validate_prompt


def parse_set(item: str) -> tuple[str, str, Any]:
    """'3.seed=42' -> ("3", "seed", 42). The value is JSON when it parses, else the raw string."""
    target, sep, raw = item.partition("=")
    node_id, dot, name = target.partition(".")
    if not sep or not dot or not node_id or not name:
        raise InputError(f"--set expects NODE_ID.INPUT=VALUE (e.g. 3.seed=42), got {item!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node_id, name, value


def apply_sets(prompt: dict[str, dict], sets: Sequence[str]) -> None:
    for item in sets:
        node_id, name, value = parse_set(item)
        if node_id not in prompt:
            raise InputError(f"--set {item!r}: no node {node_id!r} in the workflow (nodes: {', '.join(prompt)})")
        inputs = prompt[node_id].get("inputs", {})
        if name not in inputs:
            raise InputError(f"--set {item!r}: node {node_id} ({prompt[node_id].get('class_type')}) has no input "
                             f"{name!r} (its inputs: {', '.join(inputs) or 'none'})")
        inputs[name] = value


IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")


def embedded_workflow(path: Path) -> tuple[Any, Any]:
    """(API prompt or None, UI workflow or None) embedded in an image by ComfyUI."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
            for tag in (0x0110, 0x010F):  # EXIF Model / Make: "prompt:{json}" / "workflow:{json}"
                value = im.getexif().get(tag)
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                if isinstance(value, str) and ":" in value:
                    key, _, body = value.partition(":")
                    text.setdefault(key.strip(), body)
    except (OSError, UnidentifiedImageError) as e:
        raise InputError(f"cannot read image {path}: {e}") from e
    found = []
    for key in ("prompt", "workflow"):
        try:
            found.append(json.loads(text[key]) if key in text else None)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: the embedded {key!r} is not valid JSON: {e}") from e
    return found[0], found[1]


def load_workflow(path: str | Path, folders: ModelFolders | None = None) -> tuple[dict, dict]:
    """Read a workflow file -> (API prompt, extra_pnginfo). UI files also go into the PNG as 'workflow'.

    An image runs the API prompt it carries (exactly what produced it), else its UI workflow."""
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        prompt, workflow = embedded_workflow(Path(path))
        extra = {"workflow": workflow} if workflow is not None else {}
        if prompt is not None:
            return parse_prompt(prompt), extra
        if workflow is not None and is_ui_workflow(workflow):
            return ui_to_api(workflow, folders=folders), extra
        raise InputError(f"{path} carries no ComfyUI workflow (no 'prompt' or 'workflow' text chunk / EXIF entry)")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read workflow {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise InputError(f"workflow {path} is not valid JSON: {e}") from e
    if is_ui_workflow(data):
        return ui_to_api(data, folders=folders), {"workflow": data}
    extra = {}
    if isinstance(data, dict) and isinstance(data.get("extra_data"), dict):
        extra = dict(data["extra_data"].get("extra_pnginfo") or {})
    return parse_prompt(data), extra


def run_workflow(path: str | Path, models_dir: str | Path, output_dir: str | Path | None = None,
                 sets: Sequence[str] = (), device: str = "cpu", dtype: Any = None,
                 hooks: Hooks | None = None, extra_model_paths: str | Path | None = None,
                 executor: PromptExecutor | None = None, compile: bool | None = None,
                 offload: str = "none", attention: str = "auto", cache_threshold: float = 0.0) -> ExecutionResult:
    """Load, override (--set), validate and execute one workflow; raises on validation errors.
    compile / offload: the new executor's (PromptExecutor; None = the device's default)."""
    folders = executor.folders if executor is not None else ModelFolders(
        models_dir, output_dir=output_dir, extra_config=extra_model_paths)
    prompt, extra_pnginfo = load_workflow(path, folders)
    apply_sets(prompt, sets)
    ex = executor or PromptExecutor(folders, device=device, dtype=dtype, compile=compile, offload=offload,
                                    attention=attention, cache_threshold=cache_threshold)
    ok, error, outputs, node_errors = validate_prompt(prompt, ex.classes, folders)
    if not ok:
        raise PromptValidationError(error, node_errors)
    extra_data = {"extra_pnginfo": extra_pnginfo} if extra_pnginfo else {}
    result = ex.execute(prompt, prompt_id=str(uuid.uuid4()), extra_data=extra_data, hooks=hooks,
                        execute_outputs=outputs)
    result.output_dir = Path(folders.output_dir)
    return result
