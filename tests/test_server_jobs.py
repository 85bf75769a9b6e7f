"""The jobs API (sd35fp8.server.jobs) against the newest ComfyUI's (comfy_execution/jobs.py and the /api/jobs
routes of server.py): the fields of a job, GET /jobs's parameters, errors and envelope, GET /jobs/{id}, and
the cancel routes. The expectations are written out here from ComfyUI's code (ComfyUI is not imported).
No model: a bare app over a PromptQueue, or create_app with test_server's fake executor."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sd35fp8.server.jobs import history_job, is_previewable, jobs_routes, normalize_outputs, outputs_summary, \
    queue_job
from sd35fp8.server.queue import PromptQueue

WORKFLOW = {"extra_pnginfo": {"workflow": {"id": "wf-1", "nodes": []}}}


def done_entry(pid: str, created: int | None = 100, outputs: dict | None = None, status_str: str | None = "success",
               messages: list | None = None, extra: dict | None = None) -> dict:
    extra_data = dict(extra or {})
    if created is not None:
        extra_data["create_time"] = created
    status = {"status_str": status_str, "completed": status_str == "success", "messages": messages or []}
    if status_str is None:
        del status["status_str"]
    return {"prompt": [7, pid, {"1": {"class_type": "X", "inputs": {}}}, extra_data, ["1"]],
            "outputs": outputs or {}, "status": status, "meta": {}}


# ---- the fields of one job ------------------------------------------------------------------------------
def test_is_previewable_follows_comfyui():
    """ComfyUI is_previewable: a previewable media type (images, video, audio, 3d, text), a `format` that
    starts with video/ or audio/, or a 3D (.obj .fbx .gltf .glb .usdz) or text (.txt .md .json) file name,
    in any case."""
    for media in ("images", "video", "audio", "3d", "text"):
        assert is_previewable(media, {})
    for media in ("latents", "files", "gifs", "result"):
        assert not is_previewable(media, {})
    assert is_previewable("files", {"format": "video/h264-mp4"}) and is_previewable("gifs", {"format": "audio/wav"})
    assert not is_previewable("files", {"format": "image/png"}) and not is_previewable("files", {"format": 5})
    for name in ("m.obj", "m.FBX", "m.gltf", "m.glb", "m.usdz", "t.txt", "t.MD", "t.json"):
        assert is_previewable("files", {"filename": name}), name
    for name in ("x.latent", "x.safetensors", "x.png", "glb", None, 3):
        assert not is_previewable("files", {"filename": name}), name


def test_outputs_count_and_previewable_count():
    """outputs_count counts every output item (a 3D file name string as one; None, other strings, text
    content, 'animated' and non-list values are none); previewable_outputs_count only what is_previewable
    takes (SaveLatent's .latent next to a SaveImage: 2 outputs, 1 previewable)."""
    outputs = {
        "9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}], "animated": [False]},
        "10": {"latents": [{"filename": "l_00001_.latent", "subfolder": "", "type": "output"}]},
        "11": {"result": ["preview3d_1.glb", None, "note"], "count": 3},
        "12": {"text": ["a caption", "second"]},
        "13": "not a dict",
    }
    assert outputs_summary(outputs)[:2] == (3, 2)
    assert outputs_summary({})[:2] == (0, 0)
    assert outputs_summary({"1": {"text": ["only text"]}})[:2] == (0, 0)
    assert outputs_summary({"1": {"files": [{"filename": "s.txt", "type": "output"}]}})[:2] == (1, 1)


def test_preview_output_priority():
    """ComfyUI get_outputs_summary: a type=output visual item first, then another previewable visual item,
    then a saved text file, then text content - whatever the node order; the preview is the item with
    nodeId and (unless it has one) mediaType added."""
    temp = {"filename": "p.png", "subfolder": "", "type": "temp"}
    saved = {"filename": "s.png", "subfolder": "", "type": "output"}
    text_file = {"filename": "t.txt", "subfolder": "", "type": "output"}
    video = {"filename": "v.webm", "subfolder": "", "type": "output", "format": "video/webm"}

    def preview(outputs: dict) -> dict | None:
        return outputs_summary(outputs)[2]

    assert preview({"1": {"images": [temp]}, "2": {"images": [saved]}}) == {**saved, "nodeId": "2",
                                                                               "mediaType": "images"}
    assert preview({"1": {"text": ["caption"]}, "2": {"images": [temp]}}) == {**temp, "nodeId": "2",
                                                                                 "mediaType": "images"}
    assert preview({"1": {"text": ["t"], "files": [text_file]}, "2": {"images": [temp]}})["filename"] == "p.png"
    assert preview({"1": {"files": [text_file]}, "2": {"gifs": [video]}})["filename"] == "v.webm"
    assert preview({"1": {"text": ["the text"], "files": [text_file]}}) == {**text_file, "nodeId": "1",
                                                                             "mediaType": "files"}
    assert preview({"1": {"text": ["hello"]}}) == {"content": "hello", "nodeId": "1", "mediaType": "text"}
    long = preview({"1": {"text": ["x" * 1500]}})
    assert long == {"content": "x" * 1024, "truncated": True, "nodeId": "1", "mediaType": "text"}
    assert preview({"1": {"latents": [{"filename": "l.latent", "type": "output"}]}}) is None
    # a 3D file name becomes a file output, and its own mediaType is kept
    assert preview({"1": {"latents": [{"filename": "l.latent"}]}, "2": {"result": ["m.glb", None]}}) == {
        "filename": "m.glb", "type": "output", "subfolder": "", "mediaType": "3d", "nodeId": "2"}
    own = {"filename": "a.png", "type": "output", "mediaType": "custom"}
    assert preview({"1": {"images": [own]}}) == {**own, "nodeId": "1"}


def test_history_job_fields():
    """ComfyUI normalize_history_item: the keys in its order, None values left out, status from status_str
    and the messages (error + interrupted: cancelled), times from the messages' timestamps, workflow_id from
    extra_data.extra_pnginfo.workflow.id."""
    messages = [["execution_start", {"prompt_id": "a", "timestamp": 1000}],
                ["execution_cached", {"nodes": [], "prompt_id": "a", "timestamp": 1001}],
                ["execution_success", {"prompt_id": "a", "timestamp": 3500}]]
    out = {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}}
    job = history_job("a", done_entry("a", outputs=out, messages=messages, extra=WORKFLOW))
    assert list(job) == ["id", "status", "priority", "create_time", "execution_start_time", "execution_end_time",
                         "outputs_count", "previewable_outputs_count", "preview_output", "workflow_id"]
    assert job == {"id": "a", "status": "completed", "priority": 7, "create_time": 100, "execution_start_time": 1000,
                   "execution_end_time": 3500, "outputs_count": 1, "previewable_outputs_count": 1,
                   "preview_output": {**out["9"]["images"][0], "nodeId": "9", "mediaType": "images"},
                   "workflow_id": "wf-1"}
    error = {"prompt_id": "b", "node_id": "3", "exception_message": "boom", "timestamp": 2000}
    messages = [["execution_start", {"timestamp": 1500}], ["execution_error", error]]
    failed = history_job("b", done_entry("b", status_str="error", created=None, messages=messages))
    assert failed == {"id": "b", "status": "failed", "priority": 7, "execution_start_time": 1500,
                      "execution_end_time": 2000, "execution_error": error, "outputs_count": 0,
                      "previewable_outputs_count": 0}
    cancelled = history_job("c", done_entry("c", status_str="error", messages=[
        ["execution_start", {"timestamp": 1}], ["execution_interrupted", {"node_id": "2", "timestamp": 9}], "junk"]))
    assert cancelled["status"] == "cancelled" and cancelled["execution_end_time"] == 9
    assert "execution_error" not in cancelled and "workflow_id" not in cancelled
    assert history_job("d", done_entry("d", status_str=None))["status"] == "completed"  # ComfyUI's default
    for extra in ({"extra_pnginfo": None}, {"extra_pnginfo": {"workflow": "x"}}, {"extra_pnginfo": {"workflow": {}}}):
        assert "workflow_id" not in history_job("e", done_entry("e", extra=extra))


def test_history_job_detail_normalizes_outputs():
    """include_outputs (GET /jobs/{id}): outputs through normalize_outputs (None dropped, a 3D file name made a
    file output, the rest as it is), the status as execution_status, and the workflow."""
    outputs = {"1": {"result": ["preview3d_1.glb", None, "plain"], "animated": [True], "n": 3},
               "2": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}, "3": "odd"}
    entry = done_entry("a", outputs=outputs, extra={"client_id": "c"})
    job = history_job("a", entry, include_outputs=True)
    assert job["outputs"] == normalize_outputs(outputs) == {
        "1": {"result": [{"filename": "preview3d_1.glb", "type": "output", "subfolder": "", "mediaType": "3d"},
                         "plain"], "animated": [True], "n": 3},
        "2": outputs["2"], "3": "odd"}
    assert job["execution_status"] == entry["status"]
    assert job["workflow"] == {"prompt": entry["prompt"][2], "extra_data": {"client_id": "c", "create_time": 100}}
    assert list(job)[-3:] == ["outputs", "execution_status", "workflow"]


def test_queue_job_fields():
    """ComfyUI normalize_queue_item: zero counts, workflow_id, None values left out; the workflow only when
    asked (the detail route)."""
    item = [3, "q", {"1": {}}, {"create_time": 50, **WORKFLOW}, ["1"]]
    assert queue_job(item, "pending") == {"id": "q", "status": "pending", "priority": 3, "create_time": 50,
                                          "outputs_count": 0, "previewable_outputs_count": 0, "workflow_id": "wf-1"}
    assert queue_job([3, "q", {}, {}, []], "in_progress") == {"id": "q", "status": "in_progress", "priority": 3,
                                                               "outputs_count": 0, "previewable_outputs_count": 0}
    assert queue_job(item, "pending", include_workflow=True)["workflow"] == {"prompt": item[2], "extra_data": item[3]}


# ---- routes over a bare app -----------------------------------------------------------------------------
class StubWorker:
    """worker.PromptWorker.interrupt's contract: True only when the prompt is running."""

    def __init__(self, queue: PromptQueue):
        self.queue, self.interrupted = queue, []

    def interrupt(self, prompt_id: str | None = None) -> bool:
        if prompt_id not in self.queue.running_ids():
            return False
        self.interrupted.append(prompt_id)
        return True


def jobs_app(queue: PromptQueue) -> FastAPI:
    app = FastAPI()
    app.state.queue, app.state.worker = queue, StubWorker(queue)
    app.include_router(jobs_routes(queue))
    app.include_router(jobs_routes(queue), prefix="/api")
    return app


def finish(queue: PromptQueue, pid: str, created: int, extra: dict | None = None, **entry) -> None:
    """A prompt through the queue into the history (first in line: taken before any waiting prompt)."""
    queue.put([created - 10**6, pid, {"1": {}}, {"create_time": created, **(extra or {})}, ["1"]])
    task, _ = queue.get(timeout=1)
    e = done_entry(pid, created, extra=extra, **entry)
    queue.task_done(task, e["outputs"], e["status"])


def test_job_detail_route():
    q = PromptQueue(max_queue=10)
    finish(q, "done", 10, outputs={"1": {"result": ["m.glb", None]}})
    q.put([1, "run", {"1": {"inputs": {"seed": 1}}}, {"create_time": 20, **WORKFLOW}, ["1"]])
    q.get(timeout=1)
    q.put([2, "wait", {"1": {"inputs": {"seed": 2}}}, {"create_time": 30}, ["1"]])
    with TestClient(jobs_app(q)) as c:
        done = c.get("/api/jobs/done").json()
        assert done["status"] == "completed" and done["outputs"]["1"]["result"] == [
            {"filename": "m.glb", "type": "output", "subfolder": "", "mediaType": "3d"}]
        assert done["preview_output"]["filename"] == "m.glb" and done["outputs_count"] == 1
        run = c.get("/jobs/run").json()
        assert run == {"id": "run", "status": "in_progress", "priority": 1, "create_time": 20, "outputs_count": 0,
                       "previewable_outputs_count": 0, "workflow_id": "wf-1",
                       "workflow": {"prompt": {"1": {"inputs": {"seed": 1}}},
                                    "extra_data": {"create_time": 20, **WORKFLOW}}}
        wait = c.get("/api/jobs/wait").json()
        assert wait["status"] == "pending" and wait["workflow"]["prompt"] == {"1": {"inputs": {"seed": 2}}}
        missing = c.get("/api/jobs/nope")
        assert missing.status_code == 404 and missing.json() == {"error": "Job not found"}


# ---- GET /jobs: parameters, errors, envelope, order ------------------------------------------------------
def test_list_parameter_errors_are_comfyuis():
    """ComfyUI GET /api/jobs checks status, sort_by, sort_order, limit, offset in this order and answers a bad
    one with 400 {"error": <its message>}; values are lower-cased, statuses stripped, a negative offset is 0."""
    q = PromptQueue(max_queue=10)
    finish(q, "a", 10)
    valid = "Valid values: pending, in_progress, completed, failed, cancelled"
    bad = {
        "status=done": f"Invalid status value(s): done. {valid}",
        "status=completed,Nope,%20x%20": f"Invalid status value(s): nope, x. {valid}",
        "sort_by=create_time": "sort_by must be 'created_at' or 'execution_duration'",
        "sort_by=": "sort_by must be 'created_at' or 'execution_duration'",
        "sort_order=up": "sort_order must be 'asc' or 'desc'",
        "limit=0": "limit must be a positive integer",
        "limit=-3": "limit must be a positive integer",
        "limit=x": "limit must be an integer",
        "limit=": "limit must be an integer",
        "limit=1.5": "limit must be an integer",
        "offset=x": "offset must be an integer",
        "status=bad&sort_by=bad&limit=0": f"Invalid status value(s): bad. {valid}",
        "sort_order=bad&limit=0": "sort_order must be 'asc' or 'desc'",
    }
    with TestClient(jobs_app(q)) as c:
        for query, message in bad.items():
            for prefix in ("", "/api"):
                r = c.get(f"{prefix}/jobs?{query}")
                assert (r.status_code, r.json()) == (400, {"error": message}), query
        ok = {"status=%20COMPLETED%20,failed": 1, "sort_by=EXECUTION_DURATION&sort_order=ASC": 1, "offset=-5": 1,
              "limit=%205%20": 1, "status=": 1, "status=,": 0, "status=pending": 0, "limit=1&limit=x": 1,
              "status=pending&status=completed": 0}
        for query, total in ok.items():
            r = c.get(f"/api/jobs?{query}")
            assert r.status_code == 200 and r.json()["pagination"]["total"] == total, (query, r.text)
        assert c.get("/jobs?offset=-5").json()["pagination"]["offset"] == 0


def test_list_envelope():
    """{"jobs": [...], "pagination": {offset, limit (null when not given), total, has_more}}."""
    q = PromptQueue(max_queue=10)
    for k in range(5):
        finish(q, f"j{k}", 10 + k)
    with TestClient(jobs_app(q)) as c:
        every = c.get("/api/jobs").json()
        assert list(every) == ["jobs", "pagination"] and [j["id"] for j in every["jobs"]] == ["j4", "j3", "j2", "j1",
                                                                                            "j0"]
        assert every["pagination"] == {"offset": 0, "limit": None, "total": 5, "has_more": False}
        page = c.get("/api/jobs?limit=2&offset=1&sort_order=asc").json()
        assert [j["id"] for j in page["jobs"]] == ["j1", "j2"]
        assert page["pagination"] == {"offset": 1, "limit": 2, "total": 5, "has_more": True}
        assert c.get("/api/jobs?offset=9").json() == {"jobs": [], "pagination": {
            "offset": 9, "limit": None, "total": 5, "has_more": False}}


def test_workflow_id_filter():
    """workflow_id keeps the jobs whose extra_data.extra_pnginfo.workflow.id is it, queued or finished; an
    empty one filters nothing."""
    q = PromptQueue(max_queue=10)
    finish(q, "a", 10, extra={"extra_pnginfo": {"workflow": {"id": "wf-1"}}})
    finish(q, "b", 11, extra={"extra_pnginfo": {"workflow": {"id": "wf-2"}}})
    finish(q, "c", 12)
    q.put([5, "p", {}, {"create_time": 13, **WORKFLOW}, []])
    with TestClient(jobs_app(q)) as c:
        ids = lambda query: [j["id"] for j in c.get(f"/jobs?{query}").json()["jobs"]]  # noqa: E731
        assert ids("workflow_id=wf-1") == ["p", "a"] and ids("workflow_id=wf-2") == ["b"]
        assert ids("workflow_id=wf-1&status=completed") == ["a"] and ids("workflow_id=none") == []
        assert ids("workflow_id=") == ["p", "c", "b", "a"]
        assert c.get("/jobs?workflow_id=wf-1").json()["jobs"][0]["workflow_id"] == "wf-1"


def test_equal_keys_keep_comfyuis_order():
    """ComfyUI lists running, then pending, then the history in its order, and sorts that stably - both ways
    (sorted(reverse=True) keeps equal keys in order): jobs of one create_time come in that order whether the
    newest or the oldest come first; by execution_duration, every queued job is 0."""
    q = PromptQueue(max_queue=10)
    finish(q, "h1", 5, messages=[["execution_start", {"timestamp": 100}], ["execution_success", {"timestamp": 130}]])
    finish(q, "h0", 1, messages=[["execution_start", {"timestamp": 100}], ["execution_success", {"timestamp": 110}]])
    finish(q, "h2", 5)  # no times: duration 0
    finish(q, "h3", 9, messages=[["execution_start", {"timestamp": 100}], ["execution_success", {"timestamp": 110}]])
    q.put([1, "r", {}, {"create_time": 5}, []])
    q.get(timeout=1)
    q.put([3, "p2", {}, {"create_time": 5}, []])
    q.put([2, "p1", {}, {"create_time": 5}, []])
    q.put([4, "p3", {}, {"create_time": 7}, []])
    with TestClient(jobs_app(q)) as c:
        ids = lambda query: [j["id"] for j in c.get(f"/jobs?{query}").json()["jobs"]]  # noqa: E731
        assert ids("sort_order=asc") == ["h0", "r", "p1", "p2", "h1", "h2", "p3", "h3"]
        assert ids("") == ["h3", "p3", "r", "p1", "p2", "h1", "h2", "h0"]
        assert ids("limit=3&offset=2") == ["r", "p1", "p2"] and ids("limit=2&offset=3") == ["p1", "p2"]
        assert ids("sort_by=execution_duration&sort_order=asc") == ["r", "p1", "p2", "p3", "h2", "h0", "h3", "h1"]
        assert ids("sort_by=execution_duration") == ["h1", "h0", "h3", "r", "p1", "p2", "p3", "h2"]
        assert ids("sort_by=execution_duration&limit=3&offset=1") == ["h0", "h3", "r"]


def test_desc_pages_equal_a_stable_reverse_sort():
    """Ordered.page newest first, cut from the ascending rows (short pages) or from a reversed copy (long
    ones), equals sorted(reverse=True)'s slice for rows with many equal keys."""
    import random

    from sd35fp8.server import jobs

    rng = random.Random(1)
    for n in (0, 1, 2, 7, 40, 600):
        rows = sorted([(rng.randrange(max(n // 3, 1)), "s", str(k).encode(), k, rng.randrange(4), None)
                       for k in range(n)], key=lambda r: r[0])
        for k in (jobs.CREATED, jobs.DURATION):
            asc = sorted(rows, key=lambda r: r[k])
            want = sorted(asc, key=lambda r: r[k], reverse=True)
            for offset, end in ((0, n), (0, 1), (1, 5), (3, 40), (n // 2, n), (5, 300), (0, 300), (n, n)):
                end = min(end, n)
                assert jobs.desc_slice(asc, k, offset, end) == want[offset:end], (n, k, offset, end)
                assert jobs.Ordered(asc, k).page(True, offset, end) == want[offset:end]
                assert jobs.Ordered(asc, k).page(False, offset, end) == asc[offset:end]


def test_long_pages_match_comfyuis_sort():
    """Pages longer than SMALL_PAGE newest first come from the maintained newest-first rows (merged, filtered):
    the same as ComfyUI's get_all_jobs for every status filter, workflow_id and sort, through history and
    queue changes, with many equal create_times between the queue and the history."""
    import random

    from sd35fp8.server import jobs

    rng = random.Random(7)
    q = PromptQueue(max_queue=400, max_history=350)

    def add_done(k: int) -> None:
        created = rng.randrange(60)
        outcome = rng.choice(["execution_success", "execution_error", "execution_interrupted"])
        finish(q, f"h{k}", created, extra={"extra_pnginfo": {"workflow": {"id": f"w{k % 3}"}}},
               status_str="success" if outcome == "execution_success" else "error",
               messages=[["execution_start", {"timestamp": 1000}], [outcome, {"timestamp": 1000 + rng.randrange(3)}]])

    for k in range(330):
        add_done(k)
    for k in range(40):
        q.put([k, f"q{k}", {}, {"create_time": 30 + rng.randrange(60), **({"extra_pnginfo": {"workflow": {
            "id": "w1"}}} if k % 2 else {})}, []])
    q.get(timeout=1)

    def comfy(status: str, workflow: str, sort_by: str, order: str) -> list[str]:
        wanted = status.split(",") if status else list(jobs.STATUSES)
        running, pending = q.current_queue()
        every = [queue_job(i, "in_progress") for i in running] + [queue_job(i, "pending") for i in pending]
        every += [history_job(p, e) for p, e in q.history().items()]
        every = [j for j in every if j["status"] in wanted and (not workflow or j.get("workflow_id") == workflow)]
        if sort_by == "execution_duration":
            def key(j):
                start, end = j.get("execution_start_time", 0), j.get("execution_end_time", 0)
                return end - start if end and start else 0
        else:
            def key(j):
                return j.get("create_time", 0)
        return [j["id"] for j in sorted(every, key=key, reverse=order == "desc")]

    with TestClient(jobs_app(q)) as c:
        for round_ in range(3):
            for status in ("", "completed,failed,cancelled", "pending,in_progress,completed", "failed"):
                for workflow in ("", "w1"):
                    for sort_by in ("created_at", "execution_duration"):
                        for order in ("desc", "asc"):
                            query = {"status": status, "workflow_id": workflow, "sort_by": sort_by,
                                     "sort_order": order}
                            want = comfy(status, workflow, sort_by, order)
                            got = c.get("/jobs", params=query).json()
                            assert [j["id"] for j in got["jobs"]] == want, (round_, query)
                            assert got["pagination"]["total"] == len(want)
                            got = c.get("/jobs", params={**query, "offset": 3, "limit": 290}).json()
                            assert [j["id"] for j in got["jobs"]] == want[3:293], (round_, query)
            for k in range(5):  # a few more finished (the oldest dropped), one deleted, one more queued
                add_done(1000 + 10 * round_ + k)
            q.delete_history_item(next(iter(q.history())))
            q.put([99, f"late{round_}", {}, {"create_time": 45}, []])


# ---- cancel ---------------------------------------------------------------------------------------------
IDS = [f"00000000-0000-4000-8000-00000000000{k}" for k in range(6)]


def cancel_queue() -> PromptQueue:
    """IDS[0] finished, IDS[1] running, IDS[2] and IDS[3] pending; IDS[4] unknown."""
    q = PromptQueue(max_queue=10)
    finish(q, IDS[0], 10)
    q.put([1, IDS[1], {}, {"create_time": 11}, []])
    q.get(timeout=1)
    q.put([2, IDS[2], {}, {"create_time": 12}, []])
    q.put([3, IDS[3], {}, {"create_time": 13}, []])
    return q


def test_cancel_one_job():
    """ComfyUI POST /api/jobs/{id}/cancel: 200 {"cancelled": true} for a running job (interrupted) or a pending
    one (dequeued), {"cancelled": false} for a finished or unknown id - any id, no UUID check."""
    q = cancel_queue()
    app = jobs_app(q)
    with TestClient(app) as c:
        for job_id, cancelled in ((IDS[0], False), (IDS[4], False), ("not-a-uuid", False), (IDS[1], True),
                                  (IDS[2], True)):
            r = c.post(f"/api/jobs/{job_id}/cancel")
            assert (r.status_code, r.json()) == (200, {"cancelled": cancelled}), job_id
        assert app.state.worker.interrupted == [IDS[1]]
        assert [i[1] for i in q.pending()] == [IDS[3]] and IDS[0] in q.history()
        assert c.post(f"/jobs/{IDS[2]}/cancel").json() == {"cancelled": False}  # already dequeued


def test_cancel_batch():
    """ComfyUI POST /api/jobs/cancel: every id checked first (canonical UUID strings; a non-string shown as
    its Python repr), then each running or pending one cancelled; {"cancelled": any was}."""
    q = cancel_queue()
    app = jobs_app(q)
    with TestClient(app) as c:
        upper = "A1B2C3D4-E5F6-7A89-B0C1-D2E3F4A5B6C7"  # uuid.UUID reads it; not its canonical spelling
        bad = [IDS[2], 5, None, True, {"a": 1}, ["x"], 1.5, upper, "{" + IDS[3] + "}", "nope", ""]
        r = c.post("/api/jobs/cancel", json={"job_ids": bad})
        assert r.status_code == 400 and r.json() == {"error": "job_ids contains invalid id(s)", "invalid_ids": [
            "5", "None", "True", "{'a': 1}", "['x']", "1.5", upper, "{" + IDS[3] + "}", "nope", ""]}
        assert len(q.pending()) == 2  # nothing cancelled
        for body in ({"job_ids": IDS[2]}, {"job_ids": None}, {"ids": [IDS[2]]}, [IDS[2]], "x", 3):
            r = c.post("/jobs/cancel", json=body)
            assert (r.status_code, r.json()) == (400, {"error": "job_ids must be a list"}), body
        for raw in (b"", b"{nope", b"[1,", b'{"job_ids": [NaN]}'):
            r = c.post("/jobs/cancel", content=raw, headers={"content-type": "application/json"})
            assert (r.status_code, r.json()) == (400, {"error": "Request body must be valid JSON"}), raw
        assert c.post("/jobs/cancel", json={"job_ids": []}).json() == {"cancelled": False}
        assert c.post("/jobs/cancel", json={"job_ids": [IDS[0], IDS[4]]}).json() == {"cancelled": False}
        r = c.post("/api/jobs/cancel", json={"job_ids": [IDS[0], IDS[2], IDS[4], IDS[1], IDS[2]], "other": 1})
        assert (r.status_code, r.json()) == (200, {"cancelled": True})
        assert [i[1] for i in q.pending()] == [IDS[3]] and app.state.worker.interrupted == [IDS[1]]


def test_cancel_answers_what_happened():
    """ComfyUI cancel_job around a stale classification: a 'running' job that has finished is unknown (no-op);
    a 'pending' job that has started is interrupted instead (running), or unknown once it has finished too;
    a finished job is terminal, an unknown id unknown."""
    from sd35fp8.server.jobs import cancel_job, classify_job_for_cancel

    q = cancel_queue()
    worker = StubWorker(q)
    assert [classify_job_for_cancel(q, i, {IDS[1]}, {IDS[2], IDS[3]}) for i in IDS[:5]] == [
        "terminal", "running", "pending", "pending", "unknown"]
    assert cancel_job(worker, q, IDS[1], set(), {IDS[1]}) == "running"  # seen pending, started since
    assert cancel_job(worker, q, IDS[0], {IDS[0]}, set()) == "unknown"  # seen running, finished since
    assert cancel_job(worker, q, IDS[0], set(), {IDS[0]}) == "unknown"  # seen pending, finished since
    assert cancel_job(worker, q, IDS[0], set(), set()) == "terminal"
    assert cancel_job(worker, q, IDS[3], set(), {IDS[3]}) == "pending" and len(q.pending()) == 1
    assert worker.interrupted == [IDS[1]]


def test_cancel_through_the_server(tmp_path):
    """The real worker: a held running prompt cancelled by id ends in the history as cancelled; a pending one
    cancelled by the batch route never runs."""
    from test_server import HOLD, HOLD_SEED, TESTCLIENT_HOSTS, fake_prompt, make_fake_executor, run_to_end, wait_for

    from sd35fp8.server import create_app

    HOLD.clear()
    app = create_app(tmp_path / "models", executor=make_fake_executor(tmp_path), max_queue=3,
                     allow_hosts=TESTCLIENT_HOSTS)
    try:
        with TestClient(app) as c:
            running = c.post("/prompt", json={"prompt": fake_prompt(seed=HOLD_SEED)}).json()["prompt_id"]
            wait_for(lambda: c.get("/queue").json()["queue_running"])
            pending = c.post("/prompt", json={"prompt": fake_prompt(seed=3)}).json()["prompt_id"]
            assert c.get(f"/api/jobs/{pending}").json()["workflow"]["prompt"]["2"]["inputs"]["seed"] == 3
            assert c.post("/api/jobs/cancel", json={"job_ids": [pending]}).json() == {"cancelled": True}
            assert c.post(f"/api/jobs/{running}/cancel").json() == {"cancelled": True}
            run_to_end(c, running)
            assert c.get(f"/api/jobs/{running}").json()["status"] == "cancelled"
            assert c.get(f"/api/jobs/{pending}").status_code == 404
            assert c.post(f"/api/jobs/{running}/cancel").json() == {"cancelled": False}  # finished: a no-op
            assert c.get("/queue").json() == {"queue_running": [], "queue_pending": []}
    finally:
        HOLD.set()
