"""Graph-shaped prompts through workflow/validate.py: cycles are a 400-style error that names the loop
(they used to recurse until RecursionError, a 500), and a chain of thousands of linked nodes validates
without Python recursion (ComfyUI's recursive validate_inputs, driven by a loop), with the same errors
as the recursive form for failures deep in the chain."""

from __future__ import annotations

from sd35fp8.workflow.validate import validate_prompt


class Src:
    RETURN_TYPES = ("X",)

    @classmethod
    def INPUT_TYPES(cls, folders=None):  # noqa: N802 - ComfyUI's name
        return {"required": {"n": ("INT", {"min": 0, "max": 10})}}


class Step:
    RETURN_TYPES = ("X",)

    @classmethod
    def INPUT_TYPES(cls, folders=None):  # noqa: N802
        return {"required": {"x": ("X",)}}


class Out:
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls, folders=None):  # noqa: N802
        return {"required": {"x": ("X",)}}


CLASSES = {"Src": Src, "Step": Step, "Out": Out}


def chain(n: int, src_value: int = 1) -> dict:
    p = {"src": {"class_type": "Src", "inputs": {"n": src_value}}}
    prev = "src"
    for i in range(n):
        p[f"s{i}"] = {"class_type": "Step", "inputs": {"x": [prev, 0]}}
        prev = f"s{i}"
    p["out"] = {"class_type": "Out", "inputs": {"x": [prev, 0]}}
    return p


def test_cycles_are_an_error_naming_the_loop():
    p = chain(3)
    p["s0"]["inputs"]["x"] = ["s0", 0]  # a node fed by itself
    ok, error, outputs, _ = validate_prompt(p, CLASSES)
    assert not ok and outputs == [] and error["type"] == "dependency_cycle" and error["details"] == "s0 -> s0"
    p = chain(3)
    p["s0"]["inputs"]["x"] = ["s2", 0]  # s0 -> s2 -> s1 -> s0
    ok, error, _, _ = validate_prompt(p, CLASSES)
    assert not ok and error["type"] == "dependency_cycle" and set(error["extra_info"]["node_ids"]) == {"s0", "s1", "s2"}


def test_a_long_chain_needs_no_recursion():
    ok, error, outputs, node_errors = validate_prompt(chain(5000), CLASSES)
    assert ok and error is None and outputs == ["out"] and node_errors == {}


def test_errors_deep_in_a_chain_are_reported_as_before():
    ok, error, _, node_errors = validate_prompt(chain(3000, src_value=99), CLASSES)  # n > max at the far end
    assert not ok and error["type"] == "prompt_outputs_failed_validation"
    assert list(node_errors) == ["src"] and node_errors["src"]["errors"][0]["type"] == "value_bigger_than_max"
    p = chain(3000)
    p["s10"]["inputs"]["x"] = ["nope", 0]  # raised while validating s10: recorded on s10 by its consumer
    ok, _, _, node_errors = validate_prompt(p, CLASSES)
    assert not ok and node_errors["s10"]["errors"][0]["type"] == "exception_during_inner_validation"
    assert "nope" in node_errors["s10"]["errors"][0]["details"]
