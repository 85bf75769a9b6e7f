"""ComfyUI's generic utility nodes (workflow/nodes_utility.py): ResolutionSelector, ComfySwitchNode,
ComfyMathExpression, ImageCompare, BatchImagesNode, SaveImageAdvanced, SaveText (their behaviour: test_save_nodes.py).
Expectations worked out from ComfyUI's code
(comfy_extras/nodes_resolution.py, nodes_logic.py, nodes_math.py, nodes_image_compare.py,
nodes_post_processing.py), the math evaluator's bounds, object_info, and every official template that uses
them converted (UI -> API) and validated at the level of these nodes."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping

import pytest
import torch

from sd35fp8.errors import InputError
from sd35fp8.workflow import nodes_control
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.node_base import Node, NodeContext
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, node_info
from sd35fp8.workflow.nodes_utility import UTILITY_NODES
from sd35fp8.workflow.ui_convert import ui_to_api
from sd35fp8.workflow.validate import validate_prompt


@pytest.fixture
def ctx(tmp_path):
    return NodeContext(folders=ModelFolders(tmp_path))


def run(name, ctx=None, **kw):
    cls = NODE_CLASS_MAPPINGS[name]
    return getattr(cls(ctx), cls.FUNCTION)(**kw)


# --- ResolutionSelector ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio,mp,multiple,expected", [
    ("1:1 (Square)", 1.0, 8, (1024, 1024)),
    # 16:9 at 0.9 MP: scale = sqrt(0.9 * 2^20 / 144) = 80.95..; 16 * 80.95 / 32 = 40.48 -> 40 * 32, 9 * 80.95 / 32
    # = 22.77 -> 23 * 32
    ("16:9 (Widescreen)", 0.9, 32, (1280, 736)),
    ("9:16 (Portrait Widescreen)", 1.0, 8, (768, 1368)),  # scale 85.33: 9*85.33/8 = 96 -> 768; 16*85.33/8 = 170.67
    ("21:9 (Ultrawide)", 0.1, 128, (512, 256)),  # scale 23.17: 21*23.17/128 = 3.8 -> 4; 9*23.17/128 = 1.63 -> 2
])
def test_resolution_selector(ratio, mp, multiple, expected):
    assert run("ResolutionSelector", aspect_ratio=ratio, megapixels=mp, multiple=multiple) == expected


def test_resolution_selector_info():
    info = node_info("ResolutionSelector", NODE_CLASS_MAPPINGS["ResolutionSelector"])
    req = info["input"]["required"]
    assert req["aspect_ratio"][0] == ["1:1 (Square)", "2:3 (Portrait Photo)", "3:2 (Photo)", "3:4 (Portrait Standard)",
                                      "4:3 (Standard)", "9:16 (Portrait Widescreen)", "16:9 (Widescreen)",
                                      "21:9 (Ultrawide)"]
    assert req["megapixels"][1] | {} == req["megapixels"][1] and req["megapixels"][1]["min"] == 0.1
    assert (req["megapixels"][1]["max"], req["megapixels"][1]["default"]) == (16.0, 1.0)
    assert (req["multiple"][1]["min"], req["multiple"][1]["max"], req["multiple"][1]["step"]) == (8, 128, 4)
    assert info["output"] == ["INT", "INT"] and info["output_name"] == ["width", "height"]
    assert info["category"] == "utilities" and info["display_name"] == "Resolution Selector"


# --- ComfySwitchNode ------------------------------------------------------------------------------------------

def test_switch():
    assert run("ComfySwitchNode", switch=True, on_true="t", on_false="f") == ("t",)
    assert run("ComfySwitchNode", switch=False, on_true="t", on_false="f") == ("f",)
    assert run("ComfySwitchNode", switch=True, on_false="f") == (None,)  # ComfyUI: MISSING -> None
    x = torch.zeros(1)
    assert run("ComfySwitchNode", switch=False, on_false=x)[0] is x
    info = node_info("ComfySwitchNode", NODE_CLASS_MAPPINGS["ComfySwitchNode"])
    assert info["input"]["required"] == {"switch": ["BOOLEAN", {}]}
    assert set(info["input"]["optional"]) == {"on_false", "on_true"}
    assert info["output_name"] == ["output"] and info["display_name"] == "If/Else Switch"
    assert info["category"] == "utilities/logic" and info["experimental"] is True


def test_switch_in_a_prompt_routes_any_type(ctx):
    prompt = {
        "1": {"class_type": "ResolutionSelector", "inputs": {"aspect_ratio": "1:1 (Square)", "megapixels": 0.25,
                                                             "multiple": 8}},
        "2": {"class_type": "ComfySwitchNode", "inputs": {"switch": True, "on_true": ["1", 0], "on_false": ["1", 1]}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": ["2", 0], "height": 512, "batch_size": 1}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    ok, err, outputs, node_errors = validate_prompt(prompt)
    assert ok, (err, node_errors)


# --- ComfyMathExpression --------------------------------------------------------------------------------------

def m(expression, **values):
    return run("ComfyMathExpression", expression=expression, **{f"values.{k}": v for k, v in values.items()})


@pytest.mark.parametrize("expr,values,expected", [
    ("a", {"a": 3}, (3.0, 3, True)),
    ("a + b", {"a": 1, "b": 2.5}, (3.5, 3, True)),
    ("a & -8", {"a": 1023}, (1016.0, 1016, True)),
    ("a & ~1", {"a": 7}, (6.0, 6, True)),
    ("max(((a + 15) // 16) * 16, 256)", {"a": 300}, (304.0, 304, True)),
    ("(a % 4 == 1) and ((b - 1) % 4 == 0)", {"a": 5, "b": 9}, (1.0, 1, True)),
    ("a > 2048", {"a": 10}, (0.0, 0, False)),
    ("a % b if b > 0 else 0", {"a": 7, "b": 0}, (0.0, 0, False)),
    ("ceil(1.5 * log2(max(a, b))) + 2", {"a": 1024, "b": 512}, (17.0, 17, True)),
    ("sum(values)", {"a": 1, "b": 2, "c": 3}, (6.0, 6, True)),
    ("sum(a, b)", {"a": 1, "b": 2}, (3.0, 3, True)),
    ("values[1] - values[0]", {"a": 1, "b": 5}, (4.0, 4, True)),
    ("floor (a * b + 1)", {"a": 2, "b": 1.7}, (4.0, 4, True)),
    ("round(a * 24)", {"a": 2.04}, (49.0, 49, True)),
    ("a * 2", {"a": True}, (2.0, 2, True)),  # a BOOLEAN value is a number
    ("-a", {"a": 2.5}, (-2.5, -2, True)),  # int() truncates, as ComfyUI's int(result)
    ("pow(2, 10)", {}, (1024.0, 1024, True)),
    ("2 ** -1", {}, (0.5, 0, True)),
    ("1 < a <= 3", {"a": 3}, (1.0, 1, True)),
])
def test_math(expr, values, expected):
    assert m(expr, **values) == expected


@pytest.mark.parametrize("expr,values", [
    ("", {}), ("   ", {}),  # "Expression cannot be empty."
    ("a + b", {"a": 1}),  # b not connected: not defined
    ("1 / a", {"a": 0}),
    ("sqrt(a)", {"a": -1}),
    ("a ** 0.5 * 1e308 * 1e308", {"a": 4}),  # inf: non-finite
    ("10 ** 400", {}),  # too large for a float
    ("(1, 2)", {}),  # not numeric
    ("None", {}),
    ("2 ** 5000", {}), ("pow(2, 4001)", {}), ("pow(2, -5000)", {}),  # ComfyUI's MAX_EXPONENT
    ("9 ** 4000 * 9 ** 4000 * 9 ** 4000", {}),  # integers bounded before multiplying
    ("1 << 100000", {}),
    ("round(a, 10 ** 9)", {"a": 1}),
    ("(1).real", {}), ("a.__class__", {"a": 1}),  # no attributes
    ("__import__('os').system('true')", {}), ("open('/etc/passwd')", {}), ("eval('1')", {}),
    ("'a' * 10 ** 9", {}), ("[a] * 10 ** 9", {"a": 1}),
    ("[x for x in values]", {"a": 1}), ("lambda: 1", {}), ("(x := 1)", {}),
    ("min(values)", {}),  # empty
    ("-" * 5000 + "1", {}),  # deep nesting
    ("(" * 300 + "1" + ")" * 300, {}),
    ("a+" * 6000 + "a", {"a": 1}),  # too long
])
def test_math_refuses(expr, values):
    with pytest.raises(InputError):
        m(expr, **values)


def test_math_error_names_the_limit():
    with pytest.raises(InputError, match="exceeds maximum allowed"):
        m("2 ** 4001")
    with pytest.raises(InputError, match="cannot be empty"):
        m("")


def test_math_info():
    info = node_info("ComfyMathExpression", NODE_CLASS_MAPPINGS["ComfyMathExpression"])
    assert info["input"]["required"]["expression"] == ["STRING", {"default": "a", "multiline": True}]
    assert list(info["input"]["optional"]) == [f"values.{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    assert info["input"]["optional"]["values.a"][0] == "FLOAT,INT,BOOLEAN"
    assert info["output"] == ["FLOAT", "INT", "BOOLEAN"] and info["output_name"] == ["FLOAT", "INT", "BOOL"]
    assert info["category"] == "utilities" and info["display_name"] == "Math Expression"


# --- ImageCompare ---------------------------------------------------------------------------------------------

def test_image_compare(ctx):
    out = run("ImageCompare", ctx, image_a=torch.rand(2, 16, 16, 3), image_b=torch.rand(1, 8, 8, 3))
    ui = out["ui"]
    assert len(ui["a_images"]) == 2 and len(ui["b_images"]) == 1
    for entry in ui["a_images"] + ui["b_images"]:
        assert entry["type"] == "temp" and (ctx.folders.temp_dir / entry["subfolder"] / entry["filename"]).is_file()
    assert ui["a_images"][0]["filename"].startswith("comfy.compare.a")
    assert run("ImageCompare", ctx) == {"ui": {"a_images": [], "b_images": []}}
    info = node_info("ImageCompare", NODE_CLASS_MAPPINGS["ImageCompare"])
    assert info["output_node"] is True and info["output"] == [] and info["category"] == "image"


# --- BatchImagesNode ------------------------------------------------------------------------------------------

def test_batch_images():
    a, b, c = torch.rand(1, 16, 16, 3), torch.rand(2, 8, 8, 4), torch.rand(1, 16, 16, 3)
    (out,) = run("BatchImagesNode", **{"images.image0": a, "images.image1": b, "images.image2": c})
    assert out.shape == (4, 16, 16, 4)  # padded to the most channels (opaque alpha), the first one's size
    assert torch.equal(out[0, ..., :3], a[0]) and torch.all(out[0, ..., 3] == 1.0) and torch.equal(out[3, ..., :3], c[0])
    # order by index, not by keyword order
    (out,) = run("BatchImagesNode", **{"images.image1": c * 0, "images.image0": a})
    assert torch.equal(out[0], a[0])
    with pytest.raises(InputError):
        run("BatchImagesNode", **{"images.image0": a})
    info = node_info("BatchImagesNode", NODE_CLASS_MAPPINGS["BatchImagesNode"])
    assert len(info["input"]["optional"]) == 50 and info["output"] == ["IMAGE"]


# --- the official templates that use them -------------------------------------------------------------------

templates = pytest.importorskip("comfyui_workflow_templates")


def _template_nodes(wf):
    nodes = list(wf["nodes"])
    for sg in (wf.get("definitions") or {}).get("subgraphs") or []:
        nodes += sg["nodes"]
    return nodes


def _users() -> list[str]:
    out = []
    for e in templates.iter_templates():
        try:
            wf = json.loads(open(templates.get_asset_path(e.template_id, f"{e.template_id}.json"), encoding="utf-8").read())
        except Exception:
            continue
        if isinstance(wf, dict) and "nodes" in wf and any(n.get("type") in UTILITY_NODES for n in _template_nodes(wf)):
            out.append(e.template_id)
    return sorted(out)


class _Stubs(Mapping):
    """Our classes, and a permissive stub for every other node type of the template (other model families, and
    loaders whose files are absent here): any linked input taken, its UI outputs' types declared; our nodes
    marked outputs so that all of them get validated."""

    def __init__(self, wf):
        self.stubs: dict[str, type] = {}
        for n in _template_nodes(wf):
            t = n.get("type")
            if t in UTILITY_NODES or t in self.stubs or not isinstance(t, str):
                continue
            names = {i["name"] for i in n.get("inputs") or []}
            outs = tuple(o.get("type") or "*" for o in n.get("outputs") or [])
            self.stubs[t] = type("Stub", (Node,), {
                "RETURN_TYPES": outs, "INPUT_TYPES": classmethod(
                    lambda cls, folders, names=tuple(names): {"required": {}, "optional": {k: ("*", {}) for k in names}})})
        self.ours = {k: type(k, (v,), {"OUTPUT_NODE": True}) for k, v in UTILITY_NODES.items()}

    def __getitem__(self, k):
        return self.ours.get(k) or self.stubs.get(k) or NODE_CLASS_MAPPINGS[k]

    def __iter__(self):
        return iter({**NODE_CLASS_MAPPINGS, **self.stubs})

    def __len__(self):
        return len({**NODE_CLASS_MAPPINGS, **self.stubs})


USERS = _users()


def test_templates_use_them():
    assert len(USERS) >= 150


def test_templates_use_the_save_nodes():
    def count(t):
        return sum(1 for tid in USERS for n in _template_nodes(json.loads(open(
            templates.get_asset_path(tid, f"{tid}.json"), encoding="utf-8").read())) if n.get("type") == t)

    assert count("SaveImageAdvanced") >= 60 and count("SaveText") >= 25


@pytest.mark.parametrize("tid", USERS)
def test_template_converts_and_validates(tid, monkeypatch, tmp_path):
    wf = json.loads(open(templates.get_asset_path(tid, f"{tid}.json"), encoding="utf-8").read())
    monkeypatch.setattr(nodes_control, "UNAVAILABLE_NODES", {})
    monkeypatch.setattr("sd35fp8.workflow.validate.UNAVAILABLE_NODES", {})
    classes = _Stubs(wf)
    prompt = ui_to_api(wf, classes)
    ours = {nid: node for nid, node in prompt.items() if node["class_type"] in UTILITY_NODES}
    if not ours:
        pytest.skip("every one of them is muted / bypassed or in an unused subgraph")
    ok, err, outputs, node_errors = validate_prompt(prompt, classes, partial_outputs=list(ours))
    bad = {nid: e for nid, e in node_errors.items() if prompt[nid]["class_type"] in UTILITY_NODES}
    assert not bad, bad
    for nid, node in ours.items():
        inputs = node["inputs"]
        if node["class_type"] == "ResolutionSelector":
            assert inputs["aspect_ratio"] in NODE_CLASS_MAPPINGS["ResolutionSelector"].INPUT_TYPES(None)[
                "required"]["aspect_ratio"][0]
            w, h = run("ResolutionSelector", **inputs)
            assert w > 0 and h > 0 and w % inputs.get("multiple", 8) == 0
        elif node["class_type"] == "ComfyMathExpression":
            assert isinstance(inputs["expression"], str) and inputs["expression"].strip()
            names = {k.split(".")[1]: 3 for k in inputs if k.startswith("values.")}
            try:  # the template's expression in our evaluator, its linked values set to 3
                out = m(inputs["expression"], **names)
                assert math.isfinite(out[0])
            except InputError as e:
                # a value whose link leads to a muted / bypassed node is absent, as in ComfyUI
                assert "division" in str(e) or "domain" in str(e) or "is not defined" in str(e), e
        elif node["class_type"] == "ComfySwitchNode":
            assert "switch" in inputs
        elif node["class_type"] in ("SaveImageAdvanced", "SaveText"):  # the template's widgets, run here
            ctx = NodeContext(folders=ModelFolders(tmp_path / "models", output_dir=tmp_path / "out"))
            widgets = {k: v for k, v in inputs.items() if not isinstance(v, list)}  # links: a sample value
            if node["class_type"] == "SaveText":
                assert set(inputs) == {"text", "filename_prefix", "format"}, inputs
                out = run("SaveText", ctx, **{**widgets, "text": '{"a": 1}'})
                ext = inputs["format"]
            else:
                assert set(inputs) == {"images", "filename_prefix", "format", "format.bit_depth",
                                       "format.input_color_space"}, inputs
                out = run("SaveImageAdvanced", ctx, **{**widgets, "images": torch.rand(1, 8, 8, 3)})
                ext = inputs["format"]
            saved = (out["ui"].get("files") or out["ui"].get("images"))[0]
            assert re.fullmatch(rf".+_\d{{5}}\.{ext}", saved["filename"]), saved  # two share a prefix: 00002
            assert (tmp_path / "out" / saved["subfolder"] / saved["filename"]).is_file()
