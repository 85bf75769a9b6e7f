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
import logging
from operator import itemgetter
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sd35fp8.server.history import join_wrapped
from sd35fp8.server.queue import PromptQueue
from sd35fp8.server.validation import RequestError, canonical_uuid, read_json

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")  # ComfyUI JobStatus.ALL, in its order
SORT_BY = ("created_at", "execution_duration")
PREVIEWABLE_MEDIA_TYPES = frozenset(("images", "video", "audio", "3d", "text"))
THREE_D_EXTENSIONS = (".obj", ".fbx", ".gltf", ".glb", ".usdz")  # no media type of their own
TEXT_EXTENSIONS = (".txt", ".md", ".json")  # what SaveText writes
TEXT_PREVIEW_MAX_LENGTH = 1024

log = logging.getLogger(__name__)

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


# ---- the rows GET /jobs pages through ---------------------------------------------------------------------
Row = tuple  # (create_time, status, the job rendered as JSON, history insertion number, duration, workflow_id)
CREATED, STATUS, BODY, SEQ, DURATION, WORKFLOW = range(6)
SMALL_PAGE = 256  # a newest-first page up to this long is cut from the ascending rows (no reversed copy)


def _sort_created(job: dict) -> Any:
    return job.get("create_time", 0)  # ComfyUI apply_sorting


def _duration(job: dict) -> Any:
    """ComfyUI apply_sorting's execution_duration: end - start, 0 unless both are there (queued jobs: 0)."""
    start, end = job.get("execution_start_time", 0), job.get("execution_end_time", 0)
    return end - start if end and start else 0


def _row(job: dict, seq: int = 0) -> Row:
    return _sort_created(job), job["status"], _dumps(job), seq, _duration(job), job.get("workflow_id")


_created = itemgetter(CREATED)
_seq = itemgetter(SEQ)


def _row_key(row: Row) -> tuple[Any, int]:
    """A history row's place oldest first: create_time, then the entry's insertion number (history order)."""
    return row[CREATED], row[SEQ]


def _row_key_desc(row: Row) -> tuple[Any, int]:
    """A history row's place newest first (a stable descending sort of the history: equal create_times
    keep history order). create_time is the server's int (POST /prompt)."""
    return -row[CREATED], row[SEQ]


def _dumps(value: Any) -> bytes:
    """JSON bytes as Starlette's JSONResponse renders them (compact, UTF-8, no NaN)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def desc_slice(rows: list[Row], k: int, offset: int, end: int) -> list[Row]:
    """Positions offset..end of sorted(rows, key=row[k], reverse=True) - Python's stable descending sort, as
    ComfyUI's apply_sorting: equal keys keep their order - from `rows` sorted ascending by row[k], without
    building it: a run of equal keys takes the same positions in both orders, mirrored, and keeps its order."""
    total, key, out, i = len(rows), itemgetter(k), [], offset
    while i < end:
        j = total - 1 - i
        v = rows[j][k]
        if (j == 0 or rows[j - 1][k] != v) and (j + 1 == total or rows[j + 1][k] != v):  # no tie: the usual case
            out.append(rows[j])
            i += 1
            continue
        lo, hi = bisect.bisect_left(rows, v, 0, j, key=key), bisect.bisect_right(rows, v, j, total, key=key)
        first, stop = total - hi, min(end, total - lo)  # the run's positions newest first: first..total - lo
        out.extend(rows[lo + i - first: lo + stop - first])
        i = stop
    return out


class Ordered:
    """The rows of one view of GET /jobs (statuses, workflow_id, sort_by), ascending by the sort key, equal
    keys in ComfyUI's order (running, pending, then history order), and pages of them in either order.
    Newest first is a stable descending sort (ComfyUI: sorted(reverse=True)); a long page of it comes from
    `newest()` (built once per view: the maintained newest-first rows, filtered), a short one is cut from
    the ascending rows (desc_slice)."""

    __slots__ = ("asc", "key", "_newest", "_desc")

    def __init__(self, asc: list[Row], key: int, newest: Any = None):
        self.asc, self.key, self._newest, self._desc = asc, key, newest, None

    def __len__(self) -> int:
        return len(self.asc)

    def page(self, desc: bool, offset: int, end: int) -> list[Row]:
        if offset >= end:
            return []
        if not desc:
            return self.asc[offset:end]
        if self._desc is None and end - offset > SMALL_PAGE:
            self._desc = self._newest() if self._newest is not None else \
                sorted(self.asc, key=itemgetter(self.key), reverse=True)
        if self._desc is not None:
            return self._desc[offset:end]
        return desc_slice(self.asc, self.key, offset, end)


class _Summaries:
    """history_job of each history entry, computed and rendered to JSON once (entries never change;
    ids that left are forgotten), and the rows GET /jobs pages through: the history's sorted by
    create_time once per history version, the queue's once per queue version (each pending item
    rendered once), their merge per (versions, statuses, workflow_id, sort_by). A page is then a slice
    and a join of cached bytes: O(page) after the first read, ~1 ms for 10 000 jobs (benchmarks/history.py)."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[dict, dict, bytes]] = {}  # id -> (history entry, job, JSON)
        self._sorted: tuple[int, list[dict]] | None = None
        self._rows: tuple[int, list[Row], list[Row]] | None = None  # (version, oldest first, newest first)
        self._row_of: dict[str, Row] = {}  # history id -> its row in self._rows
        self._live: tuple[int, list[Row], list[Row], list[Row]] | None = None
        self._pending: dict[str, tuple[list, Row]] = {}  # id -> (pending item, its row)
        self._views: dict[tuple, Ordered] = {}

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
            jobs.sort(key=_sort_created)
            self._sorted = (version, jobs)
        return self._sorted[1]

    def of(self, history: dict) -> list[dict]:
        out = [self._hit(pid, entry)[1] for pid, entry in history.items()]
        self._prune(history)
        return out

    def _done_row(self, hit: tuple[dict, dict, bytes], seq: int) -> Row:
        job = hit[1]
        return _sort_created(job), job["status"], hit[2], seq, _duration(job), job.get("workflow_id")

    def done_rows(self, queue: PromptQueue) -> tuple[int, list[Row], list[Row]]:
        """(history version, the history's rows oldest create_time first, the same newest first), equal
        create_times in history order both ways. After a few changes (the history's change log) the rows
        of the last version are updated in place of a copy: a new or dropped entry is one bisect, not a
        walk and sort of every entry."""
        histories = queue.histories
        version = histories.version
        if self._rows is not None and self._rows[0] == version:
            return self._rows
        changes = histories.changes_since(self._rows[0]) if self._rows is not None else None
        if changes is not None and len(changes[1]) <= 256:
            version, rows, newest = changes[0], list(self._rows[1]), list(self._rows[2])
            for op, pid, entry, seq in changes[1]:
                old = self._row_of.pop(pid, None)
                if old is not None:
                    del rows[bisect.bisect_left(rows, _row_key(old), key=_row_key)]
                    del newest[bisect.bisect_left(newest, _row_key_desc(old), key=_row_key_desc)]
                if op == "add":
                    row = self._row_of[pid] = self._done_row(self._hit(pid, entry), seq)
                    rows.insert(bisect.bisect_left(rows, _row_key(row), key=_row_key), row)
                    newest.insert(bisect.bisect_left(newest, _row_key_desc(row), key=_row_key_desc), row)
                else:
                    self._done.pop(pid, None)
        else:
            version, history, seqs = histories.snapshot()
            hits = [self._hit(pid, entry) for pid, entry in history.items()]
            self._prune(history)
            rows = [self._done_row(h, seqs[pid]) for pid, h in zip(history, hits)]
            self._row_of = dict(zip(history, rows))
            rows.sort(key=_row_key)
            newest = sorted(rows, key=_row_key_desc)
        self._rows = (version, rows, newest)
        return self._rows

    def live_rows(self, queue: PromptQueue) -> tuple[int, list[Row], list[Row], list[Row]]:
        """(queue version, the running and pending prompts' rows oldest create_time first, the same newest
        first, the same in queue order: running, then pending in run order; equal create_times in queue
        order every way)."""
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
            self._live = (version, sorted(rows, key=_created), sorted(rows, key=_created, reverse=True), rows)
        return self._live

    def view(self, queue: PromptQueue, wanted: frozenset[str], workflow_id: str | None = None,
             sort_by: str = "created_at") -> Ordered:
        """The jobs whose status is in `wanted` (and whose workflow_id is `workflow_id`, when given), by
        create_time or by execution duration, equal keys in the order ComfyUI lists them before its stable
        sort (get_all_jobs: running, pending, then the history in its order). Cached per (history version,
        queue version, wanted, workflow_id, sort_by)."""
        done_version, done, done_newest = self.done_rows(queue)
        live_version, live, live_newest, live_queued = self.live_rows(queue)
        key = (done_version, live_version, wanted, workflow_id, sort_by)
        view = self._views.get(key)
        if view is not None:
            return view
        every_done, every_live = wanted >= {"completed", "failed", "cancelled"}, wanted >= {"in_progress", "pending"}

        def keep(rows: list[Row], everything: bool) -> list[Row]:
            if not everything:
                rows = [r for r in rows if r[STATUS] in wanted]
            if workflow_id:
                rows = [r for r in rows if r[WORKFLOW] == workflow_id]
            return rows

        if sort_by == "execution_duration":
            rows = keep(live_queued, every_live) + sorted(keep(done, every_done), key=_seq)
            view = Ordered(sorted(rows, key=itemgetter(DURATION)), DURATION)
        else:
            view = Ordered(_merge(keep(live, every_live), keep(done, every_done), False), CREATED,
                           lambda: _merge(keep(live_newest, every_live), keep(done_newest, every_done), True))
        if len(self._views) >= 8 or any(k[:2] != key[:2] for k in self._views):
            self._views = {}
        self._views[key] = view
        return view


def _merge(live: list[Row], done: list[Row], newest_first: bool) -> list[Row]:
    """The queue's and the history's rows, both sorted by create_time the same way, as one list: on equal
    create_times the queue's come first (ComfyUI's stable sort of running + pending + history)."""
    if not live:
        return done
    if not done:
        return live
    if (done[-1][CREATED] > live[0][CREATED]) if newest_first else (done[-1][CREATED] < live[0][CREATED]):
        return done + live  # the usual case oldest first: the history is older than the queue
    if (live[-1][CREATED] > done[0][CREATED]) if newest_first else (live[-1][CREATED] < done[0][CREATED]):
        return live + done  # the usual case newest first
    return list(heapq.merge(live, done, key=_created, reverse=newest_first))


def all_jobs(queue: PromptQueue, summaries: _Summaries | None = None) -> list[dict]:
    running, pending = queue.current_queue()
    jobs = [queue_job(i, "in_progress") for i in running] + [queue_job(i, "pending") for i in pending]
    history = queue.history()
    jobs += summaries.of(history) if summaries is not None else [history_job(p, e) for p, e in history.items()]
    return jobs


def _bad_query(message: str) -> JSONResponse:
    """ComfyUI's answer to a bad GET /api/jobs parameter: 400 {"error": message}."""
    return JSONResponse({"error": message}, status_code=400)


def _first(request: Request, name: str, default: str | None = None) -> str | None:
    """A query parameter's first value, as aiohttp's query.get answers (Starlette's .get takes the last)."""
    values = request.query_params.getlist(name)
    return values[0] if values else default


def jobs_routes(queue: PromptQueue) -> APIRouter:
    r = APIRouter()
    summaries = _Summaries()
    last_body: list[tuple | None] = [None]  # ((view id, order, offset, limit), view, body) of the last page

    @r.get("/jobs")
    async def list_jobs(request: Request) -> Response:
        """ComfyUI GET /api/jobs: status (comma-separated, any case; none: all), workflow_id, sort_by
        (created_at | execution_duration), sort_order (asc | desc, default desc), limit (> 0; none: all),
        offset (>= 0; a negative one is 0); a bad value is 400 {"error": ...} with ComfyUI's message.
        {"jobs": [...], "pagination": {"offset", "limit" (null when not given), "total", "has_more"}}."""
        query = request.query_params
        status_param = _first(request, "status")
        workflow_id = _first(request, "workflow_id")
        sort_by = (_first(request, "sort_by", "created_at") or "").lower()
        sort_order = (_first(request, "sort_order", "desc") or "").lower()
        wanted = frozenset(STATUSES)
        if status_param:
            statuses = [s.strip().lower() for s in status_param.split(",") if s.strip()]
            invalid = [s for s in statuses if s not in STATUSES]
            if invalid:
                return _bad_query(f"Invalid status value(s): {', '.join(invalid)}. Valid values: {', '.join(STATUSES)}")
            wanted = frozenset(statuses)  # "," names none: no job, as ComfyUI
        if sort_by not in SORT_BY:
            return _bad_query("sort_by must be 'created_at' or 'execution_duration'")
        if sort_order not in ("asc", "desc"):
            return _bad_query("sort_order must be 'asc' or 'desc'")
        limit = None
        if "limit" in query:
            try:
                limit = int(_first(request, "limit") or "")
            except ValueError:
                return _bad_query("limit must be an integer")
            if limit <= 0:
                return _bad_query("limit must be a positive integer")
        offset = 0
        if "offset" in query:
            try:
                offset = max(int(_first(request, "offset") or ""), 0)
            except ValueError:
                return _bad_query("offset must be an integer")

        view = summaries.view(queue, wanted, workflow_id or None, sort_by)  # cached until the queue or history changes
        desc = sort_order == "desc"
        key = (id(view), desc, offset, limit)
        if last_body[0] is not None and last_body[0][0] == key and last_body[0][1] is view:
            return Response(last_body[0][2], media_type="application/json")  # the same page again
        total = len(view)
        page = view.page(desc, offset, total if limit is None else min(offset + limit, total))
        pagination = {"offset": offset, "limit": limit, "total": total, "has_more": offset + len(page) < total}
        tail = b'],"pagination":' + _dumps(pagination) + b"}"
        body = join_wrapped(b'{"jobs":[', [row[BODY] for row in page], tail) if page else b'{"jobs":[' + tail
        last_body[0] = (key, view, body)
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
        """ComfyUI POST /api/jobs/cancel {"job_ids": [...]}: every id must be a canonical UUID string, else
        400 {"error": "job_ids contains invalid id(s)", "invalid_ids": [...]} (a non-string as its Python
        repr) and nothing is cancelled; then each running or pending job is cancelled, finished or unknown ids
        are no-ops, and the answer is {"cancelled": whether any was}. A body that is no JSON: 400 {"error":
        "Request body must be valid JSON"}; job_ids not a list: 400 {"error": "job_ids must be a list"}. (A
        browser's non-JSON Content-Type stays 415 and an oversized body 413, in this server's error shape.)"""
        try:
            data = await read_json(request)
        except RequestError as e:
            if e.type != "invalid_json":
                raise
            return JSONResponse({"error": "Request body must be valid JSON"}, status_code=400)
        job_ids = data.get("job_ids") if isinstance(data, dict) else None
        if not isinstance(job_ids, list):
            return JSONResponse({"error": "job_ids must be a list"}, status_code=400)
        invalid = [j if isinstance(j, str) else repr(j) for j in job_ids if not canonical_uuid(j)]
        if invalid:
            return JSONResponse({"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}, status_code=400)
        worker, (running, pending) = request.app.state.worker, _queued_ids(queue)
        cancelled = False
        for job_id in job_ids:  # best effort: each id, whatever became of the others
            result = cancel_job(worker, queue, job_id, running, pending)
            cancelled = cancelled or result in (CANCEL_RUNNING, CANCEL_PENDING)
        return JSONResponse({"cancelled": cancelled})

    @r.post("/jobs/{job_id}/cancel")
    async def cancel_one(job_id: str, request: Request) -> Response:
        """ComfyUI POST /api/jobs/{job_id}/cancel: any state, idempotent, no id check: 200 {"cancelled": true}
        when a running job was interrupted or a pending one dequeued, {"cancelled": false} otherwise."""
        result = cancel_job(request.app.state.worker, queue, job_id, *_queued_ids(queue))
        return JSONResponse({"cancelled": result in (CANCEL_RUNNING, CANCEL_PENDING)})

    return r


def _queued_ids(queue: PromptQueue) -> tuple[set[str], set[str]]:
    """(running ids, pending ids) now: what a cancel classifies against (the actions check again)."""
    _, running, pending = queue.snapshot()
    return {item[1] for item in running}, {item[1] for item in pending}


def classify_job_for_cancel(queue: PromptQueue, job_id: str, running: set[str], pending: set[str]) -> str:
    """ComfyUI classify_job_for_cancel: running, pending, terminal (in the history) or unknown."""
    if job_id in running:
        return CANCEL_RUNNING
    if job_id in pending:
        return CANCEL_PENDING
    return CANCEL_TERMINAL if queue.history(job_id) else CANCEL_UNKNOWN


def cancel_job(worker: Any, queue: PromptQueue, job_id: str, running: set[str], pending: set[str]) -> str:
    """ComfyUI cancel_job: a running job is interrupted (worker.interrupt: only while it still runs, so never
    a prompt that started since), a pending one dequeued; a finished or unknown id is a no-op. Answers what
    really happened, whatever changed since `running` and `pending` were read: a job that finished before
    its interrupt is unknown; one that started before its dequeue is interrupted instead (running), or
    unknown when it has finished too."""
    kind = classify_job_for_cancel(queue, job_id, running, pending)
    if kind == CANCEL_PENDING:
        if queue.delete_queue_item(job_id):
            log.info("Cancelling pending prompt %s", job_id)
            return CANCEL_PENDING
    elif kind != CANCEL_RUNNING:
        return kind  # terminal and unknown: nothing to do
    if worker.interrupt(job_id):
        log.info("Cancelling running prompt %s", job_id)
        return CANCEL_RUNNING
    return CANCEL_UNKNOWN
