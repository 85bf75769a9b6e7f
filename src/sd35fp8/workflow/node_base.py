"""Base of the workflow nodes: Node (ComfyUI's class attributes), NodeContext, shared input helpers.

Split from nodes.py so that node modules (nodes.py, nodes_control.py) share it without importing
each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sd35fp8.errors import InputError
from sd35fp8.workflow.engine import EngineOptions

if TYPE_CHECKING:
    from sd35fp8.workflow.folders import ModelFolders

MAX_RESOLUTION = 16384
SEED_MAX = 0xFFFFFFFFFFFFFFFF
CLIP_TYPES = [
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
    "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image",
]
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]


@dataclass
class NodeContext:
    """What a running node may use besides its inputs (set by the executor)."""

    folders: ModelFolders
    device: Any = "cpu"
    dtype: Any = None
    node_id: str = ""
    # progress(step, total, denoised=None): a sampler's step; denoised [B, 16, h, w] (model space) feeds previews
    progress: Callable[..., None] = lambda value, total, denoised=None: None
    # image_frame(value, total, image, fmt): a whole image (encoded bytes, "PNG" or "JPEG") to the prompt's client
    # over /ws as a preview frame, with its progress (ComfyUI's ProgressBar.update_absolute with a preview)
    image_frame: Callable[[int, int, bytes, str], None] = lambda value, total, image, fmt: None
    check_interrupt: Callable[[], None] = lambda: None
    options: dict[str, Any] = field(default_factory=dict)
    engine_options: EngineOptions = field(default_factory=EngineOptions)  # compile / offload for loaders
    # (class_type, input_name, text, node_id) -> the text cut to the server's token budget; None: no bound
    text_limit: Callable[[str, str, str, str], str] | None = None

    def limit_text(self, class_type: str, input_name: str, text: str) -> str:
        """A text input as an encoder node may encode it: literal or linked, within the budget (the
        server's --max-prompt-tokens, server.prompt_text.TextBudget.limit); unchanged without one."""
        return text if self.text_limit is None else self.text_limit(class_type, input_name, text, self.node_id)


class Node:
    """Base of every node: ComfyUI's class attributes with their defaults."""

    RETURN_TYPES: tuple[str, ...] = ()
    RETURN_NAMES: tuple[str, ...] | None = None
    OUTPUT_TOOLTIPS: tuple[str, ...] | None = None
    OUTPUT_IS_LIST: tuple[bool, ...] | None = None
    FUNCTION = "run"
    OUTPUT_NODE = False
    CATEGORY = "sd"
    DESCRIPTION = ""
    DISPLAY_NAME: str | None = None
    PYTHON_MODULE = "nodes"
    EXPERIMENTAL = False
    DEPRECATED = False

    def __init__(self, ctx: NodeContext):
        self.ctx = ctx

    @classmethod
    def INPUT_TYPES(cls, folders: ModelFolders | None) -> dict[str, dict[str, tuple]]:  # noqa: N802
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls, folders: ModelFolders | None, **inputs: Any) -> Any:  # noqa: N802
        """Extra part of the cache key (ComfyUI IS_CHANGED); None = inputs say it all."""
        return None


def _files(folders: ModelFolders | None, kind: str) -> list[str]:
    return folders.get_filename_list(kind) if folders is not None else []


def _file_stamps(folders: ModelFolders | None, kind: str, *names: str) -> list | None:
    """IS_CHANGED of a loader: each file's (size, mtime), so a model file replaced on disk since it
    was cached is loaded again; one that vanished raises InputError naming it (reported, no crash)."""
    if folders is None:
        return None
    stamps = []
    for name in names:
        path = folders.get_full_path_or_raise(kind, name)
        try:
            st = path.stat()
        except OSError as e:
            raise InputError(f"model file {name!r} ({path}) cannot be read: {e.strerror}") from e
        stamps.append([name, st.st_size, st.st_mtime_ns])
    return stamps


def _tip(text: str) -> dict[str, str]:
    return {"tooltip": text}
