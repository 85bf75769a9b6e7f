"""The prompt queue: pending items (a heap) and the running ones (ComfyUI execution.py PromptQueue).

Queue items are ComfyUI's 5-element lists `[number, prompt_id, prompt, extra_data, outputs_to_execute]`;
the lowest number runs first (`front` gives a negative number). A finished item moves into the
history store (history.PromptHistory) under the queue's lock, so a client never sees it in neither.

GET /queue at 10 000 pending prompts answers from cached bytes (benchmarks/history.py): a pending item
is never changed while it waits, so each is rendered to JSON once; the pending list, sorted in run
order, is kept until the queue next changes (`version`), and its rendering is kept as blocks of
consecutive items (queue_chunks) that the response sends one after another, so a change re-joins one
block, not the 12 MB body. Running items are few: they are deep-copied when the queue changes and
rendered with the rest; the chunks are kept until the next change, so repeated reads cost nothing but
the transfer.
The worker thread that takes items is worker.PromptWorker; which items run together, batching.py.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from sd35fp8.errors import InputError
from sd35fp8.server.history import MAX_HISTORY, PromptHistory
from sd35fp8.server.journal import Journal
from sd35fp8.workflow.batch import batch_key

PENDING_BLOCK = 64  # pending items per cached block of GET /queue's body, on average (queue_chunks)

QueueItem = list  # [number, prompt_id, prompt, extra_data, outputs_to_execute]


class QueueFullError(InputError):
    """POST /prompt when `max_queue` prompts are already waiting."""


def _comfy_split(running: list[QueueItem], pending: list[QueueItem]) -> tuple[list[QueueItem], list[QueueItem]]:
    """(running, pending) -> (the first running item in run order, the other running items + pending)."""
    running = sorted(running, key=lambda item: item[0])
    return running[:1], running[1:] + pending


class PromptQueue:
    """Thread-safe heap of pending items and the running ones; `histories` holds the finished."""

    def __init__(self, max_queue: int = 100, max_history: int = MAX_HISTORY,
                 on_change: Callable[[], None] | None = None, journal: Journal | None = None):
        if max_queue < 1:
            raise InputError(f"max_queue must be at least 1, got {max_queue}")
        self.max_queue = max_queue
        self.on_change = on_change or (lambda: None)
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, QueueItem]] = []
        self._tie = itertools.count()
        self._running: dict[int, QueueItem] = {}
        self._task_ids = itertools.count()
        self.journal = journal  # journal.Journal: every change is written there first (None: memory only)
        self.histories = PromptHistory(max_history, journal)
        self._number = 0
        self._keys: dict[int, str | None] = {}  # heap tie -> batch_key of its prompt
        self.version = 0  # changes whenever an item is queued, taken, finished or removed
        self._sorted: tuple[int, list[QueueItem]] | None = None  # (version, pending in run order)
        self._item_json: dict[str, tuple[QueueItem, bytes]] = {}  # prompt id -> (pending item, its JSON)
        self._blocks: dict[tuple[bytes, ...], bytes] = {}  # a run of pending renderings -> joined
        self._body: tuple[int, tuple[bytes, ...]] | None = None  # (version, GET /queue's body in chunks)

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
            if self.journal is not None:  # durable before POST /prompt answers 200
                self.journal.accept(item)
            self._push(item)
        self.on_change()

    def _push(self, item: QueueItem) -> None:
        self.version += 1
        tie = next(self._tie)
        self._keys[tie] = batch_key(item[2]) if isinstance(item[2], dict) else None
        heapq.heappush(self._heap, (item[0], tie, item))
        self._cond.notify()

    def full(self) -> bool:
        """True when `put` would refuse (max_queue prompts waiting): POST /prompt answers 429 before
        parsing and validating the body, so a flood of retries costs the server little."""
        with self._cond:
            return len(self._heap) >= self.max_queue

    def restore(self, items: list[QueueItem]) -> None:
        """Re-queue items a previous process left (journal.recover), beyond max_queue if need be;
        numbers given later continue after theirs."""
        with self._cond:
            for item in items:
                self._push(item)
                self._number = max(self._number, int(abs(float(item[0]))) + 1)
        if items:
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
            self.version += 1
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
        if self.journal is not None:
            self.journal.start([item[1]])
        task_id = next(self._task_ids)
        self._running[task_id] = item
        return task_id, item

    def task_done(self, task_id: int, outputs: dict, status: dict, meta: dict | None = None) -> None:
        """Store the history entry, then drop the item from running (one lock: no gap a client sees)."""
        with self._cond:
            item = self._running.pop(task_id, None)
            if item is None:  # abandoned (worker.PromptWorker.restart already wrote its entry)
                return
            self.version += 1
            self.histories.add(item[1], {"prompt": item, "outputs": outputs, "status": status, "meta": meta or {}})
        self.on_change()

    def pending(self) -> list[QueueItem]:
        with self._cond:
            return [e[2] for e in sorted(self._heap)]

    def current_queue(self) -> tuple[list[QueueItem], list[QueueItem]]:
        """(queue_running, queue_pending), pending in run order; deep copies, JSON-ready."""
        with self._cond:
            running = [copy.deepcopy(i) for i in self._running.values()]
            pending = [copy.deepcopy(e[2]) for e in sorted(self._heap)]
        return running, pending

    def comfy_queue(self) -> tuple[list[QueueItem], list[QueueItem]]:
        """GET /queue's (queue_running, queue_pending), as ComfyUI shows them: ComfyUI runs one prompt at a time
        and clients rely on it (comfy-ui-client asserts at most one running item), so of the prompts running as
        one batch (--max-batch) the first in run order is listed as running and the others lead the pending
        list. current_queue() and /jobs keep them all running."""
        running, pending = self.current_queue()
        return _comfy_split(running, pending)

    def batched_ids(self) -> list[str]:
        """The running prompts comfy_queue() lists as pending: those of a running batch after its first."""
        with self._cond:
            return [item[1] for item in _comfy_split(list(self._running.values()), [])[1]]

    def snapshot(self) -> tuple[int, list[QueueItem], list[QueueItem]]:
        """(version, running, pending in run order) for read-only views (GET /queue, /jobs). Running
        items are deep copies; pending items are the queued lists themselves (nothing changes them
        while they wait: do not either), and their sorted list is kept until the queue changes."""
        with self._cond:
            running = [copy.deepcopy(i) for i in self._running.values()]
            if self._sorted is None or self._sorted[0] != self.version:
                self._sorted = (self.version, [e[2] for e in sorted(self._heap)])
            return self.version, running, self._sorted[1]

    def queue_chunks(self) -> tuple[bytes, ...]:
        """GET /queue's body, {"queue_running": [...], "queue_pending": [...]}, as JSON chunks to send in
        order (ChunksResponse), never joined whole: each pending item is rendered once, and runs of
        pending items are joined into blocks kept while their items are the same. A block ends after
        an item whose id hashes to a boundary (about one in PENDING_BLOCK, at most 4 x PENDING_BLOCK
        items), so a prompt queued, taken or removed changes one block, wherever it lies in the run
        order. The running items are rendered as they were when the version began."""
        cached = self._body
        if cached is not None and cached[0] == self.version:
            return cached[1]
        version, running, pending = self.snapshot()
        running, batched = _comfy_split(running, [])  # comfy_queue(): one running item
        known, rendered = self._item_json, {}
        blocks, kept = self._blocks, {}
        chunks = [b'{"queue_running":' + _dumps(running) + b',"queue_pending":[']
        if batched:  # the rest of the running batch, rendered afresh (running items are copies)
            chunks.append(b",".join(_dumps(item) for item in batched))
        run: list[bytes] = []
        last = len(pending) - 1
        for k, item in enumerate(pending):
            hit = known.get(item[1])
            if hit is None or hit[0] is not item:
                hit = (item, _dumps(item), hash(item[1]) % PENDING_BLOCK == 0)
            rendered[item[1]] = hit
            run.append(hit[1])
            if hit[2] or k == last or len(run) >= 4 * PENDING_BLOCK:
                key = tuple(run)
                joined = blocks.get(key)
                if joined is None:
                    joined = b",".join(run)
                kept[key] = joined
                if len(chunks) > 1:
                    chunks.append(b",")
                chunks.append(joined)
                run = []
        chunks.append(b"]}")
        self._item_json, self._blocks = rendered, kept  # forgets the items and blocks that left
        out = tuple(chunks)
        self._body = (version, out)
        return out

    def queue_json(self) -> bytes:
        """queue_chunks() joined: GET /queue's body as one bytes object."""
        return b"".join(self.queue_chunks())

    def tasks_remaining(self) -> int:
        with self._cond:
            return len(self._heap) + len(self._running)

    def running_ids(self) -> list[str]:
        with self._cond:
            return [i[1] for i in self._running.values()]

    def running_tasks(self) -> dict[int, QueueItem]:
        with self._cond:
            return dict(self._running)

    def wipe_queue(self) -> list[str]:
        with self._cond:
            ids = [e[2][1] for e in self._heap]
            if self.journal is not None:
                self.journal.drop_pending(ids)
            self._heap = []
            self._keys.clear()
            self.version += 1
        self.on_change()
        return ids

    def delete_queue_item(self, prompt_id: str) -> bool:
        with self._cond:
            keep = [e for e in self._heap if e[2][1] != prompt_id]
            found = len(keep) != len(self._heap)
            if found and self.journal is not None:
                self.journal.drop_pending([prompt_id])
            for e in self._heap:
                if e[2][1] == prompt_id:
                    self._keys.pop(e[1], None)
            heapq.heapify(keep)
            self._heap = keep
            self.version += found
        if found:
            self.on_change()
        return found

    # ---- history (history.PromptHistory) ------------------------------------------------------
    def history(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        """ComfyUI get_history: one id, or the last `max_items` entries (from `offset` when >= 0)."""
        return self.histories.get(prompt_id, max_items, offset)

    def history_json(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> bytes:
        """`history(...)` rendered as JSON bytes (each entry rendered once: PromptHistory.get_json)."""
        return self.histories.get_json(prompt_id, max_items, offset)

    def wipe_history(self) -> None:
        self.histories.wipe()

    def delete_history_item(self, prompt_id: str) -> bool:
        return self.histories.delete(prompt_id)


def _dumps(value: Any) -> bytes:
    """JSON bytes as Starlette's JSONResponse renders them (compact, UTF-8, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
