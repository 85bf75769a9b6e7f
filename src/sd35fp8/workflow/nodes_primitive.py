"""ComfyUI's string primitives (comfy_extras/nodes_primitive.py String, StringMultiline): a text given once
and linked into one or more text inputs (the current frontend's "String" nodes). Their output reaches the
encoder nodes through a link; the server's token budget cuts it there too (server/prompt_text.py)."""

from __future__ import annotations

from sd35fp8.workflow.node_base import Node


class PrimitiveString(Node):
    RETURN_TYPES = ("STRING",)
    FUNCTION = "execute"
    CATEGORY = "utils/primitive"
    DISPLAY_NAME = "String"
    PYTHON_MODULE = "comfy_extras.nodes_primitive"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"value": ("STRING", {})}}

    def execute(self, value):
        return (value,)


class PrimitiveStringMultiline(PrimitiveString):
    DISPLAY_NAME = "String (Multiline)"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"value": ("STRING", {"multiline": True})}}


PRIMITIVE_NODES = {cls.__name__: cls for cls in (PrimitiveString, PrimitiveStringMultiline)}
