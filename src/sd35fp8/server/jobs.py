"""GET /jobs, GET /jobs/{id}, POST /jobs/cancel: the newer ComfyUI jobs view of queue + history.

The current frontend (comfyui-frontend-package >= 1.3x) builds its queue and history panels from
these (ComfyUI comfy_execution/jobs.py): a job is {id, status, priority, create_time, outputs_count,
execution_start_time?, execution_end_time?, execution_error?, preview_output?}; status is one of
pending, in_progress, completed, failed, cancelled.
"""

from __future__ import annotations

import bisect
import heapq
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sd35fp8.server.history import join_wrapped
from sd35fp8.server.queue import PromptQueue
from sd35fp8.server.validation import CancelJobs, read_model

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
PREVIEWABLE = ("images", "video", "audio", "3d")


def queue_job(item: list, status: str) -> dict:
    return {"id": item[1], "status": status, "priority": item[0],
            "create_time": item[3].get("create_time", 0), "outputs_count": 0}


def history_job(prompt_id: str, entry: dict, include_outputs: bool = False) -> dict:
    item, status_info, outputs = entry["prompt"], entry["status"], entry["outputs"]
    job: dict[str, Any] = {"id": prompt_id, "priority": item[0], "create_time": item[3].get("create_time", 0)}
    interrupted = False
    for event, data in status_info.get("messages", []):
        if event == "execution_start":
            job["execution_start_time"] = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            job["execution_end_time"] = data.get("timestamp")
            if event == "execution_error":
                job["execution_error"] = data
            interrupted = interrupted or event == "execution_interrupted"
    if status_info.get("status_str") == "success":
        job["status"] = "completed"
    else:
        job["status"] = "cancelled" if interrupted else "failed"
    count, preview = 0, None
    for node_id, ui in outputs.items():
        for media, items in ui.items():
            if not isinstance(items, list):
                continue
            for it in items:
                count += 1
                if preview is None and isinstance(it, dict) and media in PREVIEWABLE:
                    preview = {**it, "nodeId": node_id, "mediaType": media}
    job["outputs_count"] = count
    if preview is not None:
        job["preview_output"] = preview
    if include_outputs:
        job["outputs"] = outputs
        job["execution_status"] = status_info
        job["workflow"] = {"prompt": item[2], "extra_data": item[3]}
    return job


Row = tuple  # (create_time, status, the job rendered as JSON[, the history entry's insertion number])


class _Summaries:
    """history_job of each history entry, computed and rendered to JSON once (entries never change;
    ids that left are forgotten), and the rows GET /jobs pages through: the history's sorted by
    create_time once per history version, the queue's once per queue version (each pending item
    rendered once), their merge per (versions, statuses). A page is then a slice and a join of
    cached bytes: O(page) after the first read, ~1 ms for 10 000 jobs (benchmarks/history.py)."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[dict, dict, bytes]] = {}  # id -> (history entry, job, JSON)
        self._sorted: tuple[int, list[dict]] | None = None
        self._rows: tuple[int, list[Row]] | None = None
        self._row_of: dict[str, Row] = {}  # history id -> its row in self._rows
        self._live: tuple[int, list[Row]] | None = None
        self._pending: dict[str, tuple[list, Row]] = {}  # id -> (pending item, its row)
        self._merged: dict[tuple, list[Row]] = {}

    def _hit(self, pid: str, entry: dict) -> tuple[dict, dict, bytes]:
        hit = self._done.get(pid)
        if hit is None or hit[0] is not entry:
            job = history_job(pid, entry)
            hit = self._done[pid] = (entry, job, _dumps(job))
        return hit

    def _prune(self, history: dict) -> None:
        if len(self._done) > 2 * len(history) + 64:
            self._done = {pid: self._done[pid] for pid in history if pid in self._done}

    def sorted_jobs(self, queue: PromptQueue) -> list[dict]:
        """The history's jobs, oldest create_time first (rebuilt only when the history changed)."""
        version = queue.histories.version
        if self._sorted is None or self._sorted[0] != version:
            jobs = self.of(queue.history())
            jobs.sort(key=_created)
            self._sorted = (version, jobs)
        return self._sorted[1]

    def of(self, history: dict) -> list[dict]:
        out = [self._hit(pid, entry)[1] for pid, entry in history.items()]
        self._prune(history)
        return out

    def done_rows(self, queue: PromptQueue) -> tuple[int, list[Row]]:
        """(history version, the history's rows oldest create_time first, ties in history order).
        After a few changes (the history's change log) the rows of the last version are updated in
        place of a copy: a new or dropped entry is one bisect, not a walk and sort of every entry."""
        histories = queue.histories
        version = histories.version
        if self._rows is not None and self._rows[0] == version:
            return self._rows
        changes = histories.changes_since(self._rows[0]) if self._rows is not None else None
        if changes is not None and len(changes[1]) <= 256:
            version, rows = changes[0], list(self._rows[1])
            for op, pid, entry, seq in changes[1]:
                old = self._row_of.pop(pid, None)
                if old is not None:
                    del rows[bisect.bisect_left(rows, _row_key(old), key=_row_key)]
                if op == "add":
                    hit = self._hit(pid, entry)
                    row = self._row_of[pid] = (hit[1].get("create_time", 0), hit[1]["status"], hit[2], seq)
                    rows.insert(bisect.bisect_left(rows, _row_key(row), key=_row_key), row)
                else:
                    self._done.pop(pid, None)
        else:
            version, history, seqs = histories.snapshot()
            hits = [self._hit(pid, entry) for pid, entry in history.items()]
            self._prune(history)
            rows = [(h[1].get("create_time", 0), h[1]["status"], h[2], seqs[pid]) for pid, h in zip(history, hits)]
            self._row_of = dict(zip(history, rows))
            rows.sort(key=_row_key)
        self._rows = (version, rows)
        return self._rows

    def live_rows(self, queue: PromptQueue) -> tuple[int, list[Row]]:
        """(queue version, the running and pending prompts' rows oldest create_time first)."""
        version, running, pending = queue.snapshot()
        if self._live is None or self._live[0] != version:
            rows = [_row(queue_job(item, "in_progress")) for item in running]
            known, kept = self._pending, {}
            for item in pending:  # a pending item never changes while it waits: its row neither
                hit = known.get(item[1])
                if hit is None or hit[0] is not item:
                    hit = (item, _row(queue_job(item, "pending")))
                kept[item[1]] = hit
                rows.append(hit[1])
            self._pending = kept
            rows.sort(key=_row_created)
            self._live = (version, rows)
        return self._live

    def rows(self, queue: PromptQueue, wanted: set[str]) -> list[Row]:
        """Every job whose status is in `wanted`, oldest create_time first (a stable merge)."""
        done_version, done = self.done_rows(queue)
        live_version, live = self.live_rows(queue)
        key = (done_version, live_version, frozenset(wanted))
        merged = self._merged.get(key)
        if merged is None:
            if not wanted >= {"completed", "failed", "cancelled"}:
                done = [r for r in done if r[1] in wanted]
            if not wanted >= {"in_progress", "pending"}:
                live = [r for r in live if r[1] in wanted]
            if not live:
                merged = done
            elif not done or done[-1][0] <= live[0][0]:  # the usual case: the queue is newer
                merged = done + live
            else:
                merged = list(heapq.merge(done, live, key=_row_created))
            if len(self._merged) >= 8 or any(k[:2] != key[:2] for k in self._merged):
                self._merged = {}
            self._merged[key] = merged
        return merged


def _row(job: dict) -> Row:
    return job.get("create_time", 0), job["status"], _dumps(job)


def _row_created(row: Row) -> int:
    return row[0]


def _row_key(row: Row) -> tuple[int, int]:
    """A history row's place: create_time, then the entry's insertion number (history order)."""
    return row[0], row[3]


def _dumps(value: Any) -> bytes:
    """JSON bytes as Starlette's JSONResponse renders them (compact, UTF-8, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _created(job: dict) -> int:
    return job.get("create_time", 0)


def all_jobs(queue: PromptQueue, summaries: _Summaries | None = None) -> list[dict]:
    running, pending = queue.current_queue()
    jobs = [queue_job(i, "in_progress") for i in running] + [queue_job(i, "pending") for i in pending]
    history = queue.history()
    jobs += summaries.of(history) if summaries is not None else [history_job(p, e) for p, e in history.items()]
    return jobs


def jobs_routes(queue: PromptQueue) -> APIRouter:
    r = APIRouter()
    summaries = _Summaries()
    last_body: list[tuple | None] = [None]  # ((rows id, order, offset, limit), rows, body) of the last page

    @r.get("/jobs")
    async def list_jobs(status: str = "", limit: int | None = None, offset: int = 0,
                        sort_order: str = "desc") -> Response:
        wanted = {s for s in status.split(",") if s} or set(STATUSES)
        jobs = summaries.rows(queue, wanted)  # cached: rebuilt only when the queue or history changed
        key = (id(jobs), sort_order == "asc", offset, limit)
        if last_body[0] is not None and last_body[0][0] == key and last_body[0][1] is jobs:
            return Response(last_body[0][2], media_type="application/json")  # the same page again
        total = len(jobs)
        offset = max(offset, 0)
        end = total if limit is None else min(offset + max(limit, 0), total)
        if sort_order == "asc":
            page = jobs[offset:end]
        else:  # newest first: the same slice counted from the end
            page = jobs[max(total - end, 0): max(total - offset, 0)][::-1]
        pagination = {"offset": offset, "limit": limit if limit is not None else total, "total": total,
                      "has_more": offset + len(page) < total}
        tail = b'],"pagination":' + _dumps(pagination) + b"}"
        body = join_wrapped(b'{"jobs":[', [row[2] for row in page], tail) if page else b'{"jobs":[' + tail
        last_body[0] = (key, jobs, body)
        return Response(body, media_type="application/json")

    @r.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> Any:
        entry = queue.history(job_id).get(job_id)
        if entry is not None:
            return history_job(job_id, entry, include_outputs=True)
        running, pending = queue.current_queue()
        for items, status in ((running, "in_progress"), (pending, "pending")):
            for item in items:
                if item[1] == job_id:
                    return queue_job(item, status)
        return JSONResponse({"error": f"no job {job_id!r}"}, status_code=404)

    @r.post("/jobs/cancel")
    async def cancel_jobs(request: Request) -> Response:
        body = await read_model(request, CancelJobs)
        for job_id in body.job_ids:
            _cancel(request, job_id)
        return Response(status_code=200)

    @r.post("/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, request: Request) -> Response:
        _cancel(request, job_id)
        return Response(status_code=200)

    return r


def _cancel(request: Request, job_id: str) -> None:
    state = request.app.state
    if not state.queue.delete_queue_item(job_id):
        state.worker.interrupt(job_id)
