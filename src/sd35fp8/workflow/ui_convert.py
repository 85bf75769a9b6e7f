"""The ComfyUI frontend's "workflow" format (nodes + links, widgets_values) -> API-format prompt.

What the frontend's graphToPrompt does, for the nodes we know:
- widgets_values are positional, in INPUT_TYPES order (required, then optional) over the inputs
  that are widgets (INT, FLOAT, STRING, BOOLEAN, combo lists; not forceInput). An INT with
  control_after_generate (and, in older frontends, any INT named seed / noise_seed) is followed by
  a hidden "control_after_generate" value ("fixed", "randomize", ...) that is skipped.
- a widget converted to an input and linked takes the link instead of its value.
- links are [id, origin_id, origin_slot, target_id, target_slot, type] (or objects with those keys).
- virtual nodes: Reroute (followed), PrimitiveNode (its value is written into the targets),
  Note / MarkdownNote (dropped). Muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass
  the input of the same type through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sd35fp8.errors import InputError

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_WIDGET_NAMES = ("seed", "noise_seed")
MODE_NEVER, MODE_BYPASS = 2, 4
IGNORED_TYPES = ("Note", "MarkdownNote")


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def widget_inputs(input_types: Mapping[str, Mapping[str, tuple]]) -> list[tuple[str, bool]]:
    """(name, has_control_after_generate) for each widget input, in widgets_values order."""
    out = []
    for section in ("required", "optional"):
        for name, info in input_types.get(section, {}).items():
            kind = info[0]
            opts = info[1] if len(info) > 1 and isinstance(info[1], dict) else {}
            is_widget = isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES
            if not is_widget or opts.get("forceInput"):
                continue
            control = kind == "INT" and (bool(opts.get("control_after_generate")) or name in SEED_WIDGET_NAMES)
            out.append((name, control))
    return out


def _link_table(data: dict) -> dict[int, tuple[int, int, int, int]]:
    table = {}
    for link in data.get("links") or []:
        if isinstance(link, dict):
            lid, o_id, o_slot, t_id, t_slot = (link["id"], link["origin_id"], link["origin_slot"],
                                               link["target_id"], link["target_slot"])
        else:
            lid, o_id, o_slot, t_id, t_slot = link[:5]
        table[int(lid)] = (int(o_id), int(o_slot), int(t_id), int(t_slot))
    return table


class _Converter:
    def __init__(self, data: dict, classes: Mapping[str, type], folders: Any):
        self.classes = classes
        self.folders = folders
        self.nodes = {int(n["id"]): n for n in data["nodes"]}
        self.links = _link_table(data)

    def resolve(self, link_id: int | None, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """Follow a link to a real output: ("link", [id, slot]) or ("value", v); None = nothing."""
        if link_id is None or link_id not in self.links:
            return None
        if link_id in seen:
            raise InputError(f"UI workflow: link {link_id} loops through reroute/bypass nodes")
        seen = seen | {link_id}
        o_id, o_slot, _, _ = self.links[link_id]
        origin = self.nodes.get(o_id)
        if origin is None:
            raise InputError(f"UI workflow: link {link_id} comes from node {o_id}, which does not exist")
        kind, mode = origin.get("type"), origin.get("mode", 0)
        if kind == "Reroute":
            ins = origin.get("inputs") or []
            return self.resolve(ins[0].get("link") if ins else None, seen)
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            if not values:
                raise InputError(f"UI workflow: primitive node {o_id} has no value")
            return ("value", values[0])
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            outs = origin.get("outputs") or []
            want = outs[o_slot].get("type") if o_slot < len(outs) else None
            ins = origin.get("inputs") or []
            # the frontend prefers the input at the same slot, then the first one of the same type
            order = ([ins[o_slot]] if o_slot < len(ins) else []) + ins
            for inp in order:
                if inp.get("type") == want and inp.get("link") is not None:
                    return self.resolve(inp["link"], seen)
            return None
        return ("link", [str(o_id), o_slot])

    def convert_node(self, node: dict) -> dict[str, Any]:
        nid, class_type = node["id"], node.get("type")
        cls = self.classes.get(class_type)
        if cls is None:
            raise InputError(f"UI workflow: node {nid} has unknown type {class_type!r}")
        spec = cls.INPUT_TYPES(self.folders)
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        if isinstance(values, dict):
            for name, _ in widget_inputs(spec):
                if name in values:
                    inputs[name] = values[name]
        elif values:
            i = 0
            for name, control in widget_inputs(spec):
                if i >= len(values):
                    break
                inputs[name] = values[i]
                i += 2 if control else 1
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            resolved = self.resolve(inp["link"])
            if resolved is None:
                if "widget" not in inp:  # an unconnected socket input: the frontend leaves it out
                    inputs.pop(inp["name"], None)
                continue
            inputs[inp["name"]] = resolved[1]
        title = node.get("title") or getattr(cls, "DISPLAY_NAME", None) or class_type
        return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}

    def convert(self) -> dict[str, dict[str, Any]]:
        prompt = {}
        for nid, node in self.nodes.items():
            kind = node.get("type")
            if kind in ("Reroute", "PrimitiveNode") or kind in IGNORED_TYPES:
                continue
            if node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
                continue
            prompt[str(nid)] = self.convert_node(node)
        return prompt


def ui_to_api(workflow: dict, classes: Mapping[str, type] | None = None, folders: Any = None) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt (node ids as strings)."""
    if not is_ui_workflow(workflow):
        raise InputError("not a ComfyUI UI workflow (expected 'nodes' and 'links')")
    if classes is None:
        from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS as classes  # noqa: N811
    return _Converter(workflow, classes, folders).convert()
