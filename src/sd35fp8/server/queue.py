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
from sd35fp8.workflow.batch import batch_key
from sd35fp8.workflow.executor import PromptJob, early_error

log = logging.getLogger(__name__)

QueueItem = list  # [number, prompt_id, prompt, extra_data, outputs_to_execute]
Send = Callable[[str, Any, "str | None"], None]

MAX_HISTORY = 10000  # ComfyUI MAXIMUM_HISTORY_SIZE
DEFAULT_MAX_BATCH = 8  # prompts sampled as one GPU batch at most
DEFAULT_BATCH_WAIT_MS = 20.0  # how long a taken prompt waits for compatible ones
BROADCAST_EVENTS = ("progress", "progress_state", "execution_interrupted")  # sent to all without a client_id
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
        self._keys: dict[int, str | None] = {}  # heap tie -> batch_key of its prompt

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
            tie = next(self._tie)
            self._keys[tie] = batch_key(item[2]) if isinstance(item[2], dict) else None
            heapq.heappush(self._heap, (item[0], tie, item))
            self._cond.notify()
        self.on_change()

    def get(self, timeout: float | None = None) -> tuple[int, QueueItem] | None:
        """Pop the first pending item and mark it running; None on timeout."""
        got = self.get_batch(timeout, max_batch=1)
        return got[0] if got else None

    def get_batch(self, timeout: float | None = None, max_batch: int = 1,
                  wait_s: float = 0.0) -> list[tuple[int, QueueItem]] | None:
        """Pop the first pending item and up to max_batch-1 pending items with its batch_key (in
        queue order), waiting at most `wait_s` for more to arrive; all are marked running.
        None on timeout. Compatible prompts may so run ahead of incompatible ones queued earlier."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._heap), timeout=timeout):
                return None
            _, tie, first = heapq.heappop(self._heap)
            key = self._keys.pop(tie, None)
            taken = [self._mark_running(first)]
            if key is not None and max_batch > 1:
                deadline = time.monotonic() + wait_s
                while True:
                    matches = [e for e in self._heap if self._keys.get(e[1]) == key]
                    left = deadline - time.monotonic()
                    if len(matches) >= max_batch - 1 or left <= 0:
                        break
                    self._cond.wait(left)
                chosen = sorted(matches)[: max_batch - 1]
                if chosen:
                    gone = {e[1] for e in chosen}
                    self._heap = [e for e in self._heap if e[1] not in gone]
                    heapq.heapify(self._heap)
                    for e in chosen:
                        self._keys.pop(e[1], None)
                        taken.append(self._mark_running(e[2]))
        self.on_change()
        return taken

    def _mark_running(self, item: QueueItem) -> tuple[int, QueueItem]:
        task_id = next(self._task_ids)
        self._running[task_id] = item
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
            self._keys.clear()
        self.on_change()
        return ids

    def delete_queue_item(self, prompt_id: str) -> bool:
        with self._cond:
            keep = [e for e in self._heap if e[2][1] != prompt_id]
            found = len(keep) != len(self._heap)
            for e in self._heap:
                if e[2][1] == prompt_id:
                    self._keys.pop(e[1], None)
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


# ---- cross-prompt batching -------------------------------------------------------------------
# batch_key (sd35fp8.workflow.batch): prompts equal but for texts, seeds and filename prefixes,
# one KSampler with a deterministic sampler. The worker takes such prompts together.


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
    """One thread: take the next prompt (with compatible pending ones), run the executor, store
    each prompt's history, report over `send`.

    Cross-prompt batching: having taken a prompt, the worker waits up to `batch_wait_ms` for
    pending prompts with the same `batch_key`, up to `max_batch` in all, and runs them with
    `executor.execute_batch` (one sampling call; each prompt keeps its own events and history).
    max_batch=1 disables batching; batch_wait_ms=0 batches only what is already pending.
    `stats` counts runs, prompts, batched runs/prompts and the largest sampling batch.
    """

    def __init__(self, queue: PromptQueue, executor: Any, send: Send, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS):
        if max_batch < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        if batch_wait_ms < 0:
            raise InputError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.queue = queue
        self.executor = executor
        self.send = send
        self.max_batch = int(max_batch)
        self.batch_wait_ms = float(batch_wait_ms)
        self.current: dict[str, str | None] = {}  # prompt_id -> node now executing
        self.stats = {"runs": 0, "prompts": 0, "batched_runs": 0, "batched_prompts": 0, "largest_batch": 1}
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
        """Stop taking prompts; wait for the running ones. Returns the ids left pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        return [i[1] for i in self.queue.pending()]

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt(s) (only `prompt_id`, when given: in a batch the others go on)."""
        running = self.queue.running_ids()
        if not running or (prompt_id is not None and prompt_id not in running):
            return False
        self.executor.interrupt(prompt_id)
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
            got = self.queue.get_batch(timeout=0.2, max_batch=self.max_batch, wait_s=self.batch_wait_ms / 1000)
            if not got:
                continue
            if len(got) == 1:
                self.run_one(*got[0])
            else:
                self.run_batch(got)

    # ---- one prompt's events and history ------------------------------------------------------
    def _tracker(self, item: QueueItem) -> _PromptTracker:
        return _PromptTracker(self, item)

    def run_one(self, task_id: int, item: QueueItem) -> None:
        _, prompt_id, prompt, extra_data, outputs = item
        tr = self._tracker(item)
        result = None
        try:
            result = self.executor.execute(prompt, prompt_id, extra_data, hooks=tr.hooks, execute_outputs=outputs)
        except SD35Error as ex:  # errors before any node runs (graph cycle, ...): reported like a node error
            tr.early_error(ex)
        self._count([result])
        tr.finish(task_id, result)

    def run_batch(self, taken: list[tuple[int, QueueItem]]) -> None:
        """Several compatible prompts through executor.execute_batch; history as each finishes."""
        trackers = [self._tracker(item) for _, item in taken]
        jobs = [PromptJob(item[2], item[1], item[3], tr.hooks, item[4]) for (_, item), tr in zip(taken, trackers)]
        done: dict[int, Any] = {}

        def on_result(i: int, result: Any) -> None:
            done[i] = result
            trackers[i].finish(taken[i][0], result)

        try:
            self.executor.execute_batch(jobs, on_result)
        except SD35Error as ex:  # raised before anything ran (a prompt failed validation): run them alone
            log.info("batch of %d prompts not run together (%s); running them one by one", len(taken), ex)
            for i, (task_id, item) in enumerate(taken):
                if i not in done:
                    self.run_one(task_id, item)
            return
        self._count(list(done.values()))

    def _count(self, results: list[Any]) -> None:
        sizes = [getattr(r, "sampled_with", 1) for r in results if r is not None]
        with self._lock:
            self.stats["runs"] += 1
            self.stats["prompts"] += len(results)
            together = [n for n in sizes if n > 1]
            if together:
                self.stats["batched_runs"] += 1
                self.stats["batched_prompts"] += len(together)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], *together)


class _PromptTracker:
    """Collects one prompt's status messages and node meta, forwards its events to its client."""

    def __init__(self, worker: PromptWorker, item: QueueItem):
        self.worker = worker
        self.item = item
        self.prompt_id = item[1]
        self.sid = item[3].get("client_id")
        self.messages: list[list] = []
        self.meta: dict[str, dict] = {}
        self.done: list[dict] = []
        self.nodes: dict[str, dict] = {}  # node id -> {"value", "max", "state"} for progress_state
        self.t0 = time.perf_counter()

    def hooks(self, event: str, data: Any) -> None:
        if event == "executing" and data.get("node") is None:
            self.done.append(data)  # ComfyUI sends this after the history is stored (prompt_worker)
            return
        if event in STATUS_EVENTS:
            self.messages.append([event, data])
        if event == "executing":
            self.worker.current[self.prompt_id] = data.get("node")
        if event == "executed":
            nid = data["node"]
            self.meta[nid] = {"node_id": nid, "display_node": data.get("display_node", nid),
                              "parent_node": None, "real_node_id": nid}
        # progress_state, in ComfyUI's order: a node's finish before the next event, its update before
        # "progress", its start after "executing"; cached nodes finish after "execution_cached"
        if event in ("executing", "execution_success"):
            self._finish_running()
        elif event == "progress" and data.get("node") is not None:
            self._progress({data["node"]: "running"}, value=float(data["value"]), total=float(data["max"]))
        if self.sid is not None or event in BROADCAST_EVENTS:  # ComfyUI: a prompt without client_id
            self.worker.send(event, data, self.sid)              # only broadcasts progress / interrupts
        if event == "executing":
            self._progress({data["node"]: "running"}, value=0.0, total=1.0)
        elif event == "execution_cached":
            self._progress({nid: "finished" for nid in data.get("nodes", [])})

    # ---- progress_state (ComfyUI comfy_execution/progress.py WebUIProgressHandler) ----------------------
    def _progress(self, states: dict, value: float | None = None, total: float | None = None) -> None:
        for nid, state in states.items():
            entry = self.nodes.setdefault(nid, {"value": 0.0, "max": 1.0, "state": "pending"})
            entry["state"] = state
            if state == "finished":
                entry["value"] = entry["max"]
            elif value is not None:
                entry["value"], entry["max"] = value, total
        if states:
            self.worker.send("progress_state", {"prompt_id": self.prompt_id, "nodes": {
                nid: {**e, "node_id": nid, "prompt_id": self.prompt_id, "display_node_id": nid,
                      "parent_node_id": None, "real_node_id": nid}
                for nid, e in self.nodes.items() if e["state"] != "pending"}}, self.sid)

    def _finish_running(self) -> None:
        running = [nid for nid, e in self.nodes.items() if e["state"] == "running"]
        if running:
            self._progress({nid: "finished" for nid in running})

    def early_error(self, ex: SD35Error) -> None:
        self.hooks("execution_error", early_error(self.prompt_id, ex))
        self.hooks("executing", {"node": None, "prompt_id": self.prompt_id})

    def finish(self, task_id: int, result: Any) -> None:
        self.worker.current.pop(self.prompt_id, None)
        success = bool(result is not None and result.success)
        status = {"status_str": "success" if success else "error", "completed": success, "messages": self.messages}
        self.worker.queue.task_done(task_id, dict(result.outputs) if result is not None else {}, status, self.meta)
        if self.sid is not None:  # ComfyUI main.py: the final "executing" goes to the prompt's client only
            self.worker.send("executing", self.done[-1] if self.done else {"node": None, "prompt_id": self.prompt_id},
                             self.sid)
        log.info("Prompt %s (#%s) %s in %.2f s", self.prompt_id, self.item[0], status["status_str"],
                 time.perf_counter() - self.t0)
