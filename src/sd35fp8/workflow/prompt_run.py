"""One prompt's run through the executor: its order, cache keys, events and result.

`PromptExecutor.execute` steps a `PromptRun` through every node; `workflow.batch.execute_batch`
steps several around one shared sampling call. Also the values both hand out: `ExecutionResult`,
`PromptJob`, the events' payload helpers and the exceptions a run raises.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sd35fp8.errors import InputError
from sd35fp8.workflow.graph import execution_order, is_link, parse_prompt
from sd35fp8.workflow.previews import StepPreview, resolve_method
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
    sampled_with: int = 1  # prompts in the sampling batch it ran in (cross-prompt batching; 1 = alone)
    output_dir: Path | None = None  # where SaveImage wrote (run_workflow fills it in)


def _now_ms() -> int:
    return int(time.time() * 1000)


def early_error(prompt_id: str, ex: Exception) -> dict:
    """execution_error payload for an error before any node ran (graph cycle, bad IS_CHANGED input)."""
    return {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
            "exception_message": str(ex), "exception_type": type(ex).__name__, "traceback": [],
            "current_inputs": {}, "current_outputs": [], "timestamp": _now_ms()}


def explain_error(ex: BaseException, nid: str, class_type: str) -> str:
    """The execution_error message: the exception's text, plus what to change where we know it."""
    text = str(ex)
    if isinstance(ex, torch.cuda.OutOfMemoryError):
        text += (f"\nThe GPU ran out of memory in node {nid} ({class_type}). To fit: use a smaller width/height "
                 "or batch_size, batch fewer prompts together (--max-batch), or start with --offload model "
                 "(text encoders and VAE leave the GPU between uses) or --offload sequential (least memory). "
                 "The memory this prompt held has been released.")
    return text


def format_value(x: Any) -> Any:
    """ComfyUI format_value: plain values as they are, anything else as str()."""
    if x is None or isinstance(x, (int, float, bool, str)):
        return x
    return str(x)


@dataclass
class PromptJob:
    """One queued prompt for `execute_batch` (same arguments as `execute`)."""

    prompt: dict
    prompt_id: str = ""
    extra_data: dict | None = None
    hooks: Hooks | None = None
    execute_outputs: list[str] | None = None


class PromptRun:
    """One prompt's execution: its order, cache keys, events and result. `execute` steps through
    every node; `execute_batch` steps several runs around one shared sampling call."""

    def __init__(self, executor: Any, prompt: dict, prompt_id: str = "", extra_data: dict | None = None,
                 hooks: Hooks | None = None, execute_outputs: list[str] | None = None, batched: bool = False):
        self.ex = executor
        self.extra_data = extra_data or {}
        self.send: Hooks = hooks or (lambda event, data: None)
        self.prompt = parse_prompt(prompt)
        if execute_outputs is None:
            ok, error, execute_outputs, node_errors = validate_prompt(self.prompt, executor.classes, executor.folders)
            if not ok:
                raise PromptValidationError(error, node_errors)
        self.execute_outputs = execute_outputs
        self.prompt_id = prompt_id
        self.result = ExecutionResult(prompt_id=prompt_id, success=False)
        self.stopped = False  # an error or an interrupt ended it
        self.order: list[str] = []
        self.keys: dict[str, str] = {}
        self.visited: set[str] = set()  # nodes run or served from the cache
        # in a batch an interrupt names the prompt it stops; alone, any interrupt stops it
        self.check_interrupt = (lambda: executor._check_interrupt_for(prompt_id)) if batched else None

    @property
    def wanted(self) -> set[str]:
        return set(self.keys.values())

    def begin(self) -> None:
        self.send("execution_start", {"prompt_id": self.prompt_id, "timestamp": _now_ms()})
        self.order = execution_order(self.prompt, self.execute_outputs)
        self.keys = self.ex.node_keys(self.prompt, self.order)

    def announce_cached(self) -> None:
        self.result.cached = [nid for nid in self.order if self.keys[nid] in self.ex._cache]
        self.send("execution_cached", {"nodes": list(self.result.cached), "prompt_id": self.prompt_id,
                                       "timestamp": _now_ms()})

    def fail_early(self, ex: Exception) -> None:
        """An error before any node ran (graph cycle, bad IS_CHANGED input): reported like a node error."""
        self.stopped = True
        self.result.error = early_error(self.prompt_id, ex)
        self.send("execution_error", self.result.error)

    def cached(self, nid: str) -> bool:
        return self.keys[nid] in self.ex._cache

    def step(self, nid: str) -> bool:
        """Run (or serve from the cache) one node. False when the prompt stopped (error, interrupt)."""
        if self.stopped:
            return False
        if self.cached(nid):
            self._done(nid, self.ex._cache[self.keys[nid]][1], executed=False)
            return True
        node = self.prompt[nid]
        inputs: dict[str, Any] | None = None
        try:
            (self.check_interrupt or self.ex._check_interrupt)()
            self.executing(nid)
            inputs = self.inputs(nid)
            outputs, ui = self.ex._run_node(nid, node["class_type"], inputs, self.prompt_id, self.send,
                                            self.check_interrupt, partial(self.preview, nid))
        except InterruptProcessing:
            self.interrupted(nid)
            return False
        except Exception as ex:  # noqa: BLE001 - the node error boundary: reported, never swallowed
            self.fail(nid, ex, inputs)
            return False
        self.store(nid, outputs, ui)
        return True

    def preview(self, nid: str) -> StepPreview | None:
        """The step previews node `nid` sends if it samples (workflow/previews.py): the prompt's
        extra_data["preview_method"] over the executor's, and extra_data["partial_images"] (the /v1 route's)
        decoded by the VAE that a VAEDecode of this node's output uses. None when there is nothing to send."""
        if not self.ex.sends_previews:
            return None
        method = resolve_method(self.extra_data.get("preview_method"), self.ex.preview_method)
        count = self.extra_data.get("partial_images")
        count = count if isinstance(count, int) and not isinstance(count, bool) else 0
        decode = self._decoder(nid) if count > 0 else None
        taesd = self.ex.taesd_decoder() if method == "taesd" else None
        preview = StepPreview(method, count, decode, self.ex.preview_size, taesd)
        return preview if preview.active else None

    def _decoder(self, nid: str) -> Any:
        """denoised [1, 16, h, w] (model space) -> IMAGE, by the VAE of the first VAEDecode whose samples are
        output 0 of `nid`; None when none is found or its VAE is not computed yet."""
        for node in self.prompt.values():
            inputs = node.get("inputs", {})
            vae = inputs.get("vae")
            if node.get("class_type") != "VAEDecode" or list(inputs.get("samples") or ()) != [nid, 0] or \
                    not is_link(vae) or str(vae[0]) not in self.keys:
                continue
            cached = self.ex._cache.get(self.keys[str(vae[0])])
            if cached is None:
                return None
            from sd35fp8.models.vae import to_vae_space
            from sd35fp8.workflow.engine import vae_decode

            model = cached[0][int(vae[1])]
            if isinstance(model, list):  # several VAEs (a list output): no single decoder for the previews
                return None
            offloader = self.ex.engine_options.offloader
            return lambda z: vae_decode(model, {"samples": to_vae_space(z.float())}, offloader)
        return None

    def executing(self, nid: str) -> None:
        self.send("executing", {"node": nid, "display_node": nid, "prompt_id": self.prompt_id})

    def inputs(self, nid: str) -> dict[str, Any]:
        return self.ex._gather_inputs(self.prompt, nid, self.keys, self.extra_data)

    def store(self, nid: str, outputs: tuple, ui: dict | None) -> None:
        self.ex._cache[self.keys[nid]] = (outputs, ui)
        self._done(nid, ui, executed=True)

    def _done(self, nid: str, ui: dict | None, executed: bool) -> None:
        self.visited.add(nid)
        if executed:
            self.result.executed.append(nid)
        if ui:
            self.result.outputs[nid] = ui
            self.send("executed", {"node": nid, "display_node": nid, "output": ui, "prompt_id": self.prompt_id})

    def interrupted(self, nid: str) -> None:
        log.info("Processing interrupted")
        self.stopped = True
        self.result.interrupted = True
        self.send("execution_interrupted", {"prompt_id": self.prompt_id, "node_id": nid,
                                            "node_type": self.prompt[nid]["class_type"],
                                            "executed": list(self.result.executed), "timestamp": _now_ms()})

    def fail(self, nid: str, ex: BaseException, inputs: dict | None) -> None:
        class_type = self.prompt[nid]["class_type"]
        log.error("!!! Exception during processing !!! node %s (%s): %s", nid, class_type, ex)
        log.debug("%s", traceback.format_exc())
        self.stopped = True
        self.result.error = {
            "prompt_id": self.prompt_id,
            "node_id": nid,
            "node_type": class_type,
            "executed": list(self.result.executed),
            "exception_message": explain_error(ex, nid, class_type),
            "exception_type": full_type_name(type(ex)),
            "traceback": traceback.format_tb(ex.__traceback__),
            "current_inputs": {k: [format_value(v)] for k, v in (inputs or {}).items()},
            "current_outputs": [n for n in self.order if self.keys[n] in self.ex._cache],
            "timestamp": _now_ms(),
        }
        self.send("execution_error", self.result.error)

    def finish(self) -> ExecutionResult:
        if not self.stopped:
            self.result.success = True
            self.send("execution_success", {"prompt_id": self.prompt_id, "timestamp": _now_ms()})
        self.send("executing", {"node": None, "prompt_id": self.prompt_id})
        return self.result
