"""The one worker thread that runs the executor (ComfyUI main.py prompt_worker).

It takes the next prompt from queue.PromptQueue (with compatible pending ones, batching.py), runs
the executor, stores each prompt's history entry and forwards its events over
`send(event, data, sid)`: sid is the prompt's client_id (None = every socket), exactly as
ComfyUI's `send_sync(..., server.client_id)`.

Supervision (lifecycle.Lifecycle): `heartbeat` moves with every event and idle loop; a thread that
died or hung is replaced by `restart`, which writes an execution_error entry for the prompts the
old thread held and discards whatever that thread reports later (its `generation` is stale).
After a CUDA out-of-memory error the worker releases the memory before the next prompt.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from sd35fp8.errors import InputError, SD35Error
from sd35fp8.server.batching import DEFAULT_BATCH_WAIT_MS, DEFAULT_MAX_BATCH, BatchStats, run_batch
from sd35fp8.server.queue import PromptQueue, QueueItem
from sd35fp8.server.ws import PRIVATE_EVENTS
from sd35fp8.workflow.executor import early_error

log = logging.getLogger(__name__)

Send = Callable[[str, Any, "str | None"], None]
# sent to all without a client_id (ComfyUI's progress hook sends a step's preview frame as its progress)
BROADCAST_EVENTS = ("progress", "progress_state", "execution_interrupted", "preview_image")
# Events that ComfyUI keeps in history status.messages (execution.py add_message(broadcast=...)).
STATUS_EVENTS = ("execution_start", "execution_cached", "execution_success", "execution_error",
                 "execution_interrupted")


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
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, metrics: Any = None):
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
        self.batch_stats = BatchStats()
        self.metrics = metrics  # metrics.ServerMetrics or None
        self.heartbeat = time.monotonic()
        self.generation = 0  # bumped by restart: a thread of an older generation is abandoned
        self.restarts = 0
        self.death: str | None = None  # what ended the last thread that died
        self._mine: set[int] = set()  # task ids this worker's thread runs (others may share the queue)
        self._stop = threading.Event()
        self._free: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once; not after stop)."""
        with self._lock:
            if self._thread is None:
                self._spawn_locked()

    def _spawn_locked(self) -> None:
        """Start a thread of the current generation, then publish it (under self._lock): stop() never
        sees a thread that was not started, and no thread starts once stop() was called."""
        if self._stop.is_set():
            return
        self.heartbeat = time.monotonic()
        thread = threading.Thread(target=self._loop, args=(self.generation,), daemon=True,
                                  name=f"sd35fp8-prompt-worker-{self.generation}")
        thread.start()
        self._thread = thread

    def stop_taking(self) -> None:
        """Take no new prompt; the running ones go on (drain)."""
        self._stop.set()

    def stop(self, timeout: float | None = None) -> list[str]:
        """Stop taking prompts; wait for the running ones. Returns the ids left pending."""
        with self._lock:  # after this, start() and restart() start no thread
            self._stop.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        return [i[1] for i in self.queue.pending()]

    def abandon(self) -> None:
        """Stop for good: whatever the current thread reports from now on is discarded (process exit)."""
        self._stop.set()
        with self._lock:
            self.generation += 1

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stalled_seconds(self) -> float:
        """Seconds without any event while prompts run (0 when idle)."""
        if not self._mine:
            return 0.0
        return time.monotonic() - self.heartbeat

    def restart(self, reason: str) -> None:
        """Replace a dead or hung thread: its prompts get an execution_error history entry saying
        `reason`, the old thread (if it ever comes back) is ignored, a new thread takes the queue."""
        with self._lock:
            self.generation += 1
            self.restarts += 1
        mine, self._mine = self._mine, set()
        for task_id, item in self.queue.running_tasks().items():
            if task_id not in mine:
                continue
            tr = self.tracker(item)
            self.current.pop(item[1], None)
            error = early_error(item[1], RuntimeError(f"{reason}; the prompt was stopped and the worker "
                                                      "restarted. Queue it again to retry."))
            error["exception_type"] = "WorkerLost"
            tr.hooks("execution_error", error)
            tr.hooks("executing", {"node": None, "prompt_id": item[1]})
            tr.finish(task_id, None, outcome="worker_lost")
        with self._lock:
            self._spawn_locked()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Interrupt the running prompt(s) (only `prompt_id`, when given: in a batch the others go on).

        Sent to the executor by prompt id, so a request that comes while a taken prompt still waits in
        the batch window (marked running, not yet executing) stops it when it starts, and one aimed at
        a prompt that has just finished does not stop the next (executor._start_interrupts)."""
        running = self.queue.running_ids()
        if not running or (prompt_id is not None and prompt_id not in running):
            return False
        for pid in running if prompt_id is None else [prompt_id]:
            self.executor.interrupt(pid)
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

    def _loop(self, generation: int) -> None:
        try:
            while not self._stop.is_set() and generation == self.generation:
                self.heartbeat = time.monotonic()
                self._apply_free()
                got = self.queue.get_batch(timeout=0.2, max_batch=self.max_batch,
                                           wait_s=self.batch_wait_ms / 1000)
                if not got:
                    continue
                self._apply_free()  # a /free posted before these prompts were taken applies before they run
                if self.metrics is not None:
                    self.metrics.batch(len(got))
                self._mine = {task_id for task_id, _ in got}
                if len(got) == 1:
                    self.run_one(*got[0])
                else:
                    self.run_batch(got)
                if generation == self.generation:
                    self._mine = set()
        except BaseException as e:  # noqa: BLE001 - recorded for /ready and the supervisor, which restarts us
            self.death = f"{type(e).__name__}: {e}"
            log.exception("the prompt worker thread died: %s", self.death)

    def _release_after_oom(self, results: list[Any]) -> None:
        """A CUDA out-of-memory error: drop what the failed prompt held before the next one runs."""
        if not any(r is not None and r.error and "OutOfMemoryError" in str(r.error.get("exception_type"))
                   for r in results):
            return
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("CUDA out of memory in a prompt: released cached memory; the next prompt runs")

    # ---- one prompt's events and history ------------------------------------------------------
    def tracker(self, item: QueueItem) -> _PromptTracker:
        return _PromptTracker(self, item)

    def run_one(self, task_id: int, item: QueueItem) -> None:
        _, prompt_id, prompt, extra_data, outputs = item
        tr = self.tracker(item)
        result = None
        try:
            result = self.executor.execute(prompt, prompt_id, extra_data, hooks=tr.hooks, execute_outputs=outputs)
        except SD35Error as ex:  # errors before any node runs (graph cycle, ...): reported like a node error
            tr.early_error(ex)
        self.batch_stats.count([result])
        tr.finish(task_id, result)
        self._release_after_oom([result])

    def run_batch(self, taken: list[tuple[int, QueueItem]]) -> None:
        """Several compatible prompts in one sampling batch (batching.run_batch)."""
        self._release_after_oom(run_batch(self, taken))

    @property
    def stats(self) -> dict:
        """Runs, prompts, batched runs/prompts, largest batch (batching.BatchStats)."""
        return dict(self.batch_stats.counts)


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
        self.generation = worker.generation
        self._last_step = self.t0  # sampler step timing (metrics)

    @property
    def stale(self) -> bool:
        """The worker was restarted under this prompt: nothing it reports counts any more."""
        return self.generation != self.worker.generation

    def hooks(self, event: str, data: Any) -> None:
        if self.stale:
            return
        self.worker.heartbeat = time.monotonic()
        if self.worker.metrics is not None and event in ("executing", "progress"):
            now = time.perf_counter()
            if event == "progress":
                self.worker.metrics.step(now - self._last_step)
            self._last_step = now
        if event == "executing" and data.get("node") is None:
            self.done.append(data)  # ComfyUI sends this after the history is stored (prompt_worker)
            return
        if event in PRIVATE_EVENTS:  # for the route that waits on this prompt (ws.WebSocketHub.subscribe)
            self.worker.send(event, data, None)
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

    def finish(self, task_id: int, result: Any, outcome: str | None = None) -> None:
        if self.stale:
            log.warning("Prompt %s finished on an abandoned worker thread; its result is discarded", self.prompt_id)
            return
        self.worker.current.pop(self.prompt_id, None)
        success = bool(result is not None and result.success)
        status = {"status_str": "success" if success else "error", "completed": success, "messages": self.messages}
        outputs = dict(result.outputs) if result is not None else {}
        self.worker.queue.task_done(task_id, outputs, status, self.meta)
        if self.worker.metrics is not None:
            if outcome is None:
                outcome = "success" if success else (
                    "interrupted" if result is not None and result.interrupted else "error")
            self.worker.metrics.prompt_done(outcome, time.perf_counter() - self.t0)
        if self.sid is not None:  # ComfyUI main.py: the final "executing" goes to the prompt's client only
            self.worker.send("executing", self.done[-1] if self.done else {"node": None, "prompt_id": self.prompt_id},
                             self.sid)
        log.info("Prompt %s (#%s) %s in %.2f s", self.prompt_id, self.item[0], status["status_str"],
                 time.perf_counter() - self.t0)
