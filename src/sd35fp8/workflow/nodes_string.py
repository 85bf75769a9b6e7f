"""ComfyUI's string nodes (comfy_extras/nodes_string.py): Concatenate, Substring, Length, Case Converter, Trim,
Replace, Contains, Compare, Regex Match / Extract / Replace, with ComfyUI's inputs and results. Workflows build
prompts with them before a text encoder.

Two bounds ComfyUI does not have, because a server runs these on text from anyone: a result may hold at most
MAX_CHARS characters (a Replace of "a" by 10 000 "a"s over a long prompt would otherwise fill the memory), and a
regular expression runs for at most REGEX_SECONDS (the `regex` package's timeout: a catastrophic pattern such as
"(a+)+$" stops with an error instead of holding the worker forever). Either raises InputError naming the node.
"""

from __future__ import annotations

import sys

import regex

from sd35fp8.errors import InputError
from sd35fp8.workflow.node_base import Node

MAX_CHARS = 1 << 20
REGEX_SECONDS = 2.0
_TEXT = ("STRING", {"multiline": True})
_CASE = ("BOOLEAN", {"default": True})


def _bounded(node: str, text: str) -> str:
    if len(text) > MAX_CHARS:
        raise InputError(f"{node}: the result would have {len(text)} characters; at most {MAX_CHARS}")
    return text


class _StringNode(Node):
    RETURN_TYPES = ("STRING",)
    FUNCTION = "execute"
    CATEGORY = "utils/string"
    PYTHON_MODULE = "comfy_extras.nodes_string"


class StringConcatenate(_StringNode):
    DISPLAY_NAME = "Concatenate"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string_a": _TEXT, "string_b": _TEXT,
                             "delimiter": ("STRING", {"multiline": False, "default": ""})}}

    def execute(self, string_a, string_b, delimiter):
        return (_bounded("StringConcatenate", delimiter.join((string_a, string_b))),)


class StringSubstring(_StringNode):
    DISPLAY_NAME = "Substring"

    @classmethod
    def INPUT_TYPES(cls, folders):
        index = ("INT", {"min": -sys.maxsize, "max": sys.maxsize})  # Python's slice bounds (ComfyUI declares none)
        return {"required": {"string": _TEXT, "start": index, "end": index}}

    def execute(self, string, start, end):
        return (string[start:end],)


class StringLength(_StringNode):
    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("length",)
    DISPLAY_NAME = "Length"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string": _TEXT}}

    def execute(self, string):
        return (len(string),)


class CaseConverter(_StringNode):
    DISPLAY_NAME = "Case Converter"
    MODES = {"UPPERCASE": str.upper, "lowercase": str.lower, "Capitalize": str.capitalize, "Title Case": str.title}

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string": _TEXT, "mode": (list(cls.MODES),)}}

    def execute(self, string, mode):
        return (_bounded("CaseConverter", self.MODES.get(mode, str)(string)),)  # "ß".upper() grows


class StringTrim(_StringNode):
    DISPLAY_NAME = "Trim"
    MODES = {"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string": _TEXT, "mode": (list(cls.MODES),)}}

    def execute(self, string, mode):
        return (self.MODES.get(mode, str)(string),)


class StringReplace(_StringNode):
    DISPLAY_NAME = "Replace"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string": _TEXT, "find": _TEXT, "replace": _TEXT}}

    def execute(self, string, find, replace):
        n = string.count(find) if find else len(string) + 1
        if len(string) + n * (len(replace) - len(find)) > MAX_CHARS:
            raise InputError(f"StringReplace: the result would have more than {MAX_CHARS} characters")
        return (string.replace(find, replace),)


class StringContains(_StringNode):
    RETURN_TYPES = ("BOOLEAN",)
    RETURN_NAMES = ("contains",)
    DISPLAY_NAME = "Contains"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string": _TEXT, "substring": _TEXT, "case_sensitive": _CASE}}

    def execute(self, string, substring, case_sensitive):
        if not case_sensitive:
            string, substring = string.lower(), substring.lower()
        return (substring in string,)


class StringCompare(_StringNode):
    RETURN_TYPES = ("BOOLEAN",)
    DISPLAY_NAME = "Compare"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string_a": _TEXT, "string_b": _TEXT, "mode": (["Starts With", "Ends With", "Equal"],),
                             "case_sensitive": _CASE}}

    def execute(self, string_a, string_b, mode, case_sensitive):
        a, b = (string_a, string_b) if case_sensitive else (string_a.lower(), string_b.lower())
        return ({"Equal": a == b, "Starts With": a.startswith(b), "Ends With": a.endswith(b)}.get(mode),)


def _flags(case_insensitive: bool, multiline: bool, dotall: bool) -> int:
    return ((regex.IGNORECASE if case_insensitive else 0) | (regex.MULTILINE if multiline else 0)
            | (regex.DOTALL if dotall else 0))


def _regex(node: str, fn, *args, **kw):
    """fn (regex.search / findall / finditer as a list / sub) under the timeout; None for a pattern that does not
    compile (ComfyUI's `except re.error`)."""
    try:
        return fn(*args, timeout=REGEX_SECONDS, **kw)
    except regex.error:
        return None
    except TimeoutError:
        raise InputError(f"{node}: the regular expression ran for more than {REGEX_SECONDS} s; simplify it") from None


class RegexMatch(_StringNode):
    RETURN_TYPES = ("BOOLEAN",)
    RETURN_NAMES = ("matches",)
    DISPLAY_NAME = "Regex Match"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string": _TEXT, "regex_pattern": _TEXT, "case_insensitive": _CASE,
                             "multiline": ("BOOLEAN", {"default": False}), "dotall": ("BOOLEAN", {"default": False})}}

    def execute(self, string, regex_pattern, case_insensitive, multiline, dotall):
        match = _regex("RegexMatch", regex.search, regex_pattern, string, _flags(case_insensitive, multiline, dotall))
        return (match is not None,)


class RegexExtract(_StringNode):
    DISPLAY_NAME = "Regex Extract"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string": _TEXT, "regex_pattern": _TEXT,
                             "mode": (["First Match", "All Matches", "First Group", "All Groups"],),
                             "case_insensitive": _CASE, "multiline": ("BOOLEAN", {"default": False}),
                             "dotall": ("BOOLEAN", {"default": False}),
                             "group_index": ("INT", {"default": 1, "min": 0, "max": 100})}}

    def execute(self, string, regex_pattern, mode, case_insensitive, multiline, dotall, group_index):
        flags = _flags(case_insensitive, multiline, dotall)
        if mode in ("First Match", "First Group"):
            match = _regex("RegexExtract", regex.search, regex_pattern, string, flags)
            if match is None:
                return ("",)
            if mode == "First Match":
                return (match.group(0),)
            return ((match.group(group_index) or "") if len(match.groups()) >= group_index else "",)
        if mode == "All Matches":
            found = _regex("RegexExtract", regex.findall, regex_pattern, string, flags) or []
            return (_bounded("RegexExtract", "\n".join(m[0] if isinstance(m, tuple) else m for m in found)),)
        if mode == "All Groups":
            it = _regex("RegexExtract", lambda *a, **k: list(regex.finditer(*a, **k)), regex_pattern, string, flags)
            picked = [m.group(group_index) or "" for m in it or [] if m.groups() and len(m.groups()) >= group_index]
            return (_bounded("RegexExtract", "\n".join(picked)),)
        return ("",)


class RegexReplace(_StringNode):
    DISPLAY_NAME = "Regex Replace"
    DESCRIPTION = "Find and replace text using regex patterns."

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"string": _TEXT, "regex_pattern": _TEXT, "replace": _TEXT},
                "optional": {"case_insensitive": ("BOOLEAN", {"default": True}),
                             "multiline": ("BOOLEAN", {"default": False}),
                             "dotall": ("BOOLEAN", {"default": False, "tooltip": (
                                 "When enabled, the dot (.) character will match any character including newline "
                                 "characters. When disabled, dots won't match newlines.")}),
                             "count": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": (
                                 "Maximum number of replacements to make. Set to 0 to replace all occurrences "
                                 "(default). Set to 1 to replace only the first match, 2 for the first two "
                                 "matches, etc.")})}}

    def execute(self, string, regex_pattern, replace, case_insensitive=True, multiline=False, dotall=False, count=0):
        try:  # ComfyUI lets a bad pattern or replacement fail the node: here with its message
            out = regex.sub(regex_pattern, replace, string, count=count,
                            flags=_flags(case_insensitive, multiline, dotall), timeout=REGEX_SECONDS)
        except regex.error as e:
            raise InputError(f"RegexReplace: {e}") from None
        except TimeoutError:
            raise InputError(f"RegexReplace: the regular expression ran for more than {REGEX_SECONDS} s; "
                             "simplify it") from None
        return (_bounded("RegexReplace", out),)


STRING_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    StringConcatenate, StringSubstring, StringLength, CaseConverter, StringTrim, StringReplace, StringContains,
    StringCompare, RegexMatch, RegexExtract, RegexReplace,
)}
