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
    queue.put([created, pid, {"1": {}}, {"create_time": created, **(extra or {})}, ["1"]])
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
