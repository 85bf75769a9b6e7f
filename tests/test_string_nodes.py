"""ComfyUI's string nodes (workflow/nodes_string.py) against Python's own string and `re` results (what
comfy_extras/nodes_string.py computes), and the two bounds a server needs: result size and regex time."""

from __future__ import annotations

import re

import pytest

from sd35fp8.errors import InputError
from sd35fp8.workflow import nodes_string
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, object_info


def run(name, *args, **kw):
    cls = NODE_CLASS_MAPPINGS[name]
    return getattr(cls(None), cls.FUNCTION)(*args, **kw)[0]


TEXT = "A photo of a Cat.\nThe cat sits; the CAT sleeps. ß"


def test_plain_string_nodes():
    assert run("StringConcatenate", "a", "b", ", ") == "a, b"
    assert run("StringSubstring", TEXT, 2, -3) == TEXT[2:-3]
    assert run("StringLength", TEXT) == len(TEXT)
    for mode, fn in (("UPPERCASE", str.upper), ("lowercase", str.lower), ("Capitalize", str.capitalize),
                     ("Title Case", str.title)):
        assert run("CaseConverter", TEXT, mode) == fn(TEXT)
    assert run("StringTrim", "  x \n", "Left") == "x \n" and run("StringTrim", "  x \n", "Both") == "x"
    assert run("StringReplace", TEXT, "cat", "dog") == TEXT.replace("cat", "dog")
    assert run("StringContains", TEXT, "cat sits", True) and not run("StringContains", TEXT, "CAT SITS", True)
    assert run("StringContains", TEXT, "CAT SITS", False)
    assert run("StringCompare", TEXT, "a photo", "Starts With", False) is True
    assert run("StringCompare", TEXT, "a photo", "Starts With", True) is False
    assert run("StringCompare", "x", "X", "Equal", False) is True


def test_regex_nodes_match_re():
    pat = r"(c)(at)"
    flags = re.IGNORECASE
    assert run("RegexMatch", TEXT, pat, True, False, False) == (re.search(pat, TEXT, flags) is not None)
    assert run("RegexMatch", TEXT, "([unclosed", True, False, False) is False  # ComfyUI: a bad pattern -> False
    assert run("RegexExtract", TEXT, pat, "First Match", True, False, False, 1) == re.search(pat, TEXT, flags).group(0)
    assert run("RegexExtract", TEXT, pat, "All Matches", True, False, False, 1) == "\n".join(
        m[0] for m in re.findall(pat, TEXT, flags))
    assert run("RegexExtract", TEXT, pat, "First Group", True, False, False, 2) == "at"
    assert run("RegexExtract", TEXT, pat, "All Groups", False, False, False, 1) == "\n".join(
        m.group(1) for m in re.finditer(pat, TEXT))
    assert run("RegexExtract", TEXT, pat, "First Group", True, False, False, 3) == ""
    assert run("RegexReplace", TEXT, r"cat", "dog") == re.sub("cat", "dog", TEXT, flags=flags)
    assert run("RegexReplace", TEXT, r"cat", "dog", case_insensitive=False, count=1) == re.sub("cat", "dog", TEXT, 1)
    with pytest.raises(InputError, match="RegexReplace"):
        run("RegexReplace", TEXT, "([unclosed", "x")


def test_bounds(monkeypatch):
    monkeypatch.setattr(nodes_string, "REGEX_SECONDS", 0.2)
    with pytest.raises(InputError, match="regular expression ran"):
        run("RegexMatch", "a" * 60 + "b", "(a|aa)+$", False, False, False)
    with pytest.raises(InputError, match="characters"):
        run("StringReplace", "a" * 2000, "a", "b" * 1000)
    with pytest.raises(InputError, match="characters"):
        run("StringConcatenate", "a" * nodes_string.MAX_CHARS, "b", "")
    info = object_info()
    assert info["RegexReplace"]["input"]["optional"]["count"][1]["max"] == 100
    assert info["StringLength"]["output_name"] == ["length"]
