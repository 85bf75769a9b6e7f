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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from sd35fp8.workflow.batch import execute_batch
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.graph import is_link
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, Node, NodeContext
from sd35fp8.workflow.prompt_run import (  # noqa: F401 - re-exported: the executor's public values
    ExecutionResult, Hooks, InterruptProcessing, PromptJob, PromptRun, PromptValidationError, early_error,
    format_value)

log = logging.getLogger(__name__)


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
        self._interrupt_lock = threading.Lock()
        self._interrupt_ids: set[str] | None = None  # None: every running prompt

    # ---- control ---------------------------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> None:
        """Ask the running prompt(s) to stop at the next node or sampler step. With `prompt_id`,
        a cross-prompt batch stops only that prompt (the others go on); a lone prompt always stops."""
        with self._interrupt_lock:
            if prompt_id is None:
                self._interrupt_ids = None
            elif not self._interrupt.is_set():
                self._interrupt_ids = {prompt_id}
            elif self._interrupt_ids is not None:
                self._interrupt_ids.add(prompt_id)
            self._interrupt.set()

    def clear_cache(self) -> None:
        self._cache.clear()

    def _clear_interrupt(self) -> None:
        with self._interrupt_lock:
            self._interrupt.clear()
            self._interrupt_ids = None

    def _check_interrupt(self) -> None:
        if self._interrupt.is_set():
            self._clear_interrupt()
            raise InterruptProcessing("Processing interrupted")

    def interrupted_among(self, prompt_ids: Iterable[str]) -> set[str]:
        """Consume and return the pending interrupt requests that hit any of `prompt_ids`."""
        ids = set(prompt_ids)
        with self._interrupt_lock:
            if not self._interrupt.is_set():
                return set()
            if self._interrupt_ids is None:
                hit = ids
                self._interrupt.clear()
            else:
                hit = ids & self._interrupt_ids
                self._interrupt_ids -= hit
                if not self._interrupt_ids:
                    self._interrupt.clear()
                    self._interrupt_ids = None
        return hit

    def _check_interrupt_for(self, prompt_id: str) -> None:
        if self._interrupt.is_set() and self.interrupted_among([prompt_id]):
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

    def drop_cache_except(self, wanted: set[str]) -> None:
        """Free cached outputs no running prompt needs (old models first, as ComfyUI does)."""
        for k in [k for k in self._cache if k not in wanted]:
            del self._cache[k]

    # ---- run -------------------------------------------------------------------------------
    def execute(self, prompt: dict, prompt_id: str = "", extra_data: dict | None = None,
                hooks: Hooks | None = None, execute_outputs: list[str] | None = None) -> ExecutionResult:
        """Run the prompt. Validates first unless execute_outputs (from validate_prompt) is given."""
        run = PromptRun(self, prompt, prompt_id, extra_data, hooks, execute_outputs)
        self._clear_interrupt()
        run.begin()
        self.drop_cache_except(run.wanted)
        run.announce_cached()
        with torch.inference_mode():
            for nid in run.order:
                if not run.step(nid):
                    break
        return run.finish()

    def execute_batch(self, jobs: Sequence[PromptJob],
                      on_result: Callable[[int, ExecutionResult], None] | None = None) -> list[ExecutionResult]:
        """Run several prompts, sampling the compatible ones as one batch (workflow/batch.py)."""
        return execute_batch(self, jobs, on_result)

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

    def node_context(self, nid: str, prompt_id: str, send: Hooks,
                     check_interrupt: Callable[[], None] | None = None) -> NodeContext:
        def progress(value: int, total: int) -> None:
            send("progress", {"value": int(value), "max": int(total), "prompt_id": prompt_id, "node": nid})

        return NodeContext(folders=self.folders, device=self.device, dtype=self.dtype, node_id=nid,
                           progress=progress, check_interrupt=check_interrupt or self._check_interrupt,
                           options=self.options)

    def _run_node(self, nid: str, class_type: str, inputs: dict, prompt_id: str, send: Hooks,
                  check_interrupt: Callable[[], None] | None = None) -> tuple[tuple, dict | None]:
        cls = self.classes[class_type]
        ctx = self.node_context(nid, prompt_id, send, check_interrupt)
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


