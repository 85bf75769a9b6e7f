"""Run a validated API-format prompt: only what feeds the outputs, in order, with a cache.

Cache: each node gets a key = hash(class_type, literal inputs, upstream keys + slots, IS_CHANGED).
Outputs are kept by key between prompts, so a prompt that only changes KSampler's seed re-runs
KSampler and what is downstream of it: no checkpoint reload, no text re-encode. Entries whose key
is not in the new prompt are dropped before it runs (frees the old models first, as ComfyUI does).

Events go to `hooks(event, data)` with ComfyUI's websocket names and payloads:
execution_start, execution_cached, executing, progress, executed, execution_success,
execution_error, execution_interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sd35fp8.errors import InputError
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.graph import execution_order, is_link, parse_prompt
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, Node, NodeContext
from sd35fp8.workflow.validate import full_type_name, validate_prompt

log = logging.getLogger(__name__)

Hooks = Callable[[str, dict], None]


class InterruptProcessing(Exception):
    """Raised inside a node when the executor's interrupt flag is set."""


class PromptValidationError(InputError):
    """The prompt failed validation; carries ComfyUI's (error, node_errors)."""

    def __init__(self, error: dict, node_errors: dict):
        self.error = error
        self.node_errors = node_errors
        lines = [f"{error['message']}: {error['details']}".rstrip(": ")]
        for nid, ne in node_errors.items():
            for e in ne["errors"]:
                lines.append(f"  node {nid} ({ne['class_type']}): {e['message']}: {e['details']}")
        super().__init__("\n".join(lines))


@dataclass
class ExecutionResult:
    prompt_id: str
    success: bool
    outputs: dict[str, dict] = field(default_factory=dict)  # node id -> ui dict (history "outputs")
    executed: list[str] = field(default_factory=list)  # ran now
    cached: list[str] = field(default_factory=list)  # served from the cache
    error: dict | None = None  # execution_error payload
    interrupted: bool = False


def _now_ms() -> int:
    return int(time.time() * 1000)


def format_value(x: Any) -> Any:
    """ComfyUI format_value: plain values as they are, anything else as str()."""
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


class PromptExecutor:
    """Executes prompts against one models folder on one device; keeps the output cache."""

    def __init__(self, folders: ModelFolders, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 classes: Mapping[str, type[Node]] | None = None, options: dict[str, Any] | None = None):
        self.folders = folders
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.classes = dict(NODE_CLASS_MAPPINGS if classes is None else classes)
        self.options = dict(options or {})
        self._cache: dict[str, tuple[tuple, dict | None]] = {}  # key -> (outputs, ui)
        self._interrupt = threading.Event()

    # ---- control ---------------------------------------------------------------------------
    def interrupt(self) -> None:
        """Ask the running prompt to stop at the next node or sampler step."""
        self._interrupt.set()

    def clear_cache(self) -> None:
        self._cache.clear()

    def _check_interrupt(self) -> None:
        if self._interrupt.is_set():
            self._interrupt.clear()
            raise InterruptProcessing("Processing interrupted")

    # ---- keys ------------------------------------------------------------------------------
    def node_keys(self, prompt: dict, order: Iterable[str]) -> dict[str, str]:
        keys: dict[str, str] = {}
        for nid in order:
            node = prompt[nid]
            cls = self.classes[node["class_type"]]
            parts: dict[str, Any] = {}
            literals = {}
            for name, value in node["inputs"].items():
                if is_link(value):
                    parts[name] = ["link", keys[str(value[0])], value[1]]
                else:
                    parts[name] = ["value", value]
                    literals[name] = value
            changed = cls.IS_CHANGED(self.folders, **literals)
            blob = json.dumps([node["class_type"], parts, format_value(changed)], sort_keys=True, default=str)
            keys[nid] = hashlib.sha256(blob.encode()).hexdigest()
        return keys

    # ---- run -------------------------------------------------------------------------------
    def execute(self, prompt: dict, prompt_id: str = "", extra_data: dict | None = None,
                hooks: Hooks | None = None, execute_outputs: list[str] | None = None) -> ExecutionResult:
        """Run the prompt. Validates first unless execute_outputs (from validate_prompt) is given."""
        extra_data = extra_data or {}
        send = hooks or (lambda event, data: None)
        prompt = parse_prompt(prompt)
        if execute_outputs is None:
            ok, error, execute_outputs, node_errors = validate_prompt(prompt, self.classes, self.folders)
            if not ok:
                raise PromptValidationError(error, node_errors)
        self._interrupt.clear()
        result = ExecutionResult(prompt_id=prompt_id, success=False)
        send("execution_start", {"prompt_id": prompt_id, "timestamp": _now_ms()})

        order = execution_order(prompt, execute_outputs)
        keys = self.node_keys(prompt, order)
        wanted = set(keys.values())
        for k in [k for k in self._cache if k not in wanted]:
            del self._cache[k]
        result.cached = [nid for nid in order if keys[nid] in self._cache]
        send("execution_cached", {"nodes": list(result.cached), "prompt_id": prompt_id, "timestamp": _now_ms()})

        with torch.inference_mode():
            for nid in order:
                node = prompt[nid]
                key = keys[nid]
                if key in self._cache:
                    ui = self._cache[key][1]
                    if ui:
                        result.outputs[nid] = ui
                        send("executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": prompt_id})
                    continue
                inputs: dict[str, Any] | None = None
                try:
                    self._check_interrupt()
                    send("executing", {"node": nid, "display_node": nid, "prompt_id": prompt_id})
                    inputs = self._gather_inputs(prompt, nid, keys, extra_data)
                    outputs, ui = self._run_node(nid, node["class_type"], inputs, prompt_id, send)
                except InterruptProcessing:
                    log.info("Processing interrupted")
                    result.interrupted = True
                    send("execution_interrupted", {"prompt_id": prompt_id, "node_id": nid,
                                                   "node_type": node["class_type"], "executed": list(result.executed),
                                                   "timestamp": _now_ms()})
                    break
                except Exception as ex:  # noqa: BLE001 - the node error boundary: reported, never swallowed
                    log.error("!!! Exception during processing !!! node %s (%s): %s", nid, node["class_type"], ex)
                    log.debug("%s", traceback.format_exc())
                    result.error = {
                        "prompt_id": prompt_id,
                        "node_id": nid,
                        "node_type": node["class_type"],
                        "executed": list(result.executed),
                        "exception_message": str(ex),
                        "exception_type": full_type_name(type(ex)),
                        "traceback": traceback.format_tb(ex.__traceback__),
                        "current_inputs": {k: [format_value(v)] for k, v in (inputs or {}).items()},
                        "current_outputs": [n for n in order if keys[n] in self._cache],
                        "timestamp": _now_ms(),
                    }
                    send("execution_error", result.error)
                    break
                self._cache[key] = (outputs, ui)
                result.executed.append(nid)
                if ui:
                    result.outputs[nid] = ui
                    send("executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": prompt_id})
            else:
                result.success = True
                send("execution_success", {"prompt_id": prompt_id, "timestamp": _now_ms()})
        send("executing", {"node": None, "prompt_id": prompt_id})
        return result

    def _gather_inputs(self, prompt: dict, nid: str, keys: dict[str, str], extra_data: dict) -> dict[str, Any]:
        node = prompt[nid]
        spec = self.classes[node["class_type"]].INPUT_TYPES(self.folders)
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        out: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if name not in declared:
                continue  # ComfyUI ignores inputs the node does not declare
            if is_link(value):
                outputs, _ = self._cache[keys[str(value[0])]]
                out[name] = outputs[value[1]]
            else:
                out[name] = value
        for name, kind in spec.get("hidden", {}).items():
            if kind == "PROMPT":
                out[name] = prompt
            elif kind == "EXTRA_PNGINFO" and "extra_pnginfo" in extra_data:
                out[name] = extra_data["extra_pnginfo"]
            elif kind == "UNIQUE_ID":
                out[name] = nid
        return out

    def _run_node(self, nid: str, class_type: str, inputs: dict, prompt_id: str,
                  send: Hooks) -> tuple[tuple, dict | None]:
        cls = self.classes[class_type]

        def progress(value: int, total: int) -> None:
            send("progress", {"value": int(value), "max": int(total), "prompt_id": prompt_id, "node": nid})

        ctx = NodeContext(folders=self.folders, device=self.device, dtype=self.dtype, node_id=nid, progress=progress,
                          check_interrupt=self._check_interrupt, options=self.options)
        ret = getattr(cls(ctx), cls.FUNCTION)(**inputs)
        ui = None
        if isinstance(ret, dict):
            ui = ret.get("ui")
            ret = ret.get("result", ())
        outputs = tuple(ret)
        if len(outputs) != len(cls.RETURN_TYPES):
            raise RuntimeError(f"node {nid} ({class_type}) returned {len(outputs)} outputs, "
                               f"declares {len(cls.RETURN_TYPES)}")
        return outputs, ui
