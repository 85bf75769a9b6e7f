"""ComfyUI's generic utility nodes that its newer workflow templates use, model-agnostic:

- ResolutionSelector (comfy_extras/nodes_resolution.py): width / height from an aspect ratio and megapixels,
  rounded to a multiple (the newest schema, with the advanced `multiple` input the templates set to 8/16/32).
- ComfySwitchNode (comfy_extras/nodes_logic.py, "If/Else Switch"): on_true or on_false by a boolean.
- ComfyMathExpression (comfy_extras/nodes_math.py, "Math Expression"): a numeric expression over inputs a..z,
  FLOAT, INT and BOOL out. ComfyUI evaluates it with simpleeval; here a small AST evaluator of our own
  (never Python's eval) takes the same language and ComfyUI's functions, with tighter bounds (below).
- ImageCompare (comfy_extras/nodes_image_compare.py): an output node that previews image_a / image_b for the
  frontend's compare slider (ui "a_images" / "b_images", temp files like PreviewImage).
- BatchImagesNode (comfy_extras/nodes_post_processing.py, "Batch Images"): its images.image0 .. image49 into one
  batch, as ComfyUI's batch_images.
- SaveImageAdvanced (comfy_extras/nodes_images.py, "Save Image (Advanced)"): png at 8 or 16 bits (Pillow / our
  16-bit PNG writer), through SaveImage's engine.save_images (output-folder rules, counters, tEXt prompt /
  workflow), files `{prefix}_{counter:05}.png`, the images passed on. ComfyUI's exr and avif (PyAV encoders)
  are refused with an InputError naming the format.
- SaveText (comfy_extras/nodes_text.py, "Save Text"): the text as `{prefix}_{counter:05}.txt|md|json` (json
  pretty-printed when it parses), placed as SaveImage's files; at most MAX_SAVE_TEXT_BYTES written.

V3 input kinds, as we declare them (our INPUT_TYPES has no v3 schema):
- io.MatchType (Switch's on_false / on_true / output) is the any-type "*": a link of any type is taken, and
  the output links to any input. ComfyUI checks that both sides share one type; we do not.
- io.DynamicCombo (SaveImageAdvanced's format) is its flattened inputs, as the frontend names them in the API
  prompt: "format" and its option's "format.bit_depth", "format.input_color_space", declared optional with the
  union of every option's values; the node checks that they belong to the chosen format.
- io.Autogrow (Math's values, Batch's images) is its flattened inputs, as the frontend names them in the API
  prompt ("values.a" .. "values.z", "images.image0" .. "images.image49"), all optional; the node checks
  ComfyUI's minimum itself.
- lazy inputs: our executor runs every linked input before the node, so a Switch evaluates both branches
  (same result as ComfyUI, more work; ComfyUI evaluates only the selected one).

Bounds of the math evaluator (a server runs it on any client's text): the expression at most MAX_EXPRESSION
characters and MAX_NODES syntax nodes; an exponent (`**` or pow) at most MAX_EXPONENT in magnitude (ComfyUI's
pow() cap, here also on `**`, where simpleeval allows 4 000 000); every integer at most MAX_INT_BITS bits,
checked before a product / power / shift is computed; round() to at most MAX_EXPONENT digits. Attribute
access and strings are refused (simpleeval allows attributes without a leading underscore); the templates use
neither. Every failure is an InputError naming the expression.
"""

from __future__ import annotations

import ast
import math
import operator as op
import string
from typing import Any

import torch
import torch.nn.functional as F

from sd35fp8.errors import InputError
from sd35fp8.image_ops import common_upscale
from sd35fp8.workflow import engine
from sd35fp8.workflow.node_base import Node
from sd35fp8.workflow.nodes_image import check_image

# --- ResolutionSelector ------------------------------------------------------------------------------------

ASPECT_RATIOS: dict[str, tuple[int, int]] = {  # ComfyUI's AspectRatio enum, in its order
    "1:1 (Square)": (1, 1),
    "2:3 (Portrait Photo)": (2, 3),
    "3:2 (Photo)": (3, 2),
    "3:4 (Portrait Standard)": (3, 4),
    "4:3 (Standard)": (4, 3),
    "9:16 (Portrait Widescreen)": (9, 16),
    "16:9 (Widescreen)": (16, 9),
    "21:9 (Ultrawide)": (21, 9),
}


class ResolutionSelector(Node):
    RETURN_TYPES = ("INT", "INT")
    RETURN_NAMES = ("width", "height")
    OUTPUT_TOOLTIPS = ("Calculated width in pixels multiplied by the selected multiple.",
                       "Calculated height in pixels multiplied by the selected multiple.")
    FUNCTION = "execute"
    CATEGORY = "utilities"
    DISPLAY_NAME = "Resolution Selector"
    DESCRIPTION = ("Calculate width and height from aspect ratio and megapixel target. Useful for setting up Empty "
                   "Latent Image dimensions.")
    PYTHON_MODULE = "comfy_extras.nodes_resolution"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "aspect_ratio": (list(ASPECT_RATIOS), {"default": "1:1 (Square)",
                                                   "tooltip": "The aspect ratio for the output dimensions."}),
            "megapixels": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 16.0, "step": 0.1,
                                     "tooltip": "Target total megapixels. 1.0 MP ≈ 1024x1024 for square."}),
            "multiple": ("INT", {"default": 8, "min": 8, "max": 128, "step": 4, "advanced": True,
                                 "tooltip": "Nearest multiple of the result to set the selected resolution to."}),
        }}

    def execute(self, aspect_ratio, megapixels, multiple=8):
        if aspect_ratio not in ASPECT_RATIOS:
            raise InputError(f"ResolutionSelector: unknown aspect_ratio {aspect_ratio!r}")
        if not (isinstance(megapixels, (int, float)) and math.isfinite(megapixels) and megapixels > 0):
            raise InputError(f"ResolutionSelector: megapixels must be a positive number, got {megapixels!r}")
        if not isinstance(multiple, int) or multiple <= 0:
            raise InputError(f"ResolutionSelector: multiple must be a positive integer, got {multiple!r}")
        w_ratio, h_ratio = ASPECT_RATIOS[aspect_ratio]
        scale = math.sqrt(megapixels * 1024 * 1024 / (w_ratio * h_ratio))
        return (round(w_ratio * scale / multiple) * multiple, round(h_ratio * scale / multiple) * multiple)


# --- ComfySwitchNode ---------------------------------------------------------------------------------------

_MISSING = object()


class ComfySwitchNode(Node):
    RETURN_TYPES = ("*",)
    RETURN_NAMES = ("output",)
    FUNCTION = "execute"
    CATEGORY = "utilities/logic"
    DISPLAY_NAME = "If/Else Switch"
    PYTHON_MODULE = "comfy_extras.nodes_logic"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"switch": ("BOOLEAN", {})},
                "optional": {"on_false": ("*", {"lazy": True}), "on_true": ("*", {"lazy": True})}}

    def execute(self, switch, on_true=_MISSING, on_false=_MISSING):
        selected = on_true if switch else on_false
        return (None if selected is _MISSING else selected,)


# --- ComfyMathExpression -----------------------------------------------------------------------------------

MAX_EXPONENT = 4000
MAX_INT_BITS = 1 << 14
MAX_EXPRESSION = 10_000
MAX_NODES = 2_000
VALUE_NAMES = list(string.ascii_lowercase)


class _MathError(Exception):
    pass


def _check_int(x: Any) -> Any:
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > MAX_INT_BITS:
        raise _MathError(f"an integer of {x.bit_length()} bits; at most {MAX_INT_BITS}")
    return x


def _bits(x: Any) -> int:
    return abs(int(x)).bit_length() if isinstance(x, int) else 0


def _safe_pow(base: Any, exp: Any) -> Any:
    if abs(exp) > MAX_EXPONENT:  # ComfyUI's _safe_pow message
        raise _MathError(f"Exponent {exp} exceeds maximum allowed ({MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 and _bits(base) * exp > MAX_INT_BITS + exp:
        raise _MathError(f"{base} ** {exp} would exceed {MAX_INT_BITS} bits")
    return pow(base, exp)


def _safe_mul(a: Any, b: Any) -> Any:
    if _bits(a) + _bits(b) > MAX_INT_BITS + 1:
        raise _MathError(f"a product of more than {MAX_INT_BITS} bits")
    return a * b


def _safe_lshift(a: Any, b: Any) -> Any:
    if isinstance(b, int) and b > 0 and _bits(a) + b > MAX_INT_BITS:
        raise _MathError(f"a shift to more than {MAX_INT_BITS} bits")
    return a << b


def _variadic_sum(*args):
    """ComfyUI: both sum(values) and sum(a, b, c)."""
    if len(args) == 1 and hasattr(args[0], "__iter__"):
        return sum(args[0])
    return sum(args)


def _round(x, ndigits=None):
    if ndigits is not None and abs(ndigits) > MAX_EXPONENT:
        raise _MathError(f"round() to {ndigits} digits; at most {MAX_EXPONENT}")
    return round(x) if ndigits is None else round(x, ndigits)


MATH_FUNCTIONS = {  # ComfyUI's MATH_FUNCTIONS
    "sum": _variadic_sum, "min": min, "max": max, "abs": abs, "round": _round, "pow": _safe_pow,
    "sqrt": math.sqrt, "ceil": math.ceil, "floor": math.floor, "log": math.log, "log2": math.log2,
    "log10": math.log10, "sin": math.sin, "cos": math.cos, "tan": math.tan, "int": int, "float": float,
}

_BINOPS = {  # simpleeval's DEFAULT_OPERATORS (binary), with our guards
    ast.Add: op.add, ast.Sub: op.sub, ast.Mult: _safe_mul, ast.Div: op.truediv, ast.FloorDiv: op.floordiv,
    ast.Pow: _safe_pow, ast.Mod: op.mod, ast.BitXor: op.xor, ast.BitOr: op.or_, ast.BitAnd: op.and_,
    ast.LShift: _safe_lshift, ast.RShift: op.rshift,
}
_UNARY = {ast.USub: op.neg, ast.UAdd: op.pos, ast.Not: op.not_, ast.Invert: op.invert}
_COMPARE = {ast.Eq: op.eq, ast.NotEq: op.ne, ast.Gt: op.gt, ast.Lt: op.lt, ast.GtE: op.ge, ast.LtE: op.le,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b, ast.Is: op.is_, ast.IsNot: op.is_not}


class _Evaluator:
    def __init__(self, names: dict[str, Any]):
        self.names = names

    def eval(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (int, float)) or node.value is None:  # bools are ints
                return _check_int(node.value)
            raise _MathError(f"{type(node.value).__name__} constants are not supported")
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in MATH_FUNCTIONS:
                raise _MathError(f"{node.id} is a function: call it")
            raise _MathError(f"'{node.id}' is not defined")
        if isinstance(node, ast.BinOp):
            fn = _BINOPS.get(type(node.op))
            if fn is None:
                raise _MathError(f"operator {type(node.op).__name__} is not supported")
            left, right = self.eval(node.left), self.eval(node.right)
            self._numbers(left, right)
            return _check_int(fn(left, right))
        if isinstance(node, ast.UnaryOp):
            fn = _UNARY.get(type(node.op))
            if fn is None:
                raise _MathError(f"operator {type(node.op).__name__} is not supported")
            operand = self.eval(node.operand)
            if not isinstance(node.op, ast.Not):
                self._numbers(operand)
            return fn(operand)
        if isinstance(node, ast.BoolOp):  # and / or, short-circuit as Python
            result = None
            for value in node.values:
                result = self.eval(value)
                if isinstance(node.op, ast.And) and not result or isinstance(node.op, ast.Or) and result:
                    return result
            return result
        if isinstance(node, ast.Compare):
            left = self.eval(node.left)
            for cmp, right_node in zip(node.ops, node.comparators):
                right = self.eval(right_node)
                fn = _COMPARE.get(type(cmp))
                if fn is None:
                    raise _MathError(f"comparison {type(cmp).__name__} is not supported")
                if not fn(left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in MATH_FUNCTIONS:
                name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
                raise _MathError(f"function '{name}' is not defined")
            if node.keywords:
                raise _MathError("keyword arguments are not supported")
            args = [self.eval(a) for a in node.args]
            return _check_int(MATH_FUNCTIONS[node.func.id](*args))
        if isinstance(node, ast.Subscript):  # values[i]
            container, index = self.eval(node.value), self.eval(node.slice)
            if not isinstance(container, list) or not isinstance(index, int):
                raise _MathError("only values[<integer>] may be indexed")
            return container[index]
        if isinstance(node, (ast.List, ast.Tuple)):
            if len(node.elts) > len(VALUE_NAMES):
                raise _MathError(f"at most {len(VALUE_NAMES)} items in a list")
            return [self.eval(e) for e in node.elts]
        raise _MathError(f"{type(node).__name__} is not supported in a math expression")

    @staticmethod
    def _numbers(*xs: Any) -> None:
        for x in xs:
            if not isinstance(x, (int, float)):
                raise _MathError(f"arithmetic on a {type(x).__name__} is not supported")


def evaluate_expression(expression: str, names: dict[str, Any]) -> Any:
    """The value of `expression` over `names` (simpleeval's language and ComfyUI's functions, bounded)."""
    if len(expression) > MAX_EXPRESSION:
        raise _MathError(f"the expression has {len(expression)} characters; at most {MAX_EXPRESSION}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise _MathError(f"invalid syntax: {e.msg}") from None
    except (RecursionError, MemoryError, ValueError) as e:
        raise _MathError(f"cannot parse it: {type(e).__name__}") from None
    count = sum(1 for _ in ast.walk(tree))
    if count > MAX_NODES:
        raise _MathError(f"the expression has {count} syntax nodes; at most {MAX_NODES}")
    return _Evaluator(names).eval(tree)


class ComfyMathExpression(Node):
    RETURN_TYPES = ("FLOAT", "INT", "BOOLEAN")
    RETURN_NAMES = ("FLOAT", "INT", "BOOL")
    FUNCTION = "execute"
    CATEGORY = "utilities"
    DISPLAY_NAME = "Math Expression"
    PYTHON_MODULE = "comfy_extras.nodes_math"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"expression": ("STRING", {"default": "a", "multiline": True})},
                "optional": {f"values.{n}": ("FLOAT,INT,BOOLEAN", {}) for n in VALUE_NAMES}}

    def execute(self, expression, **values):
        if not isinstance(expression, str) or not expression.strip():
            raise InputError("Expression cannot be empty.")
        given = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("values.") and v is not None}
        context: dict[str, Any] = {n: given[n] for n in VALUE_NAMES if n in given}  # ComfyUI: dict(values)
        for n, v in context.items():
            if not isinstance(v, (int, float)):
                raise InputError(f"Math Expression: value {n} must be a number or boolean, got {type(v).__name__}")
        context["values"] = list(context.values())
        try:
            result = evaluate_expression(expression, context)
            if not isinstance(result, (int, float)):
                raise _MathError(f"must evaluate to a numeric result, got {type(result).__name__}: {result!r}")
            try:
                float_result = float(result)
            except OverflowError:
                raise _MathError(f"produced a result too large to represent as a float: {result}") from None
            if not math.isfinite(float_result):
                raise _MathError(f"produced a non-finite result: {result}")
            return (float_result, int(result), bool(result))
        except _MathError as e:
            raise InputError(f"Math Expression '{expression[:200]}' {e}") from None
        except (ArithmeticError, ValueError, TypeError, IndexError, RecursionError, MemoryError) as e:
            raise InputError(f"Math Expression '{expression[:200]}' failed: {type(e).__name__}: {e}") from None


# --- ImageCompare ------------------------------------------------------------------------------------------


class ImageCompare(Node):
    RETURN_TYPES = ()
    FUNCTION = "execute"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DISPLAY_NAME = "Image Compare"
    DESCRIPTION = "Compares two images side by side with a slider."
    PYTHON_MODULE = "comfy_extras.nodes_image_compare"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        # compare_view is ComfyUI's IO.ImageCompare widget (required there, "IMAGECOMPARE"): the frontend's
        # slider, whose value the node ignores. Optional here, so an API prompt without it validates.
        return {"required": {},
                "optional": {"image_a": ("IMAGE",), "image_b": ("IMAGE",), "compare_view": ("IMAGECOMPARE", {})}}

    def _preview(self, images, prefix: str) -> list[dict[str, str]]:
        check_image("ImageCompare", prefix, images)
        return engine.save_images(images, self.ctx.folders.temp_dir, prefix + engine.random_suffix(5), None, None,
                                  folder_type="temp", compress_level=1)

    def execute(self, image_a=None, image_b=None, compare_view=None):
        result: dict[str, list] = {"a_images": [], "b_images": []}
        if image_a is not None and len(image_a) > 0:  # ComfyUI: PreviewImage.save_images(image_a, "comfy.compare.a")
            result["a_images"] = self._preview(image_a, "comfy.compare.a")
        if image_b is not None and len(image_b) > 0:
            result["b_images"] = self._preview(image_b, "comfy.compare.b")
        return {"ui": result}


# --- BatchImagesNode ---------------------------------------------------------------------------------------

BATCH_MIN, BATCH_MAX = 2, 50


def batch_images(images: list[torch.Tensor]) -> torch.Tensor:
    """ComfyUI's batch_images: channels padded (opaque alpha) to the most, each resized (bilinear, center crop)
    to the first's size, concatenated."""
    max_channels = max(image.shape[-1] for image in images)
    padded = []
    for image in images:
        if image.shape[-1] < max_channels:
            image = F.pad(image, (0, 1), mode="constant", value=1.0)
        if image.shape[-1] != max_channels:
            raise InputError(f"BatchImagesNode: cannot batch images of {image.shape[-1]} and {max_channels} channels")
        padded.append(image)
    first = padded[0].shape
    resized = [image if image.shape[1:] == first[1:] else
               common_upscale(image.movedim(-1, 1), first[2], first[1], "bilinear", "center").movedim(1, -1)
               for image in padded]
    return torch.cat(resized, dim=0)


class BatchImagesNode(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "execute"
    CATEGORY = "image"
    DISPLAY_NAME = "Batch Images"
    PYTHON_MODULE = "comfy_extras.nodes_post_processing"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {}, "optional": {f"images.image{i}": ("IMAGE",) for i in range(BATCH_MAX)}}

    def execute(self, **images):
        given = [(int(k[len("images.image"):]), v) for k, v in images.items()
                 if k.startswith("images.image") and k[len("images.image"):].isdigit() and v is not None]
        given = [v for _, v in sorted(given, key=lambda kv: kv[0])]
        if len(given) < BATCH_MIN:
            raise InputError(f"BatchImagesNode: at least {BATCH_MIN} images must be connected, got {len(given)}")
        for i, image in enumerate(given):
            check_image("BatchImagesNode", f"image{i}", image)
        return (batch_images(given),)



# --- SaveImageAdvanced -------------------------------------------------------------------------------------

SAVE_FORMATS = ["png", "exr", "avif"]  # ComfyUI's DynamicCombo options, in its order
# each format's sub-inputs (ComfyUI: format -> DynamicCombo.Option(name, [bit_depth, input_color_space, ...]))
FORMAT_BIT_DEPTHS = {"png": ["8-bit", "16-bit"], "exr": ["32-bit float"],
                     "avif": ["auto", "8-bit YUV420", "10-bit YUV420"]}
FORMAT_COLOR_SPACES = {"png": ["sRGB"], "exr": ["sRGB", "HDR", "linear"], "avif": ["sRGB", "HDR", "HDR PQ"]}
SUPPORTED_SAVE_FORMATS = ("png",)  # exr / avif: ComfyUI encodes them with PyAV (OpenEXR, SVT-AV1); not here


def _union(per_format: dict[str, list[str]]) -> list[str]:
    return list(dict.fromkeys(v for values in per_format.values() for v in values))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png16(image: torch.Tensor, f: Any, texts: dict[str, str]) -> None:
    """One image [H, W, C] (C 1 / 3 / 4: gray / RGB / RGBA) as a 16-bit PNG (Pillow writes 16 bits only for
    grayscale), values as ComfyUI's: (x * 65535).clamp(0, 65535) truncated; the texts as tEXt chunks."""
    import struct
    import zlib

    import numpy as np

    h, w, c = image.shape
    arr = (image.float() * 65535.0).clamp(0, 65535).to(torch.int32).cpu().numpy().astype(">u2")
    rows = arr.reshape(h, w * c).view(np.uint8)
    raw = np.hstack([np.zeros((h, 1), np.uint8), rows]).tobytes()  # filter type 0 before each row
    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)))
    for key, text in texts.items():
        f.write(_png_chunk(b"tEXt", key.encode("latin-1", "replace")[:79] + b"\0" + text.encode("latin-1", "replace")))
    f.write(_png_chunk(b"IDAT", zlib.compress(raw, 4)))
    f.write(_png_chunk(b"IEND", b""))


def encode_png8(image: torch.Tensor, f: Any, texts: dict[str, str]) -> None:
    """One image [H, W, C] (C 1 / 3 / 4) as an 8-bit PNG, SaveImage's pixels and metadata."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, text in texts.items():
        meta.add_text(key, text)
    arr = engine.pixels_uint8(image)
    img = Image.fromarray(arr[..., 0], "L") if arr.shape[-1] == 1 else Image.fromarray(arr)
    img.save(f, format="PNG", pnginfo=meta, compress_level=4)


class SaveImageAdvanced(Node):
    """ComfyUI's SaveImageAdvanced (comfy_extras/nodes_images.py, "Save Image (Advanced)"). Its `format` is a
    DynamicCombo, flattened here as the frontend names it in the API prompt: "format" (png / exr / avif) and its
    option's sub-inputs "format.bit_depth", "format.input_color_space" (declared as the union of every option's
    values; the node checks the pair). Files `{prefix}_{counter:05}.{format}`, named and placed as SaveImage's
    (engine.save_images: output-folder rules, counters, metadata tEXt prompt / workflow). The images pass through."""

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "save_images"
    OUTPUT_NODE = True
    CATEGORY = "image"
    DISPLAY_NAME = "Save Image (Advanced)"
    DESCRIPTION = "Saves the input images to your ComfyUI output directory."
    PYTHON_MODULE = "comfy_extras.nodes_images"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": (
                    "The prefix for the file to save. May include formatting tokens such as %date:yyyy-MM-dd% "
                    "or %Empty Latent Image.width%.")}),
                "format": (list(SAVE_FORMATS), {"default": "png",
                                                "tooltip": "The file format in which to save the image."}),
            },
            "optional": {
                "format.bit_depth": (_union(FORMAT_BIT_DEPTHS), {"default": "8-bit", "advanced": True}),
                "format.input_color_space": (_union(FORMAT_COLOR_SPACES), {"default": "sRGB", "advanced": True}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save_images(self, images, filename_prefix="ComfyUI", format="png", prompt=None, extra_pnginfo=None,
                    **sub):
        fmt = format
        bit_depth = sub.get("format.bit_depth")
        color_space = sub.get("format.input_color_space")
        if fmt not in SAVE_FORMATS:
            raise InputError(f"SaveImageAdvanced: format {fmt!r} is not one of {SAVE_FORMATS}")
        bit_depth = FORMAT_BIT_DEPTHS[fmt][0] if bit_depth is None else bit_depth
        color_space = "sRGB" if color_space is None else color_space
        if bit_depth not in FORMAT_BIT_DEPTHS[fmt]:
            raise InputError(f"SaveImageAdvanced: bit_depth {bit_depth!r} is not one of {fmt}'s "
                             f"{FORMAT_BIT_DEPTHS[fmt]}")
        if color_space not in FORMAT_COLOR_SPACES[fmt]:
            raise InputError(f"SaveImageAdvanced: input_color_space {color_space!r} is not one of {fmt}'s "
                             f"{FORMAT_COLOR_SPACES[fmt]}")
        if fmt not in SUPPORTED_SAVE_FORMATS:
            raise InputError(f"SaveImageAdvanced: format {fmt!r} is not supported here (ComfyUI encodes it with "
                             f"PyAV); use 'png' (8-bit or 16-bit)")
        if not isinstance(filename_prefix, str):
            raise InputError("SaveImageAdvanced: filename_prefix must be a string, got "
                             f"{type(filename_prefix).__name__}")
        if isinstance(images, torch.Tensor) and images.ndim == 3:
            images = images.unsqueeze(-1)  # ComfyUI: a channel-less [H, W] image is grayscale
        check_image("SaveImageAdvanced", "images", images)
        if images.shape[0] == 0:
            raise InputError("SaveImageAdvanced: images is an empty batch")
        if images.shape[-1] not in (1, 3, 4):
            raise InputError(f"SaveImageAdvanced: no {fmt}/{bit_depth} encoder for {images.shape[-1]}-channel "
                             "images: supported channel counts are 1 (grayscale), 3 (RGB) and 4 (RGBA).")
        encode = encode_png16 if bit_depth == "16-bit" else encode_png8
        saved = engine.save_images(images, self.ctx.folders.output_dir, filename_prefix, prompt, extra_pnginfo,
                                   folder_type="output", compress_level=4, ext=f".{fmt}", sep="",
                                   encode=encode)
        return {"ui": {"images": saved}, "result": (images,)}


# --- SaveText ----------------------------------------------------------------------------------------------

SAVE_TEXT_FORMATS = ["txt", "md", "json"]
MAX_SAVE_TEXT_BYTES = 16 * 1024 * 1024  # what one SaveText writes at most (UTF-8); ComfyUI has no bound


def _pretty_json(data: Any) -> str:
    """json.dumps(data, indent=2, ensure_ascii=False), stopped once past MAX_SAVE_TEXT_BYTES characters: indenting
    deep nesting multiplies the size (a big array 1000 levels down: every element after 2000 spaces)."""
    import json

    out, size = [], 0
    for chunk in json.JSONEncoder(indent=2, ensure_ascii=False).iterencode(data):
        size += len(chunk)
        if size > MAX_SAVE_TEXT_BYTES:
            raise InputError(f"SaveText: the pretty-printed JSON is over {MAX_SAVE_TEXT_BYTES} characters; at most "
                             f"{MAX_SAVE_TEXT_BYTES} bytes are written")
        out.append(chunk)
    return "".join(out)


class SaveText(Node):
    """ComfyUI's SaveText (comfy_extras/nodes_text.py, SaveTextNode): the text into
    `{prefix}_{counter:05}.{format}` in the output folder (json: pretty-printed when it parses, else as is),
    named and placed as SaveImage's files (the prefix's subfolders inside the output folder, never outside);
    at most MAX_SAVE_TEXT_BYTES. ui: the text and the file; the text passes through."""

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("text",)
    FUNCTION = "execute"
    OUTPUT_NODE = True
    CATEGORY = "text"
    DISPLAY_NAME = "Save Text"
    DESCRIPTION = "Save text content to a file in the output directory."
    PYTHON_MODULE = "comfy_extras.nodes_text"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "text": ("STRING", {"forceInput": True}),
            "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            "format": (list(SAVE_TEXT_FORMATS), {"default": "txt"}),
        }}

    def execute(self, text, filename_prefix="ComfyUI", format="txt"):
        import json

        if not isinstance(text, str):
            raise InputError(f"SaveText: text must be a string, got {type(text).__name__}")
        if not isinstance(filename_prefix, str):
            raise InputError(f"SaveText: filename_prefix must be a string, got {type(filename_prefix).__name__}")
        if format not in SAVE_TEXT_FORMATS:
            raise InputError(f"SaveText: format {format!r} is not one of {SAVE_TEXT_FORMATS}")
        if len(text) > MAX_SAVE_TEXT_BYTES:
            raise InputError(f"SaveText: the text has {len(text)} characters; at most {MAX_SAVE_TEXT_BYTES} bytes "
                             "are written")
        content = text
        if format == "json":  # ComfyUI: pretty-printed if it parses, otherwise written as is
            try:
                parsed = json.loads(text)
            except (ValueError, RecursionError):
                pass
            else:
                content = _pretty_json(parsed)
        data = content.encode("utf-8", "replace")  # a lone surrogate (JSON "\\ud800") as "?"
        if len(data) > MAX_SAVE_TEXT_BYTES:
            raise InputError(f"SaveText: the text is {len(data)} bytes (UTF-8); at most {MAX_SAVE_TEXT_BYTES}")
        saved = engine._save_one(self.ctx.folders.output_dir, filename_prefix, f".{format}", "a text file",
                                 lambda tmp, base, counter: tmp.write_bytes(data), sep="")
        return {"ui": {"text": (text,), "files": [saved]}, "result": (text,)}


UTILITY_NODES: dict[str, type[Node]] = {
    cls.__name__: cls for cls in (ResolutionSelector, ComfySwitchNode, ComfyMathExpression, ImageCompare,
                                  BatchImagesNode, SaveImageAdvanced, SaveText)
}
