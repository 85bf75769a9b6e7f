"""GET /jobs, GET /jobs/{id}, POST /jobs/cancel, POST /jobs/{id}/cancel: ComfyUI's jobs view of queue + history.

The current frontend (comfyui-frontend-package >= 1.3x) builds its queue and history panels and its Media
Assets view from these (ComfyUI comfy_execution/jobs.py and the /api/jobs routes of its server.py). A job
is {id, status, priority, create_time, execution_start_time, execution_end_time, execution_error,
outputs_count, previewable_outputs_count, preview_output, workflow_id}, a key whose value would be None
left out (ComfyUI prune_dict); status is one of pending, in_progress, completed, failed, cancelled.
GET /jobs/{id} adds, for a finished job, its outputs (normalize_outputs), execution_status and workflow
{prompt, extra_data}; for a running or pending job, its workflow.
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

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")  # ComfyUI JobStatus.ALL, in its order
SORT_BY = ("created_at", "execution_duration")
PREVIEWABLE_MEDIA_TYPES = frozenset(("images", "video", "audio", "3d", "text"))
THREE_D_EXTENSIONS = (".obj", ".fbx", ".gltf", ".glb", ".usdz")  # no media type of their own
TEXT_EXTENSIONS = (".txt", ".md", ".json")  # what SaveText writes
TEXT_PREVIEW_MAX_LENGTH = 1024

# what a cancel found the job to be (ComfyUI classify_job_for_cancel)
CANCEL_RUNNING, CANCEL_PENDING, CANCEL_TERMINAL, CANCEL_UNKNOWN = "running", "pending", "terminal", "unknown"


# ---- one job ----------------------------------------------------------------------------------------
def _pruned(job: dict) -> dict:
    """ComfyUI prune_dict: the keys whose value is None left out."""
    return {k: v for k, v in job.items() if v is not None}


def _lower_name(item: dict) -> str:
    name = item.get("filename")
    return name.lower() if isinstance(name, str) else ""


def has_3d_extension(filename: str) -> bool:
    return filename.lower().endswith(THREE_D_EXTENSIONS)


def normalize_output_item(item: Any) -> dict | None:
    """A dict as it is; a string naming a 3D file (Preview3D's output) as a file output; anything else None."""
    if isinstance(item, str):
        return {"filename": item, "type": "output", "subfolder": "", "mediaType": "3d"} if has_3d_extension(item) \
            else None
    return item if isinstance(item, dict) else None


def normalize_outputs(outputs: dict) -> dict:
    """The outputs of GET /jobs/{id} (ComfyUI normalize_outputs): in each node's lists, None items dropped and
    3D file names made file outputs; everything else (other strings, 'animated', non-list values) as it is."""
    normalized: dict = {}
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            normalized[node_id] = node_outputs
            continue
        node: dict = {}
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                node[media_type] = items
                continue
            out = []
            for item in items:
                if item is not None:
                    norm = normalize_output_item(item)
                    out.append(norm if norm is not None else item)
            node[media_type] = out
        normalized[node_id] = node
    return normalized


def is_previewable(media_type: str, item: dict) -> bool:
    """ComfyUI is_previewable (the frontend's rule): a previewable media type, a video/ or audio/ `format`,
    or a 3D or text file name."""
    if media_type in PREVIEWABLE_MEDIA_TYPES:
        return True
    fmt = item.get("format")
    if isinstance(fmt, str) and fmt.startswith(("video/", "audio/")):
        return True
    return _lower_name(item).endswith(THREE_D_EXTENSIONS + TEXT_EXTENSIONS)


def is_text_preview(media_type: str, item: dict) -> bool:
    """Text rather than visual media: ranked below any image, video, audio or 3D output for the preview."""
    return media_type == "text" or _lower_name(item).endswith(TEXT_EXTENSIONS)


def _text_preview(value: str) -> dict:
    if len(value) <= TEXT_PREVIEW_MAX_LENGTH:
        return {"content": value}
    return {"content": value[:TEXT_PREVIEW_MAX_LENGTH], "truncated": True}


def outputs_summary(outputs: dict) -> tuple[int, int, dict | None]:
    """(outputs_count, previewable_outputs_count, preview_output) in one walk (ComfyUI get_outputs_summary and
    count_previewable_outputs).

    Every output item is counted (a 3D file name as a file; 'animated' and non-list values are no items);
    text content (the non-file strings under 'text') is not, and may only be the preview. The preview is the
    first of, in this order: a type=output visual item (images, video, audio, 3D, or a file previewable by
    `format` or extension), another previewable visual item, a saved text file, the first text content
    (cut to TEXT_PREVIEW_MAX_LENGTH) - whatever order the nodes come in. An item's own mediaType is kept."""
    count = previewable = 0
    preview = fallback = text_file = text = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict):
                    normalized = normalize_output_item(item)
                    if normalized is None:
                        if media_type == "text" and text is None:
                            value = (item[0] if item else "") if isinstance(item, tuple) else item
                            text = {**_text_preview(value if isinstance(value, str) else str(value)),
                                    "nodeId": node_id, "mediaType": media_type}
                        continue
                    item = normalized
                count += 1
                if not is_previewable(media_type, item):
                    continue
                previewable += 1
                if preview is not None:
                    continue
                enriched = {**item, "nodeId": node_id}
                if "mediaType" not in item:
                    enriched["mediaType"] = media_type
                if is_text_preview(media_type, item):
                    if text_file is None:
                        text_file = enriched
                elif item.get("type") == "output":
                    preview = enriched
                elif fallback is None:
                    fallback = enriched
    return count, previewable, preview or fallback or text_file or text


def job_metadata(extra_data: Any) -> tuple[Any, Any]:
    """(create_time, workflow_id): extra_data.create_time and extra_data.extra_pnginfo.workflow.id (the UI's
    workflow id), None where missing."""
    if not isinstance(extra_data, dict):
        return None, None
    pnginfo = extra_data.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    return extra_data.get("create_time"), workflow.get("id") if isinstance(workflow, dict) else None


def queue_job(item: list, status: str, include_workflow: bool = False) -> dict:
    """A running or pending queue item as a job (ComfyUI normalize_queue_item); `include_workflow` (GET
    /jobs/{id}) adds its workflow {prompt, extra_data}."""
    create_time, workflow_id = job_metadata(item[3])
    job = _pruned({"id": item[1], "status": status, "priority": item[0], "create_time": create_time,
                   "outputs_count": 0, "previewable_outputs_count": 0, "workflow_id": workflow_id})
    if include_workflow:
        job["workflow"] = {"prompt": item[2], "extra_data": item[3]}
    return job


def history_job(prompt_id: str, entry: dict, include_outputs: bool = False) -> dict:
    """A history entry as a job (ComfyUI normalize_history_item); `include_outputs` (GET /jobs/{id}) adds its
    outputs, execution_status and workflow."""
    item = entry["prompt"]
    create_time, workflow_id = job_metadata(item[3])
    status_info = entry.get("status", {})
    status_str = status_info.get("status_str") if status_info else None
    outputs = entry.get("outputs")
    outputs = outputs if isinstance(outputs, dict) else {}
    start = end = error = None
    interrupted = False
    for message in (status_info.get("messages") or []) if status_info else []:
        if not isinstance(message, (list, tuple)) or len(message) < 2 or not isinstance(message[1], dict):
            continue
        event, data = message[0], message[1]
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            if event == "execution_error":
                error = data
            elif event == "execution_interrupted":
                interrupted = True
    if status_str == "error":
        status = "cancelled" if interrupted else "failed"
    else:  # success, or no status_str at all
        status = "completed"
    count, previewable, preview = outputs_summary(outputs)
    job = _pruned({"id": prompt_id, "status": status, "priority": item[0], "create_time": create_time,
                   "execution_start_time": start, "execution_end_time": end, "execution_error": error,
                   "outputs_count": count, "previewable_outputs_count": previewable, "preview_output": preview,
                   "workflow_id": workflow_id})
    if include_outputs:
        job["outputs"] = normalize_outputs(outputs)
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
        """ComfyUI get_job: the history first, then the running and the pending prompts (with their
        workflow: the frontend caches this answer by id and never asks again); 404 {"error": "Job not found"}."""
        entry = queue.history(job_id).get(job_id)
        if entry is not None:
            return history_job(job_id, entry, include_outputs=True)
        _, running, pending = queue.snapshot()  # pending items uncopied: only read here
        for items, status in ((running, "in_progress"), (pending, "pending")):
            for item in items:
                if item[1] == job_id:
                    return queue_job(item, status, include_workflow=True)
        return JSONResponse({"error": "Job not found"}, status_code=404)

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
