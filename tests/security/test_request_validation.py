"""Malformed, mistyped, oversized and non-finite input: a clear 4xx in ComfyUI's error shape, never a
500, and nothing queued (issue 27 items 1-2)."""

from __future__ import annotations

import json
import uuid

import pytest

from comfy_models import WORKFLOWS
from conftest import fake_prompt, queued
from fastapi.testclient import TestClient
from sd35fp8.server.validation import Limits, prompt_work

JSON = {"content-type": "application/json"}


def _shape(r, status: int, type_: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error", "node_errors"} and {"type", "message", "details", "extra_info"} <= set(body["error"])
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return body


def test_oversized_bodies_are_413(client):
    big = json.dumps({"prompt": fake_prompt(), "extra_data": {"pad": "x" * 70_000}})
    _shape(client.post("/prompt", content=big, headers=JSON), 413, "body_too_large")

    def chunks():  # no Content-Length: the stream is cut at the limit
        for _ in range(100):
            yield b" " * 1000

    _shape(client.post("/prompt", content=chunks(), headers=JSON), 413, "body_too_large")
    _shape(client.post("/prompt", content=b"{}", headers={**JSON, "content-length": "abc"}), 413)
    assert queued(client) == 0


@pytest.mark.parametrize("raw, type_", [
    (b"[" * 30_000 + b"]" * 30_000, "json_too_deep"),  # the C scanner's RecursionError
    (b'{"prompt": ' + b"[" * 70 + b"]" * 70 + b"}", "json_too_deep"),  # past max_json_depth (64)
    (b'{"prompt": {}, "number": NaN}', "invalid_json"),
    (b'{"prompt": {}, "x": Infinity}', "invalid_json"),
    (b'{"prompt": {}, "x": -Infinity}', "invalid_json"),
    (b'{"prompt": {}, "x": 1e999}', "invalid_json"),
    (b"\xff\xfe{}", "invalid_json"),
    (b"{not json", "invalid_json"),
], ids=["recursion", "depth", "nan", "inf", "-inf", "overflow", "utf16", "syntax"])
def test_malformed_json_is_400(client, raw, type_):
    body = _shape(client.post("/prompt", content=raw, headers=JSON), 400, type_)
    json.dumps(body, allow_nan=False)  # the answer itself is valid JSON (it never echoes a NaN)
    assert queued(client) == 0


def test_nan_number_queues_nothing(client):
    """The issue's double submit: `"number": NaN` used to be queued and answered 500."""
    raw = json.dumps({"prompt": fake_prompt(), "number": float("nan")}).encode()  # Python writes NaN
    _shape(client.post("/prompt", content=raw, headers=JSON), 400, "invalid_json")
    _shape(client.post("/prompt", json={"prompt": fake_prompt(), "number": "nan"}), 400, "invalid_request")
    assert queued(client) == 0


@pytest.mark.parametrize("body", [
    {"prompt": {"1": {"class_type": ["CheckpointLoaderSimple"], "inputs": {}}}},
    {"prompt": {"1": {"class_type": {"a": 1}, "inputs": {}}}},
    {"prompt": {"1": {"class_type": "SaveImage", "inputs": [1, 2]}}},
    {"prompt": {"1": 5}},
    {"prompt": [1, 2, 3]},
    {"prompt": "text"},
    {"prompt": fake_prompt(), "partial_execution_targets": 5},
    {"prompt": fake_prompt(), "partial_execution_targets": [[1]]},
    {"prompt": fake_prompt(), "extra_data": [1]},
    {"prompt": fake_prompt(), "client_id": {"x": 1}},
    {"prompt": fake_prompt(), "prompt_id": "not-a-uuid"},
    {"prompt": fake_prompt(), "prompt_id": 12},
    {"prompt": fake_prompt(), "number": [1]},
])
def test_mistyped_prompt_bodies_are_400(client, body):
    _shape(client.post("/prompt", json=body), 400)
    assert queued(client) == 0


def test_partial_targets_that_are_not_node_ids_select_nothing(client):
    """ComfyUI tests `node_id in partial_execution_targets`: comfyui-skill-cli's [["3"]] selects no output."""
    _shape(client.post("/prompt", json={"prompt": fake_prompt(), "partial_execution_targets": [["3"]]}), 400,
           "prompt_no_outputs")
    _shape(client.post("/prompt", json={"prompt": fake_prompt(), "partial_execution_targets": [3]}), 400,
           "prompt_no_outputs")
    assert queued(client) == 0
    assert client.post("/prompt", json={"prompt": fake_prompt(), "partial_execution_targets": ["3"]}).status_code == 200


@pytest.mark.parametrize("route, body", [
    ("/queue", {"delete": 5}), ("/queue", {"delete": [{"a": 1}]}), ("/queue", {"clear": "maybe"}),
    ("/history", {"delete": 5}), ("/queue", [1]), ("/free", {"unload_models": [1]}),
    ("/settings", [1, 2]), ("/settings", "x"),
])
def test_mistyped_bodies_of_other_routes_are_400(client, route, body):
    for prefix in ("", "/api"):
        _shape(client.post(prefix + route, json=body), 400)


def test_mistyped_cancel_bodies_are_comfyuis_400(client):
    """POST /jobs/cancel answers as ComfyUI's does, {"error": <message>} (tests/test_server_jobs.py)."""
    for prefix in ("", "/api"):
        for body in ({"job_ids": 5}, [1], {}):
            r = client.post(prefix + "/jobs/cancel", json=body)
            assert (r.status_code, r.json()) == (400, {"error": "job_ids must be a list"})
        r = client.post(prefix + "/jobs/cancel", content=b"{nope", headers=JSON)
        assert (r.status_code, r.json()) == (400, {"error": "Request body must be valid JSON"})


@pytest.mark.parametrize("route", ["/prompt", "/queue", "/history", "/free", "/jobs/cancel", "/settings",
                                   "/settings/Comfy.X"])
def test_non_json_bodies(client, route):
    """Not JSON but labelled JSON: 400 (POST /jobs/cancel: ComfyUI's {"error": ...}). From a browser (Origin /
    Sec-Fetch-*), labelled anything else (text/plain, a form, no type: what a page may send without a CORS
    preflight): 415, and the route never runs."""
    if route == "/jobs/cancel":
        assert client.post(route, content=b"{nope", headers=JSON).status_code == 400
    else:
        _shape(client.post(route, content=b"{nope", headers=JSON), 400)
    for browser in ({"origin": "http://testserver"}, {"sec-fetch-site": "same-origin"}, {"sec-fetch-mode": "no-cors"}):
        for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {**browser, "content-type": ctype} if ctype else browser
            _shape(client.post(route, content=json.dumps({"prompt": fake_prompt()}), headers=headers), 415)
    r = client.patch("/internal/logs/subscribe", content=b'{"clientId": "x", "enabled": true}',
                     headers={"content-type": "text/plain", "origin": "http://testserver"})
    _shape(r, 415)
    _shape(client.patch("/internal/logs/subscribe", json={"clientId": 1, "enabled": [1]}), 400)
    assert queued(client) == 0


def test_scripts_may_send_any_content_type(client):
    """ComfyUI's API examples post with urllib (form-urlencoded) and clients with requests (no type)."""
    for headers in ({"content-type": "application/x-www-form-urlencoded"}, {}, {"content-type": "text/plain"}):
        r = client.post("/prompt", content=json.dumps({"prompt": fake_prompt(seed=len(headers) + 5)}), headers=headers)
        assert r.status_code == 200, (headers, r.text)


def test_query_parameters_are_400(client):
    for url in ("/history?max_items=abc", "/history?offset=1.5", "/api/history?max_items=1e9999"):
        _shape(client.get(url), 400)
    # GET /jobs answers as ComfyUI's does: {"error": <message>} (tests/test_server_jobs.py)
    assert client.get("/jobs?limit=x").json() == {"error": "limit must be an integer"}


def test_node_count_and_text_length(client):
    many = {str(i): {"class_type": "SaveImage", "inputs": {}} for i in range(51)}
    _shape(client.post("/prompt", json={"prompt": many}), 413, "too_many_nodes")
    p = fake_prompt()
    p["3"]["inputs"]["filename_prefix"] = "x" * 501  # any STRING input; a prompt text in real workflows
    body = _shape(client.post("/prompt", json={"prompt": p}), 400, "prompt_outputs_failed_validation")
    (err,) = body["node_errors"]["3"]["errors"]
    assert err["type"] == "value_too_long" and err["extra_info"]["max_length"] == 500
    assert queued(client) == 0


def test_duplicate_prompt_id_is_400(client):
    pid = str(uuid.uuid4())
    assert client.post("/prompt", json={"prompt": fake_prompt(), "prompt_id": pid}).json()["prompt_id"] == pid
    _shape(client.post("/prompt", json={"prompt": fake_prompt(seed=2), "prompt_id": pid}), 400, "duplicate_prompt_id")
    # ComfyUI validate_job_id: another spelling of a UUID is refused, not rewritten to the canonical one
    _shape(client.post("/prompt", json={"prompt": fake_prompt(seed=2), "prompt_id": pid.upper()}), 400,
           "invalid_prompt_id")
    for bad in ("abc", 5, "{" + pid + "}", pid.replace("-", "")):
        _shape(client.post("/prompt", json={"prompt": fake_prompt(seed=2), "prompt_id": bad}), 400, "invalid_prompt_id")
    assert client.post("/prompt", json={"prompt": fake_prompt(seed=3), "prompt_id": None}).status_code == 200


def test_every_route_survives_garbage(client):
    """Each route of the app, every method, with hostile bodies and parameters: never a 500."""
    routes = {(m, r.path) for r in client.app.routes for m in getattr(r, "methods", ()) or ()}
    bodies = [b"", b"null", b"[]", b'{"a": [[[[[]]]]]}', b"\x00\x01", json.dumps({"prompt": 5}).encode()]
    for method, path in sorted(routes):
        url = path.replace("{prompt_id}", "x").replace("{node_class}", "X").replace("{kind}", "checkpoints") \
            .replace("{setting_id}", "s").replace("{file:path}", "a.json").replace("{job_id}", "j") \
            .replace("{directory_type}", "output")
        for raw in bodies:
            r = client.request(method, url + "?max_items=-1&offset=zz&dir=..", content=raw, headers=JSON)
            assert r.status_code < 500, (method, url, raw, r.status_code, r.text[:200])


def test_work_budget(tmp_path):
    """width x height x batch x steps over the server's budget: 400 before anything is queued."""
    graph = json.loads((WORKFLOWS / "seed-fp8-allinone.json").read_text())
    steps = next(n["inputs"]["steps"] for n in graph.values() if n["class_type"] == "KSampler")
    assert prompt_work(graph) == 1024 * 1024 * 1 * steps  # the seed workflow: 1024², batch 1

    from sd35fp8.server import create_app
    from sd35fp8.workflow import ModelFolders, PromptExecutor

    ckpt = tmp_path / "models" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "stable-diffusion-3.5-fp8.safetensors").write_bytes(b"\0" * 8)  # listed; never loaded here
    executor = PromptExecutor(ModelFolders(tmp_path / "models", output_dir=tmp_path / "out"), device="cpu")
    app = create_app(tmp_path / "models", executor=executor, allow_hosts=("testserver",), serve_frontend=False,
                     limits=Limits(max_pixel_steps=512 * 512 * 20, max_text_chars=1000))
    with TestClient(app) as c:
        _shape(c.post("/prompt", json={"prompt": graph}), 400, "prompt_over_budget")
        long_text = json.loads(json.dumps(graph))
        text_node = next(i for i, n in long_text.items() if n["class_type"] == "CLIPTextEncode")
        long_text[text_node]["inputs"]["text"] = "a cat " * 10_000  # 60 000 characters: the 9 GB request
        body = _shape(c.post("/prompt", json={"prompt": long_text}), 400)
        assert body["node_errors"][text_node]["errors"][0]["type"] == "value_too_long"
        assert queued(c) == 0


def test_websocket_survives_hostile_messages(client):
    """Client messages that are not JSON, or nest deeper than the JSON scanner recurses (a RecursionError
    that used to end the connection's task with a traceback), are ignored; the socket keeps answering."""
    with client.websocket_connect("/ws?clientId=hostile") as ws:
        assert ws.receive_json()["type"] == "status"
        for text in ("{not json", "[" * 100_000 + "]" * 100_000, '{"type": "feature_flags"' + "," * 10):
            ws.send_text(text)
        ws.send_text('{"type": "feature_flags", "data": {}}')
        assert ws.receive_json()["type"] == "feature_flags"
