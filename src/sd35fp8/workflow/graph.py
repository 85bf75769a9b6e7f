"""API-format prompt graphs: `{"id": {"class_type", "inputs", "_meta"}}`, links `["id", slot]`.

Pure structure: no node definitions, no tensors. Validation of types lives in validate.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sd35fp8.errors import InputError


def is_link(value: Any) -> bool:
    """A linked input: ["node_id", output_index]."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def links_of(node: Mapping[str, Any]) -> list[tuple[str, str, int]]:
    """(input_name, upstream_id, slot) for each linked input of one node, in input order."""
    out = []
    for name, value in node.get("inputs", {}).items():
        if is_link(value):
            out.append((name, str(value[0]), value[1]))
    return out


class CycleError(InputError):
    """The prompt's links form a cycle (names the nodes on it)."""

    def __init__(self, cycle: list[str]):
        self.cycle = cycle
        super().__init__("prompt has a dependency cycle: " + " -> ".join(cycle))


def parse_prompt(data: Any) -> dict[str, dict[str, Any]]:
    """Check the shape of an API-format prompt; return it with string node ids.

    Accepts the bare prompt or a `{"prompt": {...}}` request body. Does not check class types.
    """
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]
    if not isinstance(data, dict):
        raise InputError(f"a prompt must be a JSON object of nodes, got {type(data).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for node_id, node in data.items():
        if not isinstance(node, dict):
            raise InputError(f"node {node_id!r}: expected an object with class_type and inputs")
        node = dict(node)
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            raise InputError(f"node {node_id!r}: 'inputs' must be an object")
        node["inputs"] = dict(inputs)
        out[str(node_id)] = node
    return out


def upstream_closure(prompt: Mapping[str, Mapping[str, Any]], roots: Iterable[str]) -> set[str]:
    """All node ids the roots depend on (roots included). Links to missing ids are ignored here."""
    seen: set[str] = set()
    stack = [str(r) for r in roots]
    while stack:
        nid = stack.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        for _, up, _ in links_of(prompt[nid]):
            stack.append(up)
    return seen


def find_cycle(prompt: Mapping[str, Mapping[str, Any]], nodes: Iterable[str] | None = None) -> list[str] | None:
    """A cycle as a list of ids (first == last), or None. Restricted to `nodes` when given."""
    scope = set(prompt) if nodes is None else set(nodes)
    state: dict[str, int] = {}  # 1 = on stack, 2 = done
    for start in sorted(scope, key=_id_key):
        if state.get(start):
            continue
        # iterative DFS keeping the path for reporting
        path: list[str] = [start]
        iters = [iter([up for _, up, _ in links_of(prompt[start]) if up in scope])]
        state[start] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
                continue
            s = state.get(nxt, 0)
            if s == 1:
                i = path.index(nxt)
                return path[i:] + [nxt]
            if s == 0:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter([up for _, up, _ in links_of(prompt[nxt]) if up in scope]))
    return None


def topological_order(prompt: Mapping[str, Mapping[str, Any]], nodes: Iterable[str]) -> list[str]:
    """Dependency order of `nodes` (every upstream before its consumers); raises CycleError.

    Ties break by numeric node id, so the order is stable across runs.
    """
    scope = set(nodes)
    cycle = find_cycle(prompt, scope)
    if cycle:
        raise CycleError(cycle)
    indeg = {n: 0 for n in scope}
    consumers: dict[str, list[str]] = {n: [] for n in scope}
    for n in scope:
        ups = {up for _, up, _ in links_of(prompt[n]) if up in scope}
        indeg[n] = len(ups)
        for up in ups:
            consumers[up].append(n)
    ready = sorted((n for n in scope if indeg[n] == 0), key=_id_key)
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for c in consumers[n]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
        ready.sort(key=_id_key)
    return order


def execution_order(prompt: Mapping[str, Mapping[str, Any]], outputs: Iterable[str]) -> list[str]:
    """The nodes that feed the given output nodes, in dependency order."""
    return topological_order(prompt, upstream_closure(prompt, outputs))


def _id_key(node_id: str) -> tuple[int, float, str]:
    """Sort numeric ids numerically ("3" < "10"), others after them by text ("5:2" subgraph ids)."""
    try:
        return (0, float(node_id), node_id)
    except ValueError:
        return (1, 0.0, node_id)
