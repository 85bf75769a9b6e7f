"""ComfyUI's primitives (comfy_extras/nodes_primitive.py String, StringMultiline, Int, Float, Boolean): a value
given once and linked into one or more inputs (the current frontend's primitive nodes). A string reaches the
encoder nodes through a link, where the server's token budget cuts it too (server/prompt_text.py); an Int
linked into a width, height, batch size or steps counts in the server's work budget as the literal would
(server/validation.py prompt_work)."""

from __future__ import annotations

import sys

from sd35fp8.workflow.node_base import Node

JS_SAFE_INT = 2**53 - 1


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


class PrimitiveInt(PrimitiveString):
    RETURN_TYPES = ("INT",)
    DISPLAY_NAME = "Int"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"value": ("INT", {"min": -sys.maxsize, "max": sys.maxsize,
                                               "control_after_generate": True})}}


class PrimitiveFloat(PrimitiveString):
    RETURN_TYPES = ("FLOAT",)
    DISPLAY_NAME = "Float"

    @classmethod
    def INPUT_TYPES(cls, folders):
        # ComfyUI: +-sys.maxsize, which a float cannot hold (its rounding lands past the bound); the largest
        # integer a JavaScript number (what the web UI sends) holds exactly instead
        return {"required": {"value": ("FLOAT", {"min": -JS_SAFE_INT, "max": JS_SAFE_INT, "step": 0.1})}}


class PrimitiveBoolean(PrimitiveString):
    RETURN_TYPES = ("BOOLEAN",)
    DISPLAY_NAME = "Boolean"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"value": ("BOOLEAN", {})}}


PRIMITIVE_NODES = {cls.__name__: cls for cls in (PrimitiveString, PrimitiveStringMultiline, PrimitiveInt,
                                                  PrimitiveFloat, PrimitiveBoolean)}
