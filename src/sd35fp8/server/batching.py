"""Cross-prompt batching: which queued prompts sample as one batch, and running such a batch.

batch_key (sd35fp8.workflow.batch): prompts equal but for texts, seeds and filename prefixes, one
KSampler with a deterministic sampler. The worker (worker.PromptWorker) takes such prompts together
(queue.PromptQueue.get_batch) and runs them here with `executor.execute_batch`: one sampling call,
each prompt keeping its own events and history. `BatchStats` counts what ran together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from sd35fp8.errors import SD35Error
from sd35fp8.server.queue import QueueItem
from sd35fp8.workflow.batch import batch_key
from sd35fp8.workflow.executor import PromptJob

log = logging.getLogger(__name__)

# prompts sampled as one GPU batch at most (--max-batch; 1 disables). Each row equals the prompt run alone:
# bit for bit on the CPU (tests/test_engine.py, test_server_load.py, test_roads.py), see workflow/batch.py
DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WAIT_MS = 20.0  # how long a taken prompt waits for compatible ones


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


class BatchStats:
    """Counts runs, prompts, batched runs/prompts and the largest sampling batch (GET /sd35fp8/worker)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"runs": 0, "prompts": 0, "batched_runs": 0, "batched_prompts": 0, "largest_batch": 1}

    def count(self, results: list[Any]) -> None:
        """One run of `results` (executor results, None for a prompt that failed before running)."""
        sizes = [getattr(r, "sampled_with", 1) for r in results if r is not None]
        with self._lock:
            self.counts["runs"] += 1
            self.counts["prompts"] += len(results)
            together = [n for n in sizes if n > 1]
            if together:
                self.counts["batched_runs"] += 1
                self.counts["batched_prompts"] += len(together)
                self.counts["largest_batch"] = max(self.counts["largest_batch"], *together)


def run_batch(worker: Any, taken: list[tuple[int, QueueItem]]) -> list[Any]:
    """Several compatible prompts through `worker.executor.execute_batch`; history as each finishes.

    `worker` is the PromptWorker (its executor, `tracker(item)`, `run_one` and `stats`). When the
    batch cannot run together (a prompt fails validation before anything ran), the prompts run alone.
    Returns the executor results of the prompts it finished.
    """
    trackers = [worker.tracker(item) for _, item in taken]
    jobs = [PromptJob(item[2], item[1], item[3], tr.hooks, item[4]) for (_, item), tr in zip(taken, trackers)]
    done: dict[int, Any] = {}

    def on_result(i: int, result: Any) -> None:
        done[i] = result
        trackers[i].finish(taken[i][0], result)

    try:
        worker.executor.execute_batch(jobs, on_result)
    except SD35Error as ex:  # raised before anything ran (a prompt failed validation): run them alone
        log.info("batch of %d prompts not run together (%s); running them one by one", len(taken), ex)
        for i, (task_id, item) in enumerate(taken):
            if i not in done:
                worker.run_one(task_id, item)
        return list(done.values())
    worker.batch_stats.count(list(done.values()))
    return list(done.values())
