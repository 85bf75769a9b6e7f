"""Issue 22 item 5: non-finite numbers and values outside a node's declared range are refused at
validation, with node_errors, for every node, from the node definitions (workflow.validate)."""

from __future__ import annotations

import pytest

from sd35fp8.workflow import ModelFolders
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS
from sd35fp8.workflow.validate import _Validator, validate_prompt

NUMERIC = [(name, x, spec[0], spec[1] if len(spec) > 1 else {})
           for name, cls in sorted(NODE_CLASS_MAPPINGS.items())
           for section in cls.INPUT_TYPES(None).values() for x, spec in section.items()
           if spec[0] in ("INT", "FLOAT")]


def _errors(tmp_path, class_type: str, inputs: dict) -> list[dict]:
    v = _Validator({"1": {"class_type": class_type, "inputs": inputs}}, NODE_CLASS_MAPPINGS,
                   ModelFolders(tmp_path))
    ok, errors, _ = v.validate_inputs("1")
    return errors


def test_every_numeric_input_declares_its_range():
    assert NUMERIC, "no INT/FLOAT inputs found"
    missing = [(n, x) for n, x, _, opts in NUMERIC if "min" not in opts or "max" not in opts]
    assert not missing, f"inputs without a declared min/max: {missing}"


@pytest.mark.parametrize("name, x, kind, opts", NUMERIC, ids=[f"{n}.{x}" for n, x, _, _ in NUMERIC])
def test_out_of_range_and_non_finite(tmp_path, name, x, kind, opts):
    cases = [(opts["min"] - 1, "value_smaller_than_min"), (opts["max"] + 1, "value_bigger_than_max"),
             ("nan", None), ("inf", None), ("-inf", None), (float("inf"), "value_not_finite"),
             (float("nan"), "value_not_finite"), ([1, 2, 3], None), ({"a": 1}, "invalid_input_type")]
    for value, expected in cases:
        errors = [e for e in _errors(tmp_path, name, {x: value}) if e["extra_info"].get("input_name") == x]
        assert errors, (name, x, value)
        if expected is not None:
            assert errors[0]["type"] == expected, (name, x, value, errors[0])
        if kind == "FLOAT" and isinstance(value, str):
            assert errors[0]["type"] == "value_not_finite", (name, x, value, errors[0])
    ok = [e for e in _errors(tmp_path, name, {x: opts["min"]}) if e["extra_info"].get("input_name") == x]
    assert not ok, (name, x, ok)


def test_nan_cfg_in_a_whole_prompt_names_the_node(tmp_path):
    """The issue's `cfg: NaN` (sent as a string, since the server refuses NaN in JSON itself)."""
    import json

    from comfy_models import WORKFLOWS

    prompt = json.loads((WORKFLOWS / "seed-fp8-allinone.json").read_text())
    ks = next(i for i, n in prompt.items() if n["class_type"] == "KSampler")
    prompt[ks]["inputs"]["cfg"] = "NaN"
    ok, error, _, node_errors = validate_prompt(prompt, NODE_CLASS_MAPPINGS, ModelFolders(tmp_path))
    assert not ok and any(e["type"] == "value_not_finite" for e in node_errors[ks]["errors"])
