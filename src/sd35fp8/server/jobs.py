"""GET /jobs, GET /jobs/{id}, POST /jobs/cancel: the newer ComfyUI jobs view of queue + history.

The current frontend (comfyui-frontend-package >= 1.3x) builds its queue and history panels from
these (ComfyUI comfy_execution/jobs.py): a job is {id, status, priority, create_time, outputs_count,
execution_start_time?, execution_end_time?, execution_error?, preview_output?}; status is one of
pending, in_progress, completed, failed, cancelled.
"""

from __future__ import annotations

import heapq
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

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


class _Summaries:
    """history_job of each history entry, computed once (entries never change); forgets ids that left.
    `sorted_jobs` keeps the history's jobs sorted by create_time until the history changes."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[dict, dict]] = {}
        self._sorted: tuple[int, list[dict]] | None = None

    def sorted_jobs(self, queue: PromptQueue) -> list[dict]:
        """The history's jobs, oldest create_time first (rebuilt only when the history changed)."""
        version = queue.histories.version
        if self._sorted is None or self._sorted[0] != version:
            jobs = self.of(queue.history())
            jobs.sort(key=_created)
            self._sorted = (version, jobs)
        return self._sorted[1]

    def of(self, history: dict) -> list[dict]:
        out = []
        for pid, entry in history.items():
            hit = self._done.get(pid)
            if hit is None or hit[0] is not entry:
                hit = self._done[pid] = (entry, history_job(pid, entry))
            out.append(hit[1])
        if len(self._done) > 2 * len(history) + 64:
            self._done = {pid: self._done[pid] for pid in history if pid in self._done}
        return out


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

    @r.get("/jobs")
    async def list_jobs(status: str = "", limit: int | None = None, offset: int = 0,
                        sort_order: str = "desc") -> JSONResponse:
        wanted = {s for s in status.split(",") if s} or set(STATUSES)
        running, pending = queue.current_queue()
        live = sorted([queue_job(i, "in_progress") for i in running] + [queue_job(i, "pending") for i in pending],
                      key=_created)
        done = summaries.sorted_jobs(queue)  # cached: sorted once per history change
        if not wanted >= {"completed", "failed", "cancelled"}:
            done = [j for j in done if j["status"] in wanted]
        live = [j for j in live if j["status"] in wanted]
        jobs = list(heapq.merge(done, live, key=_created))  # both sorted: a linear merge, stable
        if sort_order != "asc":
            jobs.reverse()
        total = len(jobs)
        offset = max(offset, 0)
        page = jobs[offset:] if limit is None else jobs[offset: offset + max(limit, 0)]
        return JSONResponse({"jobs": page, "pagination": {  # JSONResponse: no jsonable_encoder walk
            "offset": offset, "limit": limit if limit is not None else total, "total": total,
            "has_more": offset + len(page) < total}})

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
