"""ComfyUI's list execution (execution.py: _map_node_over_list, merge_result_data).

In ComfyUI every output slot holds a list of values. A node whose class sets INPUT_IS_LIST gets every input as a
list and runs once; any other node runs once per item of its longest list input, the shorter lists repeating their
last item. Each output slot then collects one value per run, or, where OUTPUT_IS_LIST marks it, the concatenation of
the lists the runs returned; a node's UI results are joined key by key.

Here a slot holding exactly one value holds the value itself (what ComfyUI's one-item list means everywhere), and a
slot holding any other number of values holds a `NodeList`: so every node that neither makes nor takes lists runs as
before, with its values unwrapped.
"""

from __future__ import annotations

from typing import Any, Callable

from sd35fp8.errors import InputError


class NodeList(list):
    """An output slot's values when there are not exactly one (a plain list may be a value itself: CONDITIONING)."""


def items(value: Any) -> list:
    return list(value) if isinstance(value, NodeList) else [value]


def slot(values: list) -> Any:
    return values[0] if len(values) == 1 else NodeList(values)


def call_mapped(fn: Callable[..., Any], inputs: dict[str, Any], cls: type, where: str,
                between: Callable[[], None] = lambda: None) -> tuple[tuple, dict | None]:
    """Run a node's function over its inputs as ComfyUI maps it over lists -> (outputs, ui). `between` runs
    before every run after the first (the interrupt check)."""
    if getattr(cls, "INPUT_IS_LIST", False):
        runs = [fn(**{k: items(v) for k, v in inputs.items()})]
    else:
        empty = [k for k, v in inputs.items() if isinstance(v, NodeList) and not v]
        if empty:
            raise InputError(f"{where}: input {', '.join(empty)} is an empty list")
        count = max((len(v) for v in inputs.values() if isinstance(v, NodeList)), default=1)
        runs = []
        for i in range(count):
            if i:
                between()
            runs.append(fn(**{k: v[min(i, len(v) - 1)] if isinstance(v, NodeList) else v
                              for k, v in inputs.items()}))
    results, uis = [], []
    for ret in runs:
        if isinstance(ret, dict):
            if ret.get("ui"):
                uis.append(ret["ui"])
            ret = ret.get("result", ())
        results.append(tuple(ret))
    n = len(cls.RETURN_TYPES)
    for r in results:
        if len(r) != n:
            raise RuntimeError(f"{where} returned {len(r)} outputs, declares {n}")
    flags = tuple(cls.OUTPUT_IS_LIST or ()) + (False,) * n
    outputs = []
    for s in range(n):
        if flags[s]:  # each run's list joined (a run that returned a lone value adds that value)
            outputs.append(slot([v for r in results for v in (r[s] if isinstance(r[s], list) else [r[s]])]))
        else:
            outputs.append(slot([r[s] for r in results]))
    ui = None
    if uis:
        ui = {k: [y for u in uis for y in (u.get(k) or [])] for k in uis[0]}
    return tuple(outputs), ui
