"""The server's life: warm-up, readiness, the worker's supervision and the graceful stop (drain).

    starting -> (warm-up) -> ready -> draining -> stopped

/health answers 200 while the process serves HTTP. /ready answers 200 only when the warm-up is
done, the worker thread is alive and responsive (it reported progress within `hang_seconds` while
busy) and the server is not draining; otherwise 503 with the failing checks.

Supervision (a thread, every `check_seconds`): a worker thread that died, or that is busy without
any event for `hang_seconds`, is replaced (worker.PromptWorker.restart): its prompts get an
execution_error history entry saying so, and the next prompt runs on the new thread.

Drain (`begin_drain`, on the first SIGTERM / SIGINT in serve.py): POST /prompt answers 503 with
Retry-After, the worker takes no new prompt, the running one may finish within the grace period;
what is left stays in the journal (journal.py) for the next start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_HANG_SECONDS = 900.0  # a busy worker silent this long is hung (model loads emit no events)
DEFAULT_DRAIN_SECONDS = 60.0  # SIGTERM: how long the running prompt may take to finish
RETRY_AFTER_SECONDS = 30  # Retry-After of the 503 answered while draining


class Lifecycle:
    """Readiness checks, warm-up, supervision and drain for one app."""

    def __init__(self, worker: Any, metrics: Any = None, warmup: Callable[[], Any] | None = None,
                 hang_seconds: float = DEFAULT_HANG_SECONDS, check_seconds: float = 1.0):
        if hang_seconds <= 0:
            raise ValueError(f"hang_seconds must be > 0, got {hang_seconds}")
        self.worker = worker
        self.metrics = metrics
        self.hang_seconds = float(hang_seconds)
        self.check_seconds = float(check_seconds)
        self._warmup = warmup
        self.warmed_up = threading.Event()
        self.warmup_error: str | None = None
        self.warmup_seconds: float | None = None
        self.draining = threading.Event()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None

    # ---- start ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the warm-up (then the worker) and the supervisor thread."""
        threading.Thread(target=self._warm_then_work, name="sd35fp8-warmup", daemon=True).start()
        self._supervisor = threading.Thread(target=self._supervise, name="sd35fp8-supervisor", daemon=True)
        self._supervisor.start()

    def _warm_then_work(self) -> None:
        """Warm-up runs before the worker takes a prompt, so the first prompt does not pay for it."""
        if self._warmup is not None:
            t0 = time.perf_counter()
            log.info("warming up before taking prompts (/ready is false until this is done)")
            try:
                self._warmup()
            except Exception as e:  # noqa: BLE001 - reported through /ready and the log, the server still serves
                self.warmup_error = f"{type(e).__name__}: {e}"
                log.error("warm-up failed: %s; prompts run without it", self.warmup_error)
            self.warmup_seconds = time.perf_counter() - t0
            log.info("warm-up done in %.1f s", self.warmup_seconds)
        if not self._stop.is_set():
            self.worker.start()  # before warmed_up: the supervisor must never see a warm server without a thread
        self.warmed_up.set()

    def stop(self) -> None:
        self._stop.set()

    # ---- readiness --------------------------------------------------------------------------
    def checks(self) -> dict[str, Any]:
        stalled = self.worker.stalled_seconds()
        return {
            "warmed_up": self.warmed_up.is_set(),
            "worker_alive": self.worker.alive,
            "worker_responsive": stalled < self.hang_seconds,
            "draining": self.draining.is_set(),
            "warmup_error": self.warmup_error,
            "worker_restarts": self.worker.restarts,
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        c = self.checks()
        ok = c["warmed_up"] and c["worker_alive"] and c["worker_responsive"] and not c["draining"]
        return ok, c

    # ---- supervision ------------------------------------------------------------------------
    def _supervise(self) -> None:
        while not self._stop.wait(self.check_seconds):
            if not self.warmed_up.is_set() or self.draining.is_set():
                continue
            reason = None
            if not self.worker.alive and not self.worker.stopping:
                reason = f"the prompt worker died ({self.worker.death or 'no error recorded'})"
            elif self.worker.stalled_seconds() >= self.hang_seconds:
                reason = (f"the prompt worker hung (no progress for {self.worker.stalled_seconds():.0f} s, "
                          f"limit {self.hang_seconds:.0f} s: --hang-seconds)")
            if reason is not None:
                log.error("%s; restarting it", reason)
                self.worker.restart(reason)
                if self.metrics is not None:
                    self.metrics.worker_restarts.inc()

    # ---- drain ------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Refuse new prompts (503) and let the worker take no new one; the running one goes on."""
        self.draining.set()
        self.worker.stop_taking()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the running prompts to finish. True when none is running."""
        deadline = time.monotonic() + timeout
        while self.worker.queue.running_ids():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


# ---- start-up: what the last process left in the journal -----------------------------------------
ON_RESTART = ("requeue", "fail")


def recover_queue(queue: Any, on_restart: str = "requeue", metrics: Any = None,
                  on_failed: Callable[[list, dict], None] | None = None) -> dict[str, int]:
    """Load the journal's history into `queue.histories`; re-queue the prompts that were pending or
    running (on_restart="requeue") or give each an execution_error history entry ("fail"; on_failed
    is called with each such item and entry). Returns the counts, also logged."""
    if on_restart not in ON_RESTART:
        raise ValueError(f"on_restart must be one of {ON_RESTART}, got {on_restart!r}")
    journal = queue.journal
    got = journal.recover()
    queue.histories.restore(got.history)
    left = [(item, "running") for item in got.running] + [(item, "pending") for item in got.pending]
    left.sort(key=lambda e: e[0][0])  # run order, as the last process would have gone on
    if on_restart == "requeue":
        journal.requeue([item[1] for item, _ in left])
        queue.restore([item for item, _ in left])
    else:
        for item, state in left:
            entry = failed_entry(item, state)
            queue.histories.add(item[1], entry)
            if on_failed is not None:
                on_failed(item, entry)
            if metrics is not None:
                metrics.prompt_done("failed_restart")
    counts = {"history": len(got.history), "running": len(got.running), "pending": len(got.pending)}
    if got.running or got.pending:
        what = "re-queued" if on_restart == "requeue" else "marked failed (--on-restart fail)"
        log.warning("queue journal %s: %d running and %d pending prompt(s) from the last run %s: %s",
                    journal.path, counts["running"], counts["pending"], what, ", ".join(i[1] for i, _ in left))
    elif got.history:
        log.info("queue journal %s: %d history entries restored", journal.path, counts["history"])
    return counts


def failed_entry(item: list, state: str) -> dict:
    """The history entry of a prompt the server stopped under and did not re-run (--on-restart fail)."""
    now = int(time.time() * 1000)
    error = {"prompt_id": item[1], "node_id": None, "node_type": None, "executed": [],
             "exception_message": (f"the server stopped while this prompt was {state}; it was not re-run "
                                   "after the restart (--on-restart fail). Queue it again to run it."),
             "exception_type": "ServerRestart", "traceback": [], "current_inputs": {}, "current_outputs": [],
             "timestamp": now}
    return {"prompt": item, "outputs": {},
            "status": {"status_str": "error", "completed": False, "messages": [["execution_error", error]]},
            "meta": {}}
