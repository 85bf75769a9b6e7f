"""Prompt validation before anything runs, with ComfyUI's error shapes (execution.py).

`validate_prompt(prompt, ...) -> (ok, error, outputs_to_execute, node_errors)`:
  error = {"type", "message", "details", "extra_info"} or None
  node_errors = {node_id: {"errors": [...], "dependent_outputs": [...], "class_type": ...}}
Literal inputs are coerced in place (INT/FLOAT/STRING/BOOLEAN), as ComfyUI does, so the executor
receives typed values. Model file names are checked against the folder listing (value_not_in_list).
Every literal is checked against its node definition's declared range (value_smaller_than_min /
value_bigger_than_max) and a FLOAT or INT must be finite (value_not_finite: NaN and +-inf, given as
numbers or as strings, never reach a node); a STRING may be bounded in length (value_too_long,
`max_text_chars`). Inputs a node checks itself (VALIDATE_INPUTS) skip the range check, as in
ComfyUI, but not the finiteness check.
"""

from __future__ import annotations

import inspect
import logging
import math
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

from sd35fp8.workflow.comfy_core import COMFY_CORE_NODES
from sd35fp8.workflow.graph import _id_key, find_cycle, upstream_closure
from sd35fp8.workflow.nodes_control import UNAVAILABLE_NODES

log = logging.getLogger(__name__)

PRIMITIVE_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def full_type_name(klass: type) -> str:
    module = klass.__module__
    return klass.__qualname__ if module == "builtins" else f"{module}.{klass.__qualname__}"


def types_compatible(received: str, expected: Any) -> bool:
    """ComfyUI validate_node_input: equal names, '*' on either side, or comma-separated unions."""
    if not isinstance(expected, str) or not isinstance(received, str):
        return received == expected
    if received == expected or "*" in (received, expected):
        return True
    got = {t.strip() for t in received.split(",")}
    want = {t.strip() for t in expected.split(",")}
    return bool(got & want)


def _error(type_: str, message: str, details: str, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "message": message, "details": details, "extra_info": extra}


class _Validator:
    def __init__(self, prompt: dict, classes: Mapping[str, type], folders: Any, max_text_chars: int | None = None):
        self.prompt = prompt
        self.classes = classes
        self.folders = folders
        self.max_text_chars = max_text_chars
        self.validated: dict[str, tuple[bool, list, str]] = {}
        self._input_types: dict[str, dict] = {}

    def input_types(self, class_type: str) -> dict:
        if class_type not in self._input_types:
            self._input_types[class_type] = self.classes[class_type].INPUT_TYPES(self.folders)
        return self._input_types[class_type]

    def validate_inputs(self, unique_id: str) -> tuple[bool, list, str]:
        """ComfyUI's recursive validate_inputs, driven without recursion: `_steps` is a generator that
        yields the id of each linked node it needs and receives that node's result (or the exception its
        validation raised, thrown in at the yield), so a chain of thousands of nodes needs no Python stack.
        The prompt's links must form no cycle (validate_prompt checks that first)."""
        if unique_id in self.validated:
            return self.validated[unique_id]
        stack = [self._steps(unique_id)]
        reply: Any = None
        thrown: BaseException | None = None
        while True:
            steps = stack[-1]
            try:
                if thrown is not None:
                    exc, thrown = thrown, None
                    need = steps.throw(exc)
                else:
                    need = steps.send(reply)
            except StopIteration as done:
                stack.pop()
                if not stack:
                    return done.value
                reply = done.value
                continue
            except Exception as ex:  # what the recursive call would have raised into its caller
                stack.pop()
                if not stack:
                    raise
                thrown = ex
                continue
            if need in self.validated:
                reply = self.validated[need]
            else:
                stack.append(self._steps(need))
                reply = None

    def _steps(self, unique_id: str):
        """validate_inputs' body for one node not yet validated (validate_inputs' loop only starts those):
        yields linked node ids, returns its result."""
        node = self.prompt[unique_id]
        inputs = node["inputs"]
        class_inputs = self.input_types(node["class_type"])
        errors: list[dict] = []
        valid = True
        sections = [("required", class_inputs.get("required", {})), ("optional", class_inputs.get("optional", {}))]
        cls = self.classes[node["class_type"]]
        custom = getattr(cls, "VALIDATE_INPUTS", None)  # ComfyUI: its inputs skip the min/max/list checks
        custom_names = [a for a in inspect.signature(custom).parameters if a != "folders"] if custom else []
        for category, spec in sections:
            for x, info in spec.items():
                input_type = info[0]
                opts = info[1] if len(info) > 1 else {}
                config = [input_type, opts]
                if x not in inputs:
                    if category == "required":
                        errors.append(_error("required_input_missing", "Required input is missing", f"{x}",
                                             input_name=x))
                    continue
                val = inputs[x]
                if isinstance(val, list):
                    if len(val) != 2:
                        errors.append(_error(
                            "bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            f"{x}", input_name=x, input_config=config, received_value=val))
                        continue
                    o_id = str(val[0])
                    if o_id not in self.prompt:
                        raise KeyError(f"input {x!r} links to node {o_id!r}, which is not in the prompt")
                    o_class = self.classes[self.prompt[o_id]["class_type"]]
                    returns = o_class.RETURN_TYPES
                    slot = val[1]
                    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(returns):
                        raise IndexError(f"input {x!r} links to output {slot!r} of node {o_id} "
                                         f"({self.prompt[o_id]['class_type']}), which has {len(returns)} outputs")
                    received_type = returns[slot]
                    if not types_compatible(received_type, input_type):
                        errors.append(_error(
                            "return_type_mismatch", "Return type mismatch between linked nodes",
                            f"{x}, received_type({received_type}) mismatch input_type({input_type})",
                            input_name=x, input_config=config, received_type=received_type, linked_node=val))
                        continue
                    try:
                        r = yield o_id  # = self.validate_inputs(o_id), run by validate_inputs' loop
                        if r[0] is False:
                            valid = False  # the reasons are recorded on the upstream node itself
                            continue
                    except (KeyError, IndexError, TypeError, ValueError, OSError) as ex:
                        valid = False
                        reasons = [_error(
                            "exception_during_inner_validation", "Exception when validating inner node", str(ex),
                            input_name=x, input_config=config, exception_message=str(ex),
                            exception_type=full_type_name(type(ex)),
                            traceback=traceback.format_tb(ex.__traceback__), linked_node=val)]
                        self.validated[o_id] = (False, reasons, o_id)
                        continue
                    continue
                err = self._check_literal(x, val, input_type, opts, config, inputs, custom=x in custom_names)
                if err is not None:
                    errors.append(err)
        if custom_names and not errors:
            given = {x: inputs[x] for x in custom_names if x in inputs and not isinstance(inputs[x], list)}
            if given:
                r = custom(self.folders, **given)
                if r is not True:
                    errors += [_error("custom_validation_failed", "Custom validation failed for node",
                                      f"{x}" + ("" if r is False else f" - {r}"), input_name=x) for x in given]
        ret = (False, errors, unique_id) if errors or not valid else (True, [], unique_id)
        self.validated[unique_id] = ret
        return ret

    def _check_literal(self, x: str, val: Any, input_type: Any, opts: dict, config: list,
                       inputs: dict, custom: bool = False) -> dict | None:
        if isinstance(val, dict) and "__value__" in val:  # list widget values wrapped by the frontend
            val = val["__value__"]
            inputs[x] = val
        if input_type == "*":  # an any-type input (PreviewAny's source): ComfyUI takes a typed-in value as it is
            return None
        if isinstance(input_type, str) and input_type not in PRIMITIVE_TYPES:
            # ComfyUI lets this through and fails later; a literal can never be a MODEL, LATENT, ...
            return _error("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                          f"{x}, {val}, {input_type} must be linked from another node's output",
                          input_name=x, input_config=config, received_value=val,
                          exception_message=f"{input_type} must be linked")
        try:
            if input_type == "INT":
                if isinstance(val, float) and not math.isfinite(val):
                    return _error("value_not_finite", f"Value {val} is not a finite number", f"{x}",
                                  input_name=x, input_config=config, received_value=str(val))
                if isinstance(val, str):  # ComfyUI: int("12"); "1e3" / "nan" are not integers
                    val = val.strip()
                if isinstance(val, float) and not val.is_integer():
                    raise ValueError(f"{val} is not an integer")
                val = int(val)
            elif input_type == "FLOAT":
                if isinstance(val, bool) or not isinstance(val, (int, float, str)):
                    raise TypeError(f"expected a number, got {type(val).__name__}")
                val = float(val)
                if not math.isfinite(val):
                    return _error("value_not_finite", f"Value {val} is not a finite number", f"{x}",
                                  input_name=x, input_config=config, received_value=str(val))
            elif input_type == "STRING":
                val = str(val)
            elif input_type == "BOOLEAN":
                val = bool(val)
            inputs[x] = val
        except (TypeError, ValueError, OverflowError) as ex:
            return _error("invalid_input_type", f"Failed to convert an input value to a {input_type} value",
                          f"{x}, {val}, {ex}", input_name=x, input_config=config, received_value=val,
                          exception_message=str(ex))
        if input_type == "STRING" and self.max_text_chars is not None and len(val) > self.max_text_chars:
            return _error("value_too_long", f"Text of {len(val)} characters is longer than the server's limit "
                          f"of {self.max_text_chars}", f"{x}", input_name=x, input_config=config,
                          received_length=len(val), max_length=self.max_text_chars)
        if custom:  # the node's VALIDATE_INPUTS checks this input
            return None
        if "min" in opts and val < opts["min"]:
            return _error("value_smaller_than_min", f"Value {val} smaller than min of {opts['min']}", f"{x}",
                          input_name=x, input_config=config, received_value=val)
        if "max" in opts and val > opts["max"]:
            return _error("value_bigger_than_max", f"Value {val} bigger than max of {opts['max']}", f"{x}",
                          input_name=x, input_config=config, received_value=val)
        if isinstance(input_type, (list, tuple)) and val not in input_type:
            if len(input_type) > 20:  # ComfyUI: don't send back huge model lists
                list_info, input_config = f"(list of length {len(input_type)})", None
            else:
                list_info, input_config = str(list(input_type)), config
            return _error("value_not_in_list", "Value not in list", f"{x}: '{val}' not in {list_info}",
                          input_name=x, input_config=input_config, received_value=val)
        return None


def validate_prompt(
    prompt: dict[str, dict[str, Any]],
    classes: Mapping[str, type] | None = None,
    folders: Any = None,
    partial_outputs: Iterable[str] | None = None,
    max_text_chars: int | None = None,
) -> tuple[bool, dict | None, list[str], dict[str, dict]]:
    """ComfyUI validate_prompt: (ok, error, outputs_to_execute, node_errors).

    max_text_chars: the longest STRING literal accepted (None = no bound)."""
    if classes is None:
        from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS as classes  # noqa: N811
    outputs: set[str] = set()
    for x, node in prompt.items():
        meta = node.get("_meta") if isinstance(node.get("_meta"), dict) else {}
        if "class_type" not in node:  # ComfyUI execution.validate_prompt: the web UI's missing-nodes dialog
            title = meta.get("title")
            return (False, _error("missing_node_type", f"Node '{title or f'ID #{x}'}' has no class_type. The "
                                  "workflow may be corrupted or a custom node is missing.", f"Node ID '#{x}'",
                                  node_id=x, class_type=None, node_title=title), [], {})
        class_type = node["class_type"]
        cls = classes.get(class_type)
        if class_type in UNAVAILABLE_NODES:  # a template node whose model cannot exist here
            title = meta.get("title", class_type)
            return (False, _error("node_unavailable", f"Node '{title}' ({class_type}, #{x}) cannot run here: "
                                  f"{UNAVAILABLE_NODES[class_type]}", f"Node ID '#{x}'", node_id=x,
                                  class_type=class_type, node_title=title), [], {})
        if cls is None:
            title = meta.get("title", class_type)
            why = ("it is a ComfyUI core node that sd35fp8 does not implement" if class_type in COMFY_CORE_NODES
                   else "it is not a ComfyUI core node: the custom node that defines it is not available in sd35fp8")
            return (False, _error("missing_node_type", f"Node '{title}' (#{x}): node type {class_type!r} not "
                                  f"found; {why}.", f"Node ID '#{x}'", node_id=x, class_type=class_type,
                                  node_title=title), [], {})
        if getattr(cls, "OUTPUT_NODE", False) is True:
            outputs.add(x)
    if partial_outputs is not None:
        outputs &= {str(o) for o in partial_outputs}
    if not outputs:
        return (False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [], {})

    cycle = find_cycle(prompt, upstream_closure(prompt, outputs))
    if cycle:  # ComfyUI would recurse until its stack overflows; here a 400 that names the loop
        return (False, _error("dependency_cycle", "Prompt has a dependency cycle", " -> ".join(cycle),
                              node_ids=cycle), [], {})
    v = _Validator(prompt, classes, folders, max_text_chars)
    good: list[str] = []
    failed: list[tuple[str, list]] = []
    node_errors: dict[str, dict] = {}
    for o in sorted(outputs, key=_id_key):
        try:
            ok, reasons, _ = v.validate_inputs(o)
        except (KeyError, IndexError, TypeError, ValueError, OSError) as ex:
            ok = False
            reasons = [_error("exception_during_validation", "Exception when validating node", str(ex),
                              exception_type=full_type_name(type(ex)),
                              traceback=traceback.format_tb(ex.__traceback__))]
            v.validated[o] = (False, reasons, o)
        if ok:
            good.append(o)
            continue
        failed.append((o, reasons))
        log.error("Failed to validate prompt for output %s", o)
        for node_id, (nvalid, nreasons, _) in v.validated.items():
            # downstream nodes of a failing node are invalid without reasons of their own: not reported
            if nvalid is not True and nreasons:
                entry = node_errors.setdefault(node_id, {
                    "errors": nreasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]})
                if o not in entry["dependent_outputs"]:
                    entry["dependent_outputs"].append(o)
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, reasons in failed for e in reasons)
        return (False, _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
                good, node_errors)
    return (True, None, good, node_errors)
