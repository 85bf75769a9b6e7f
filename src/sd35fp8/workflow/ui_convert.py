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
- subgraphs (`definitions.subgraphs`, nested too): an instance node (type = the subgraph's id) is
  replaced by the subgraph's nodes with ids "instance:inner" (the frontend's ids); the subgraph's
  inputs take the instance's links or, for widget inputs, its widgets_values in order; a link
  from the instance's output k follows the subgraph's output k inside.
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


SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20  # the frontend's ids of a subgraph's input / output nodes


def _link_table(data: dict, scope: str = "") -> dict[str, tuple[str, int, str, int]]:
    """link id -> (origin id, origin slot, target id, target slot), ids prefixed with `scope`."""
    table = {}
    for link in data.get("links") or []:
        if isinstance(link, dict):
            lid, o_id, o_slot, t_id, t_slot = (link["id"], link["origin_id"], link["origin_slot"],
                                               link["target_id"], link["target_slot"])
        else:
            lid, o_id, o_slot, t_id, t_slot = link[:5]
        table[f"{scope}{int(lid)}"] = (f"{scope}{int(o_id)}", int(o_slot), f"{scope}{int(t_id)}", int(t_slot))
    return table


def _link_id(scope: str, link: Any) -> str | None:
    return None if link is None else f"{scope}{int(link)}"


class _Converter:
    def __init__(self, data: dict, classes: Mapping[str, type], folders: Any):
        self.classes = classes
        self.folders = folders
        defs = (data.get("definitions") or {}).get("subgraphs") or []
        self.subgraphs = {sg["id"]: sg for sg in defs if isinstance(sg, dict) and "id" in sg}
        self.nodes: dict[str, dict] = {}  # id ("7", or "68:96" inside a subgraph) -> node (with "_scope")
        self.links: dict[str, tuple[str, int, str, int]] = {}
        self.sub_inputs: dict[str, list[tuple[str, Any] | None]] = {}  # "68:-10" -> per input slot
        self.sub_outputs: dict[str, list[str | None]] = {}  # instance "68" -> inner link id per output
        self._flatten(data, "", ())

    def _flatten(self, graph: dict, scope: str, stack: tuple[str, ...]) -> None:
        self.links.update(_link_table(graph, scope))
        for node in graph.get("nodes") or []:
            nid = f"{scope}{int(node['id'])}"
            sg = self.subgraphs.get(node.get("type"))
            if sg is None:
                self.nodes[nid] = {**node, "_scope": scope}
                continue
            if sg["id"] in stack:
                raise InputError(f"UI workflow: subgraph {sg.get('name') or sg['id']} contains itself")
            inner = f"{nid}:"
            by_name = {inp.get("name"): inp for inp in node.get("inputs") or []}
            widgets = list(node.get("widgets_values") or []) if isinstance(node.get("widgets_values"), list) else []
            slots: list[tuple[str, Any] | None] = []
            for sg_in in sg.get("inputs") or []:
                inst = by_name.get(sg_in.get("name"))
                if inst is not None and inst.get("link") is not None:
                    slots.append(("link", _link_id(scope, inst["link"])))
                elif sg_in.get("type") in WIDGET_TYPES and widgets:
                    slots.append(("value", widgets.pop(0)))
                else:
                    slots.append(None)
            self.sub_inputs[f"{inner}{SUBGRAPH_INPUT}"] = slots
            self.sub_outputs[nid] = [_link_id(inner, (out.get("linkIds") or [None])[0])
                                     for out in sg.get("outputs") or []]
            self._flatten(sg, inner, stack + (sg["id"],))

    def resolve(self, link_id: str | None, seen: frozenset = frozenset()) -> tuple[str, Any] | None:
        """Follow a link to a real output: ("link", [id, slot]) or ("value", v); None = nothing."""
        if link_id is None or link_id not in self.links:
            return None
        if link_id in seen:
            raise InputError(f"UI workflow: link {link_id} loops through reroute/bypass nodes")
        seen = seen | {link_id}
        o_id, o_slot, _, _ = self.links[link_id]
        if o_id in self.sub_inputs:  # a subgraph's input: the instance's link or widget value
            slots = self.sub_inputs[o_id]
            entry = slots[o_slot] if o_slot < len(slots) else None
            if entry is None:
                return None
            return self.resolve(entry[1], seen) if entry[0] == "link" else entry
        if o_id in self.sub_outputs:  # an instance's output: the subgraph's output inside
            outs = self.sub_outputs[o_id]
            return self.resolve(outs[o_slot] if o_slot < len(outs) else None, seen)
        origin = self.nodes.get(o_id)
        if origin is None:
            raise InputError(f"UI workflow: link {link_id} comes from node {o_id}, which does not exist")
        kind, mode, scope = origin.get("type"), origin.get("mode", 0), origin["_scope"]
        if kind == "Reroute":
            ins = origin.get("inputs") or []
            return self.resolve(_link_id(scope, ins[0].get("link")) if ins else None, seen)
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
                    return self.resolve(_link_id(scope, inp["link"]), seen)
            return None
        return ("link", [o_id, o_slot])

    def convert_node(self, nid: str, node: dict) -> dict[str, Any]:
        class_type = node.get("type")
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
                if i >= len(values):  # a widget newer than the saved workflow: the frontend gives its default
                    section = spec.get("required", {}) if name in spec.get("required", {}) else spec["optional"]
                    opts = section[name][1] if len(section[name]) > 1 and isinstance(section[name][1], dict) else {}
                    if "default" in opts:
                        inputs[name] = opts["default"]
                    continue
                inputs[name] = values[i]
                i += 2 if control else 1
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            resolved = self.resolve(_link_id(node["_scope"], inp["link"]))
            if resolved is None:
                if "widget" not in inp:  # an unconnected socket input: the frontend leaves it out
                    inputs.pop(inp["name"], None)
                continue
            inputs[inp["name"]] = resolved[1]
        title = node.get("title") or getattr(cls, "DISPLAY_NAME", None) or class_type
        return {"inputs": inputs, "class_type": class_type, "_meta": {"title": title}}

    def convert(self) -> dict[str, dict[str, Any]]:
        from sd35fp8.workflow.nodes_control import check_available

        live = {nid: node for nid, node in self.nodes.items()
                if node.get("type") not in ("Reroute", "PrimitiveNode", *IGNORED_TYPES)
                and node.get("mode", 0) not in (MODE_NEVER, MODE_BYPASS)}
        for nid, node in live.items():  # a template node that cannot run here: its own message first
            check_available(node.get("type"), f"UI workflow node {nid} ({node.get('title') or node.get('type')})")
        return {nid: self.convert_node(nid, node) for nid, node in live.items()}


def ui_to_api(workflow: dict, classes: Mapping[str, type] | None = None, folders: Any = None) -> dict[str, dict]:
    """Convert a UI-format workflow to an API-format prompt (node ids as strings)."""
    if not is_ui_workflow(workflow):
        raise InputError("not a ComfyUI UI workflow (expected 'nodes' and 'links')")
    if classes is None:
        from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS as classes  # noqa: N811
    return _Converter(workflow, classes, folders).convert()
