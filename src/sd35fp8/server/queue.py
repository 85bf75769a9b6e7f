"""Prompt queue, history and the one worker thread that runs the executor (ComfyUI execution.py).

Queue items are ComfyUI's 5-element lists `[number, prompt_id, prompt, extra_data, outputs_to_execute]`;
the lowest number runs first (`front` gives a negative number). History entries are
`{prompt, outputs, status: {status_str, completed, messages}, meta}` keyed by prompt id.

Events from the executor go to `send(event, data, sid)`: sid is the prompt's client_id (None =
every socket), exactly as ComfyUI's `send_sync(..., server.client_id)`.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from sd35fp8.errors import InputError, SD35Error

log = logging.getLogger(__name__)

QueueItem = list  # [number, prompt_id, prompt, extra_data, outputs_to_execute]
Send = Callable[[str, Any, "str | None"], None]

MAX_HISTORY = 10000  # ComfyUI MAXIMUM_HISTORY_SIZE
# Events that ComfyUI keeps in history status.messages (execution.py add_message(broadcast=...)).
STATUS_EVENTS = ("execution_start", "execution_cached", "execution_success", "execution_error",
                 "execution_interrupted")


class QueueFullError(InputError):
    """POST /prompt when `max_queue` prompts are already waiting."""


class PromptQueue:
    """Thread-safe heap of pending items, the running ones, and the history."""

    def __init__(self, max_queue: int = 100, max_history: int = MAX_HISTORY,
                 on_change: Callable[[], None] | None = None):
        if max_queue < 1:
            raise InputError(f"max_queue must be at least 1, got {max_queue}")
        self.max_queue = max_queue
        self.max_history = max_history
        self.on_change = on_change or (lambda: None)
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, QueueItem]] = []
        self._tie = itertools.count()
        self._running: dict[int, QueueItem] = {}
        self._task_ids = itertools.count()
        self._history: dict[str, dict] = {}
        self._number = 0

    # ---- numbers (POST /prompt "front" / "number") ------------------------------------------
    def next_number(self, front: bool = False, number: Any = None) -> float | int:
        """ComfyUI: an explicit number is used as is; else the counter (negated for front)."""
        if number is not None:
            try:
                return float(number)
            except (TypeError, ValueError) as e:
                raise InputError(f"'number' must be a number, got {number!r}") from e
        with self._cond:
            n = self._number
            self._number += 1
        return -n if front else n

    # ---- queue ------------------------------------------------------------------------------
    def put(self, item: QueueItem) -> None:
        with self._cond:
            if len(self._heap) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} prompts waiting); "
                                     "retry later or raise max_queue")
            heapq.heappush(self._heap, (item[0], next(self._tie), item))
            self._cond.notify()
        self.on_change()

    def get(self, timeout: float | None = None) -> tuple[int, QueueItem] | None:
        """Pop the first pending item and mark it running; None on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._heap), timeout=timeout):
                return None
            item = heapq.heappop(self._heap)[2]
            task_id = next(self._task_ids)
            self._running[task_id] = item
        self.on_change()
        return task_id, item

    def task_done(self, task_id: int, outputs: dict, status: dict, meta: dict | None = None) -> None:
        """Store the history entry, then drop the item from running (one lock: no gap a client sees)."""
        with self._cond:
            item = self._running.pop(task_id)
            if len(self._history) >= self.max_history:
                self._history.pop(next(iter(self._history)))
            self._history[item[1]] = {
                "prompt": item, "outputs": outputs, "status": status, "meta": meta or {},
            }
        self.on_change()

    def pending(self) -> list[QueueItem]:
        with self._cond:
            return [e[2] for e in sorted(self._heap)]

    def current_queue(self) -> tuple[list[QueueItem], list[QueueItem]]:
        """(queue_running, queue_pending), pending in run order; deep copies, JSON-ready."""
        with self._cond:
            running = [copy.deepcopy(i) for i in self._running.values()]
            pending = [copy.deepcopy(e[2]) for e in sorted(self._heap, key=lambda e: (e[0], e[1]))]
        return running, pending

    def tasks_remaining(self) -> int:
        with self._cond:
            return len(self._heap) + len(self._running)

    def running_ids(self) -> list[str]:
        with self._cond:
            return [i[1] for i in self._running.values()]

    def wipe_queue(self) -> list[str]:
        with self._cond:
            ids = [e[2][1] for e in self._heap]
            self._heap = []
        self.on_change()
        return ids

    def delete_queue_item(self, prompt_id: str) -> bool:
        with self._cond:
            keep = [e for e in self._heap if e[2][1] != prompt_id]
            found = len(keep) != len(self._heap)
            heapq.heapify(keep)
            self._heap = keep
        if found:
            self.on_change()
        return found

    # ---- history ----------------------------------------------------------------------------
    def history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        """ComfyUI get_history: one id, or the last `max_items` entries (from `offset` when >= 0)."""
        with self._cond:
            if prompt_id is not None:
                entry = self._history.get(prompt_id)
                return {prompt_id: copy.deepcopy(entry)} if entry is not None else {}
            items = list(self._history.items())
        if offset < 0 and max_items is not None:
            offset = max(len(items) - max_items, 0)
        offset = max(offset, 0)
        end = None if max_items is None else offset + max_items
        return {k: copy.deepcopy(v) for k, v in items[offset:end]}

    def wipe_history(self) -> None:
        with self._cond:
            self._history.clear()

    def delete_history_item(self, prompt_id: str) -> bool:
        with self._cond:
            return self._history.pop(prompt_id, None) is not None


# ---- cross-prompt batching seam ---------------------------------------------------------------
_SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced")
_LATENT_CLASSES = ("EmptySD3LatentImage", "EmptyLatentImage")
_LOADER_INPUTS = ("ckpt_name", "unet_name", "clip_name1", "clip_name2", "clip_name3", "vae_name")
_SAMPLER_INPUTS = ("steps", "cfg", "sampler_name", "scheduler", "denoise", "add_noise", "start_at_step",
                   "end_at_step", "return_with_leftover_noise")


def batch_key(prompt: dict) -> tuple | None:
    """What must match for two prompts to share one GPU batch: model files, latent size, sampler
    settings. None when the prompt is not a plain text-to-image graph (never batched)."""
    samplers = [n for n in prompt.values() if n.get("class_type") in _SAMPLER_CLASSES]
    latents = [n for n in prompt.values() if n.get("class_type") in _LATENT_CLASSES]
    if len(samplers) != 1 or len(latents) != 1:
        return None
    models = tuple(sorted((k, str(v)) for n in prompt.values() for k, v in n.get("inputs", {}).items()
                          if k in _LOADER_INPUTS))
    size = tuple(latents[0]["inputs"].get(k) for k in ("width", "height"))
    sampler = tuple((k, samplers[0]["inputs"].get(k)) for k in _SAMPLER_INPUTS)
    shapes = tuple(sorted(n.get("class_type", "") for n in prompt.values()))
    return (models, size, sampler, shapes)


def select_batch(first: QueueItem, pending: Sequence[QueueItem], max_batch: int) -> list[QueueItem]:
    """The pending items that can run in one GPU batch with `first` (first included), at most max_batch."""
    batch = [first]
    key = batch_key(first[2])
    if key is None or max_batch <= 1:
        return batch
    for item in pending:
        if len(batch) >= max_batch:
            break
        if batch_key(item[2]) == key:
            batch.append(item)
    return batch


# ---- worker -----------------------------------------------------------------------------------
class PromptWorker:
    """One thread: take the next item, run the executor, store history, report over `send`.

    Batching: the workflow executor has no batched path yet, so every prompt runs alone (batch
    size 1). The seam is `select_batch(first, queue.pending(), n)`: once the executor can run
    several prompts as one GPU batch, the loop pops those items together and calls it once.
    """

    def __init__(self, queue: PromptQueue, executor: Any, send: Send):
        self.queue = queue
        self.executor = executor
        self.send = send
        self.current: dict[str, str | None] = {}  # prompt_id -> node now executing
        self._stop = threading.Event()
        self._free: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="sd35fp8-prompt-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> list[str]:
        """Stop taking prompts; wait for the running one. Returns the ids left pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return [i[1] for i in self.queue.pending()]

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt (only if it is `prompt_id`, when given)."""
        running = self.queue.running_ids()
        if not running or (prompt_id is not None and prompt_id not in running):
            return False
        self.executor.interrupt()
        return True

    def request_free(self, unload_models: bool = False, free_memory: bool = False) -> None:
        """POST /free: applied by the worker between prompts (never under a running node)."""
        with self._lock:
            self._free["unload_models"] = self._free.get("unload_models", False) or unload_models
            self._free["free_memory"] = self._free.get("free_memory", False) or free_memory

    def _apply_free(self) -> None:
        with self._lock:
            flags, self._free = self._free, {}
        if flags.get("unload_models") or flags.get("free_memory"):
            self.executor.clear_cache()
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("freed models and cached outputs (%s)", ", ".join(k for k, v in flags.items() if v))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_free()
            got = self.queue.get(timeout=0.2)
            if got is None:
                continue
            task_id, item = got
            self.run_one(task_id, item)

    def run_one(self, task_id: int, item: QueueItem) -> None:
        number, prompt_id, prompt, extra_data, outputs = item
        sid = extra_data.get("client_id")
        messages: list[list] = []
        meta: dict[str, dict] = {}

        done: list[dict] = []

        def hooks(event: str, data: Any) -> None:
            if event == "executing" and data.get("node") is None:
                done.append(data)  # ComfyUI sends this after the history is stored (prompt_worker)
                return
            if event in STATUS_EVENTS:
                messages.append([event, data])
            if event == "executing":
                self.current[prompt_id] = data.get("node")
            if event == "executed":
                nid = data["node"]
                meta[nid] = {"node_id": nid, "display_node": data.get("display_node", nid),
                             "parent_node": None, "real_node_id": nid}
            self.send(event, data, sid)

        t0 = time.perf_counter()
        result = None
        try:
            result = self.executor.execute(prompt, prompt_id, extra_data, hooks=hooks, execute_outputs=outputs)
        except SD35Error as ex:  # errors before any node runs (graph cycle, ...): reported like a node error
            err = {"prompt_id": prompt_id, "node_id": None, "node_type": None, "executed": [],
                   "exception_message": str(ex), "exception_type": type(ex).__name__, "traceback": [],
                   "current_inputs": {}, "current_outputs": [], "timestamp": int(time.time() * 1000)}
            hooks("execution_error", err)
            hooks("executing", {"node": None, "prompt_id": prompt_id})
        finally:
            self.current.pop(prompt_id, None)
        success = bool(result is not None and result.success)
        status = {"status_str": "success" if success else "error", "completed": success, "messages": messages}
        self.queue.task_done(task_id, dict(result.outputs) if result is not None else {}, status, meta)
        self.send("executing", done[-1] if done else {"node": None, "prompt_id": prompt_id}, sid)
        log.info("Prompt %s (#%s) %s in %.2f s", prompt_id, number, status["status_str"],
                 time.perf_counter() - t0)
