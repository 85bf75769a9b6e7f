"""ComfyUI's PreviewAny (comfy_extras/nodes_preview_any.py, "Preview as Text"): any value shown as text in the UI
result ({"text": [value]}) and given on as a STRING.

The text is ComfyUI's: a str as it is; an int, float or bool by str(); anything else as JSON (indent 4) when it
serialises, else by str() (tensors with 6 edge items a side, ComfyUI's torch print options for this node); "None"
for no value. Our own types (MODEL, CLIP, VAE, ...) show as object.__repr__, "<module.Class object at 0x...>", as
ComfyUI's ModelPatcher and friends do (their classes define no __str__), not as a dump of their fields.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from sd35fp8.workflow.node_base import Node

_PRINT_LOCK = threading.Lock()  # torch's print options are global: one preview changes them at a time


def preview_text(source: Any) -> str:
    """ComfyUI PreviewAny.main's text of `source`."""
    if isinstance(source, str):
        return source
    if isinstance(source, (int, float, bool)):
        return str(source)
    if source is None:
        return "None"
    with _PRINT_LOCK:
        before = torch._tensor_str.PRINT_OPTS.edgeitems
        torch.set_printoptions(edgeitems=6)
        try:
            try:
                return json.dumps(source, indent=4)
            except Exception:
                try:
                    return str(source) if type(source).__module__.split(".")[0] != "sd35fp8" else object.__repr__(source)
                except Exception:
                    return "source exists, but could not be serialized."
        finally:
            torch.set_printoptions(edgeitems=before)  # ComfyUI leaves edgeitems at 6; we restore the caller's


class PreviewAny(Node):
    RETURN_TYPES = ("STRING",)
    FUNCTION = "main"
    OUTPUT_NODE = True
    CATEGORY = "utils"
    DISPLAY_NAME = "Preview as Text"
    PYTHON_MODULE = "comfy_extras.nodes_preview_any"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"source": ("*", {})}}

    def main(self, source=None):
        value = preview_text(source)
        return {"ui": {"text": (value,)}, "result": (value,)}


PREVIEW_ANY_NODES: dict[str, type[Node]] = {"PreviewAny": PreviewAny}
