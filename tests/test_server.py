"""ComfyUI HTTP/WS API (sd35fp8.server) with a fake executor: no model, runs in seconds.

The fake node set keeps the real validator, executor, cache and SaveImage; only the loader and the
sampler are stand-ins (the sampler reports progress, honours interrupt and can be held on an event).
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from sd35fp8.errors import InputError
from sd35fp8.server import PromptQueue, QueueFullError, batch_key, check_listen, create_app, encode_preview, \
    select_batch
from sd35fp8.workflow import ModelFolders, PromptExecutor
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, Node

TESTCLIENT_HOSTS = ("testserver",)  # the Host that starlette's TestClient sends
HOLD = threading.Event()  # FakeSampler waits on this when its seed is HOLD_SEED
HOLD_SEED = 777


class FakeCheckpointLoader(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "loaders"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"ckpt_name": (folders.get_filename_list("checkpoints"),)}}

    def load(self, ckpt_name):
        return ({"name": ckpt_name},)


class FakeSampler(Node):
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "sample"
    CATEGORY = "sampling"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**32}),
            "steps": ("INT", {"default": 3, "min": 1, "max": 10000}),
            "width": ("INT", {"default": 16, "min": 8, "max": 64}),
        }}

    def sample(self, model, seed, steps, width):
        for i in range(steps):
            while seed == HOLD_SEED and not HOLD.is_set():
                self.ctx.check_interrupt()
                time.sleep(0.01)
            self.ctx.check_interrupt()
            if steps > 50:
                time.sleep(0.01)
            self.ctx.progress(i + 1, steps)
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(1, width, width, 3, generator=g),)  # IMAGE [B, H, W, C]


FAKE_CLASSES = {"CheckpointLoaderSimple": FakeCheckpointLoader, "FakeSampler": FakeSampler,
                "SaveImage": NODE_CLASS_MAPPINGS["SaveImage"]}


def fake_prompt(seed: int = 1, steps: int = 3, ckpt: str = "tiny.safetensors") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}, "_meta": {"title": "Load"}},
        "2": {"class_type": "FakeSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps,
                                                      "width": 16}, "_meta": {"title": "Sampler"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "test"},
              "_meta": {"title": "Save Image"}},
    }


def make_fake_executor(root: Path) -> PromptExecutor:
    (root / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (root / "models" / "checkpoints" / "tiny.safetensors").write_bytes(b"\0" * 8)
    folders = ModelFolders(root, output_dir=root / "output", input_dir=root / "input", temp_dir=root / "temp")
    return PromptExecutor(folders, device="cpu", classes=FAKE_CLASSES)


def wait_for(cond, timeout: float = 10.0):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out waiting")


def run_to_end(c: TestClient, prompt_id: str) -> dict:
    return wait_for(lambda: c.get(f"/history/{prompt_id}").json().get(prompt_id))


@pytest.fixture()
def app(tmp_path):
    HOLD.clear()
    return create_app(tmp_path / "models", executor=make_fake_executor(tmp_path), max_queue=3,
                      max_upload_bytes=20_000, allow_hosts=TESTCLIENT_HOSTS)


@pytest.fixture()
def client(app):
    with TestClient(app) as c:
        yield c
    HOLD.set()


def png_bytes(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


# ---- prompts, websocket, history --------------------------------------------------------------
def test_ws_messages_and_history(client):
    with client.websocket_connect("/ws?clientId=c1") as ws:
        hello = ws.receive_json()
        assert hello == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "c1"}}
        r = client.post("/prompt", json={"prompt": fake_prompt(steps=3), "client_id": "c1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"prompt_id", "number", "node_errors"} and body["node_errors"] == {}
        pid = body["prompt_id"]
        events = []
        while True:
            m = ws.receive_json()
            events.append(m)
            if m["type"] == "executing" and m["data"]["node"] is None:
                break
    kinds = [m["type"] for m in events if m["type"] not in ("status", "progress_state")]
    assert kinds == ["execution_start", "execution_cached", "executing", "executing", "progress", "progress",
                     "progress", "executing", "executed", "execution_success", "executing"]
    # progress_state (the new web UI's node highlight): start after "executing", update before "progress",
    # every node finished before "execution_success"
    states = [(i, m["data"]) for i, m in enumerate(events) if m["type"] == "progress_state"]
    assert all(d["prompt_id"] == pid for _, d in states)
    first_exec = next(i for i, m in enumerate(events) if m["type"] == "executing")
    assert states[0][0] == first_exec + 1 and states[0][1]["nodes"]["1"]["state"] == "running"
    last_progress = max(i for i, m in enumerate(events) if m["type"] == "progress")
    node2 = events[last_progress - 1]["data"]["nodes"]["2"]
    assert events[last_progress - 1]["type"] == "progress_state" and (node2["value"], node2["max"]) == (3, 3)
    assert set(node2) == {"value", "max", "state", "node_id", "prompt_id", "display_node_id", "parent_node_id",
                          "real_node_id"}
    success = next(i for i, m in enumerate(events) if m["type"] == "execution_success")
    final = [d for i, d in states if i < success][-1]["nodes"]
    assert {k: v["state"] for k, v in final.items()} == {"1": "finished", "2": "finished", "3": "finished"}
    progress = [m["data"] for m in events if m["type"] == "progress"]
    assert progress[-1] == {"value": 3, "max": 3, "prompt_id": pid, "node": "2"}
    executed = next(m["data"] for m in events if m["type"] == "executed")
    assert executed["node"] == "3" and executed["display_node"] == "3" and executed["prompt_id"] == pid
    image = executed["output"]["images"][0]
    assert set(image) == {"filename", "subfolder", "type"} and image["type"] == "output"
    assert any(m["type"] == "status" for m in events)  # queue changes are broadcast

    entry = run_to_end(client, pid)
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [m[0] for m in entry["status"]["messages"]] == ["execution_start", "execution_cached",
                                                          "execution_success"]
    assert entry["prompt"][1] == pid and len(entry["prompt"]) == 5 and entry["prompt"][4] == ["3"]
    assert entry["prompt"][3]["client_id"] == "c1"
    assert entry["outputs"]["3"]["images"][0] == image
    r = client.get("/view", params={"filename": image["filename"], "subfolder": "", "type": "output"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert json.loads(Image.open(io.BytesIO(r.content)).info["prompt"])["2"]["class_type"] == "FakeSampler"
    assert pid in client.get("/api/history").json()
    assert client.get("/api/history?max_items=1").json().keys() == {pid}


def test_prompt_without_client_id_only_broadcasts_progress(client):
    """ComfyUI execution.py: without a client_id only progress (and interrupts) reach other sockets; the
    execution events of a script's prompt must not take over a web UI's progress display."""
    with client.websocket_connect("/ws?clientId=ui") as ws:
        ws.receive_json()
        pid = client.post("/prompt", json={"prompt": fake_prompt(steps=2, seed=11)}).json()["prompt_id"]
        kinds = []
        while True:
            m = ws.receive_json()
            kinds.append(m["type"])
            if m["type"] == "progress" and m["data"]["value"] == m["data"]["max"]:
                break
        run_to_end(client, pid)
    assert "progress" in kinds
    assert not {"execution_start", "execution_cached", "executing", "executed", "execution_success"} & set(kinds)


def test_cache_second_prompt_only_reruns_changed_nodes(client):
    a = client.post("/prompt", json={"prompt": fake_prompt(seed=1)}).json()["prompt_id"]
    run_to_end(client, a)
    b = client.post("/prompt", json={"prompt": fake_prompt(seed=2)}).json()["prompt_id"]
    entry = run_to_end(client, b)
    cached = dict(entry["status"]["messages"])["execution_cached"]["nodes"]
    assert cached == ["1"]


def test_queue_lists_one_running_prompt_of_a_batch(tmp_path, monkeypatch):
    """ComfyUI runs one prompt at a time and its clients rely on it (comfy-ui-client asserts at most one item in
    queue_running): of prompts taken as one batch (--max-batch), GET /queue lists the first as running and the
    others first among the pending; /jobs has all of them in progress. Deleting one of those "pending" prompts
    stops it, as deleting keeps a pending prompt from running in ComfyUI."""
    import sd35fp8.server.queue as server_queue

    monkeypatch.setattr(server_queue, "batch_key", lambda prompt: "one key")  # every prompt batchable
    HOLD.clear()
    app = create_app(tmp_path / "models", executor=make_fake_executor(tmp_path), max_queue=5,
                     allow_hosts=TESTCLIENT_HOSTS, max_batch=3, batch_wait_ms=3000)
    with TestClient(app) as client:
        ids = [client.post("/prompt", json={"prompt": fake_prompt(seed=HOLD_SEED, steps=3 + k)}).json()["prompt_id"]
               for k in range(3)]  # held, and not served from each other's cache
        in_progress = lambda: [j["id"] for j in client.get("/jobs?status=in_progress").json()["jobs"]]  # noqa: E731
        wait_for(lambda: len(in_progress()) == 3)
        q = client.get("/queue").json()
        assert [i[1] for i in q["queue_running"]] == ids[:1] and [i[1] for i in q["queue_pending"]] == ids[1:]
        assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 3}}
        assert client.post("/queue", json={"delete": [ids[2]]}).status_code == 200
        HOLD.set()
        for pid in ids[:2]:
            assert run_to_end(client, pid)["status"]["status_str"] == "success"
        assert run_to_end(client, ids[2])["status"]["messages"][-1][0] == "execution_interrupted"
        assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}


def test_queue_numbers_front_and_delete(client):
    HOLD.clear()
    first = client.post("/prompt", json={"prompt": fake_prompt(seed=HOLD_SEED)}).json()
    wait_for(lambda: client.get("/queue").json()["queue_running"])
    p1 = client.post("/prompt", json={"prompt": fake_prompt(seed=5)}).json()
    p2 = client.post("/api/prompt", json={"prompt": fake_prompt(seed=6), "front": 1}).json()  # truthy, as ComfyUI
    assert p1["number"] == first["number"] + 1 and p2["number"] == -(p1["number"] + 1)
    q = client.get("/api/queue").json()
    assert [i[1] for i in q["queue_running"]] == [first["prompt_id"]]
    assert [i[1] for i in q["queue_pending"]] == [p2["prompt_id"], p1["prompt_id"]]
    assert client.get("/prompt").json() == {"exec_info": {"queue_remaining": 3}}
    jobs = client.get("/api/jobs?status=in_progress,pending").json()
    assert {j["status"] for j in jobs["jobs"]} == {"in_progress", "pending"} and jobs["pagination"]["total"] == 3
    assert client.post("/queue", json={"delete": [p1["prompt_id"]]}).status_code == 200
    assert [i[1] for i in client.get("/queue").json()["queue_pending"]] == [p2["prompt_id"]]
    client.post("/api/queue", json={"clear": True})
    assert client.get("/queue").json()["queue_pending"] == []
    HOLD.set()
    run_to_end(client, first["prompt_id"])
    client.post("/history", json={"delete": [first["prompt_id"]]})
    assert client.get(f"/history/{first['prompt_id']}").json() == {}
    client.post("/api/history", json={"clear": True})
    assert client.get("/history").json() == {}


def test_comfy_org_credentials_are_never_listed(client):
    """ComfyUI execution.SENSITIVE_EXTRA_DATA_KEYS: a comfy.org key or token in extra_data (comfykit sends its
    api key so) is taken out of the queue item: GET /queue, /api/jobs and /history never show it."""
    HOLD.clear()
    extra = {"api_key_comfy_org": "sk-secret-1", "auth_token_comfy_org": "token-secret-2", "extra_pnginfo": {"a": 1}}
    pid = client.post("/prompt", json={"prompt": fake_prompt(seed=HOLD_SEED), "extra_data": extra,
                                       "client_id": "c9"}).json()["prompt_id"]
    pending = client.post("/prompt", json={"prompt": fake_prompt(seed=8), "extra_data": extra}).json()["prompt_id"]
    wait_for(lambda: client.get("/queue").json()["queue_running"])
    for url in ("/queue", "/api/jobs", f"/api/jobs/{pid}", f"/api/jobs/{pending}"):
        text = client.get(url).text
        assert "secret" not in text and "comfy_org" not in text, url
    HOLD.set()
    for prompt_id in (pid, pending):
        extra_data = run_to_end(client, prompt_id)["prompt"][3]
        assert extra_data["extra_pnginfo"] == {"a": 1} and not {"api_key_comfy_org", "auth_token_comfy_org"} & set(
            extra_data)
    assert "secret" not in client.get("/history").text


def test_full_queue_then_good_prompt(client):
    HOLD.clear()
    running = client.post("/prompt", json={"prompt": fake_prompt(seed=HOLD_SEED)}).json()["prompt_id"]
    wait_for(lambda: client.get("/queue").json()["queue_running"])
    for s in range(3):
        assert client.post("/prompt", json={"prompt": fake_prompt(seed=10 + s)}).status_code == 200
    r = client.post("/prompt", json={"prompt": fake_prompt(seed=20)})
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "queue_full" and "3 prompts waiting" in r.json()["error"]["details"]
    assert r.headers["retry-after"] == "1"
    # a full queue answers before the body is read: a retrying flood is not validated again and again
    assert client.post("/prompt", content=b"not even json", headers={"Content-Type": "application/json"}
                       ).status_code == 429
    HOLD.set()
    run_to_end(client, running)
    wait_for(lambda: client.get("/prompt").json()["exec_info"]["queue_remaining"] == 0)
    ok = client.post("/prompt", json={"prompt": fake_prompt(seed=21)}).json()["prompt_id"]
    assert run_to_end(client, ok)["status"]["status_str"] == "success"


def test_reconnect_hears_the_executing_node(client):
    """ComfyUI: a client that reconnects while its prompt runs is told which node is executing."""
    with client.websocket_connect("/ws?clientId=r1") as ws:
        ws.receive_json()
        pid = client.post("/prompt", json={"prompt": fake_prompt(steps=5000, seed=31), "client_id": "r1"}).json()["prompt_id"]
        while ws.receive_json()["type"] != "progress":
            pass
    with client.websocket_connect("/ws?clientId=r1") as ws:
        assert ws.receive_json()["type"] == "status"
        assert ws.receive_json() == {"type": "executing", "data": {"node": "2", "display_node": "2", "prompt_id": pid}}
        client.post("/api/interrupt", json={"prompt_id": pid})
    run_to_end(client, pid)


def test_interrupt(client):
    with client.websocket_connect("/ws?clientId=i1") as ws:
        ws.receive_json()
        pid = client.post("/prompt", json={"prompt": fake_prompt(steps=5000), "client_id": "i1"}).json()["prompt_id"]
        while ws.receive_json()["type"] != "progress":
            pass
        assert client.post("/api/interrupt", json={"prompt_id": "not-running"}).status_code == 200
        # ComfyUI: a body that is not JSON is a global interrupt (it must still say it is JSON: a text/plain
        # POST is what a cross-site page can send without a preflight)
        assert client.post("/api/interrupt", content=b"not json", headers={"content-type": "application/json"}
                           ).status_code == 200
        kinds = []
        while not kinds or kinds[-1] != "executing":
            kinds.append(ws.receive_json()["type"])
        assert "execution_interrupted" in kinds
    entry = run_to_end(client, pid)
    assert entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    job = client.get(f"/api/jobs/{pid}").json()
    assert job["status"] == "cancelled"


# ---- bad input --------------------------------------------------------------------------------
def _bad(client, prompt) -> dict:
    r = client.post("/prompt", json={"prompt": prompt})
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"error", "node_errors"} and set(body["error"]) == {"type", "message", "details",
                                                                            "extra_info"}
    return body


def test_bad_prompts_then_good(client):
    r = client.post("/prompt", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json"
    assert client.post("/prompt", json={"nothing": 1}).json()["error"]["type"] == "no_prompt"
    # a lone surrogate escape (no UTF-8 text holds it; echoing it back in the error was a 500), as a key and a value
    for raw in (b'{"prompt": {"\\ud800": {"class_type": "SaveImage", "inputs": {}}}}',
                b'{"prompt": {"1": {"class_type": "SaveImage", "inputs": {"images": ["\\uDC00", 0]}}}}'):
        r = client.post("/prompt", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_json", r.text
    p = fake_prompt()  # an escaped surrogate pair is one character: fine
    p["3"]["inputs"]["filename_prefix"] = "\U0001F600"
    raw = json.dumps({"prompt": p}).encode()
    assert b"\\ud83d\\ude00" in raw and client.post("/prompt", content=raw).status_code == 200

    p = fake_prompt()
    p["4"] = {"class_type": "NoSuchNode", "inputs": {}}
    err = _bad(client, p)["error"]
    assert err["type"] == "missing_node_type" and err["extra_info"]["class_type"] == "NoSuchNode"

    p = fake_prompt()
    del p["2"]["inputs"]["steps"]
    body = _bad(client, p)
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    err = body["node_errors"]["2"]
    assert err["class_type"] == "FakeSampler" and err["dependent_outputs"] == ["3"]
    assert err["errors"][0]["type"] == "required_input_missing"

    p = fake_prompt()
    p["3"]["inputs"]["images"] = ["1", 0]  # MODEL into IMAGE
    assert _bad(client, p)["node_errors"]["3"]["errors"][0]["type"] == "return_type_mismatch"

    body = _bad(client, fake_prompt(ckpt="missing.safetensors"))
    e = body["node_errors"]["1"]["errors"][0]
    assert e["type"] == "value_not_in_list" and "missing.safetensors" in e["details"]

    assert client.get("/queue").json() == {"queue_running": [], "queue_pending": []}
    pid = client.post("/prompt", json={"prompt": fake_prompt()}).json()["prompt_id"]
    assert run_to_end(client, pid)["status"]["status_str"] == "success"


# ---- files ------------------------------------------------------------------------------------
def test_view_rejects_traversal(client, tmp_path):
    (tmp_path / "secret.txt").write_text("TOPSECRETDATA")
    (tmp_path / "output").mkdir(exist_ok=True)
    (tmp_path / "output" / "link").symlink_to(tmp_path)
    for params, status in [({"filename": "../secret.txt"}, 400), ({"filename": "/etc/passwd"}, 400),
                           ({"filename": "secret.txt", "subfolder": ".."}, 403),
                           ({"filename": "secret.txt", "subfolder": "/tmp"}, 403),
                           ({"filename": "secret.txt", "subfolder": "link"}, 403),
                           ({"filename": "secret.txt", "type": "models"}, 400),
                           ({"filename": "absent.png"}, 404)]:
        r = client.get("/api/view", params=params)
        assert r.status_code == status, (params, r.status_code)
        assert "TOPSECRETDATA" not in r.text


def test_upload_image(client, tmp_path):
    data = png_bytes()
    r = client.post("/upload/image", files={"image": ("a.png", data, "image/png")}, data={"subfolder": "sub"})
    assert r.json() == {"name": "a.png", "subfolder": "sub", "type": "input"}
    assert (tmp_path / "input" / "sub" / "a.png").read_bytes() == data
    same = client.post("/upload/image", files={"image": ("a.png", data, "image/png")}, data={"subfolder": "sub"})
    assert same.json()["name"] == "a.png"  # identical file reused
    other = client.post("/upload/image", files={"image": ("a.png", png_bytes(9), "image/png")},
                        data={"subfolder": "sub"})
    assert other.json()["name"] == "a (1).png"
    r = client.post("/api/upload/image", files={"image": ("a.png", png_bytes(9), "image/png")},
                    data={"subfolder": "sub", "overwrite": "true"})
    assert r.json()["name"] == "a.png"
    r = client.post("/upload/image", files={"image": ("a.png", png_bytes(10), "image/png")},
                    data={"subfolder": "sub", "overwrite": "True"})  # comfy-ui-client sends str(True)
    assert r.json()["name"] == "a (2).png"  # ComfyUI overwrites for exactly "true" or "1"
    assert client.get("/view", params={"filename": "a.png", "subfolder": "sub", "type": "input"}).status_code == 200
    # ComfyUI annotated names: the suffix picks the folder whatever `type` says
    assert client.get("/view", params={"filename": "a.png [input]", "subfolder": "sub"}).status_code == 200
    assert client.get("/view", params={"filename": "a.png [output]", "subfolder": "sub"}).status_code == 404

    bad = [({"image": ("../evil.png", data, "image/png")}, {}, 400),
           ({"image": ("x.png", data, "image/png")}, {"subfolder": "../../x"}, 403),
           ({"image": ("x.png", data, "image/png")}, {"type": "models"}, 400),
           ({"image": ("x.png", b"not an image", "image/png")}, {}, 400),
           ({"image": ("big.png", b"\0" * 50_000, "image/png")}, {}, 413),
           ({"file": ("x.png", data, "image/png")}, {}, 400)]
    for files, form, status in bad:
        r = client.post("/upload/image", files=files, data=form)
        assert r.status_code == status, (files["image" if "image" in files else "file"][0], r.text)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "x").exists()


def test_view_channels_and_preview(client, tmp_path):
    """ComfyUI view_image's conversions: the web UI's mask editor loads an image as &channel=rgb (its colour) and
    &channel=a (its alpha on black); &preview=webp|jpeg[;quality] (the Comfy.PreviewFormat setting) re-encodes it,
    as webp where jpeg cannot hold it (a channel with 'a', another format)."""
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (10, 20, 30, 128)).save(buf, format="PNG")
    assert client.post("/upload/image", files={"image": ("masked.png", buf.getvalue(), "image/png")}).status_code == 200

    def view(query: str) -> tuple[str, Image.Image]:
        r = client.get(f"/view?filename=masked.png&type=input{query}")
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff", r.text
        assert r.headers["content-disposition"].endswith('filename="masked.png"')
        img = Image.open(io.BytesIO(r.content))
        img.load()
        return r.headers["content-type"], img

    media, img = view("")
    assert media == "image/png" and img.mode == "RGBA" and img.getpixel((0, 0)) == (10, 20, 30, 128)
    media, img = view("&channel=rgb")
    assert media == "image/png" and img.mode == "RGB" and img.getpixel((0, 0)) == (10, 20, 30)
    media, img = view("&channel=a")
    assert media == "image/png" and img.mode == "RGBA" and img.getpixel((0, 0)) == (0, 0, 0, 128)
    media, img = view("&preview=jpeg;80")
    assert media == "image/jpeg" and img.format == "JPEG" and img.mode == "RGB"
    for query in ("&preview=webp", "&preview=jpeg&channel=a", "&preview=png"):
        media, img = view(query)
        assert media == "image/webp" and img.format == "WEBP" and img.mode == "RGBA", query
    assert view("&preview=webp&channel=rgb")[1].mode == "RGB"
    # a conversion decodes the image: not past the server's pixel cap for uploads (served as it is, it may be)
    small = create_app(tmp_path / "b" / "models", executor=make_fake_executor(tmp_path / "b"), max_upload_pixels=100,
                       allow_hosts=TESTCLIENT_HOSTS)
    (tmp_path / "b" / "input").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "b" / "input" / "big.png")
    with TestClient(small) as c:
        assert c.get("/view?filename=big.png&type=input&channel=rgb").status_code == 400
        assert c.get("/view?filename=big.png&type=input&preview=webp").status_code == 400
        assert c.get("/view?filename=big.png&type=input").status_code == 200


# ---- info routes ------------------------------------------------------------------------------
def test_info_routes(client):
    info = client.get("/object_info").json()
    assert set(info) == set(FAKE_CLASSES)
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["tiny.safetensors"]
    assert client.get("/api/object_info/FakeSampler").json()["FakeSampler"]["output"] == ["IMAGE"]
    assert client.get("/object_info/Nope").json() == {}
    stats = client.get("/api/system_stats").json()
    assert {"os", "python_version", "embedded_python", "pytorch_version", "ram_total", "ram_free"} <= set(
        stats["system"])
    assert set(stats["devices"][0]) == {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total",
                                        "torch_vram_free"}
    assert client.get("/embeddings").json() == [] and client.get("/api/extensions").json() == []
    assert client.post("/free", json={"unload_models": True}).status_code == 200
    assert client.get("/api/features").json()["max_upload_size"] == 20_000
    assert client.get("/api/users").json() == {"storage": "server", "migrated": True}
    assert client.get("/api/i18n").json() == {}
    assert client.get("/api/experiment/models/checkpoints").json() == [{"name": "tiny.safetensors",
                                                                       "pathIndex": 0}]
    assert client.post("/api/settings", json={"Comfy.X": 1}).status_code == 200
    assert client.get("/api/settings/Comfy.X").json() == 1
    assert client.post("/api/userdata/workflows%2Fa.json", content=b'{"nodes": []}').status_code == 200
    assert client.get("/api/userdata?dir=workflows&recurse=true&split=false&full_info=true").json()[0]["path"] \
        == "a.json"
    # ComfyUI's default listing is bare relative paths (comfyui-skill-cli reads it so); split=true adds the parts
    assert client.get("/api/userdata?dir=workflows").json() == ["a.json"]
    assert client.get("/api/userdata?dir=workflows&split=true").json() == [["a.json", "a.json"]]
    got = client.get("/api/userdata/workflows%2Fa.json")
    assert got.json() == {"nodes": []} and got.headers["content-type"] == "application/json"
    # ComfyUI getuserdata: a user file is an attachment, not sniffed; one a browser would run is sent as bytes
    assert got.headers["content-disposition"] == "attachment" and got.headers["x-content-type-options"] == "nosniff"
    for name in ("evil.html", "evil.svg", "evil.js"):
        assert client.post(f"/api/userdata/{name}", content=b"<script>alert(1)</script>").status_code == 200
        got = client.get(f"/api/userdata/{name}")
        assert got.headers["content-type"] == "application/octet-stream", name
        assert got.headers["content-disposition"] == "attachment", name
    assert client.post("/api/userdata/..%2F..%2Fescape.json", content=b"x").status_code == 400
    # names no filesystem takes are a 400, not a 500 (schemathesis found the NUL one)
    for bad in ("Wf%00%40", "x" * 300, "a%2F" * 2100):
        assert client.get(f"/api/userdata?dir={bad}").status_code == 400, bad
        assert client.get(f"/api/userdata/{bad}").status_code == 400, bad
    assert client.get("/").status_code == 200


def test_internal_routes(client, app):
    """ComfyUI's /internal routes (frontend only; not under /api): logs, log subscription over the
    socket, folder paths, and input/output/temp file lists newest first."""
    import logging
    import os

    folders = app.state.folders
    folders.output_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("old.png", "new.png", ".hidden")):
        (folders.output_dir / name).write_bytes(b"x")
        os.utime(folders.output_dir / name, (1_000_000 + i, 1_000_000 + i))
    assert client.get("/internal/files/output").json() == ["new.png", "old.png"]
    assert client.get("/internal/files/input").json() == []
    assert client.get("/internal/files/models").status_code == 400
    assert client.get("/api/internal/files/output").status_code in (404, 405)
    paths = client.get("/internal/folder_paths").json()
    assert paths["checkpoints"] == [str(p) for p in folders.folders("checkpoints")]

    log = logging.getLogger("sd35fp8.server.test")
    log.warning("before subscribing")
    raw = client.get("/internal/logs/raw").json()
    assert set(raw["size"]) == {"cols", "rows"}
    assert raw["entries"][-1]["m"].endswith("before subscribing\n") and "t" in raw["entries"][-1]
    assert client.get("/internal/logs").json().endswith("before subscribing\n")
    with client.websocket_connect("/ws?clientId=term") as ws:
        ws.receive_json()  # status hello
        assert client.patch("/internal/logs/subscribe", json={"clientId": "term", "enabled": True}).status_code == 200
        log.warning("to the terminal")
        m = ws.receive_json()
        assert m["type"] == "logs" and m["data"]["entries"][0]["m"].endswith("to the terminal\n")
        assert client.patch("/internal/logs/subscribe", json={"clientId": "term", "enabled": False}).status_code == 200
    assert client.patch("/internal/logs/subscribe", content=b"nope", headers={"content-type": "application/json"}
                        ).status_code == 400
    assert not app.state.logs.subscriptions


# ---- security ---------------------------------------------------------------------------------
def test_auth_token(tmp_path):
    app = create_app(tmp_path / "models", executor=make_fake_executor(tmp_path), auth_token="s3cret",
                     allow_hosts=TESTCLIENT_HOSTS)
    with TestClient(app) as c:
        assert c.get("/queue").status_code == 401
        assert c.get("/queue", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/queue", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(WebSocketDisconnect):
            with c.websocket_connect("/ws?clientId=x") as ws:
                ws.receive_json()
        with c.websocket_connect("/ws?clientId=x&token=s3cret") as ws:
            assert ws.receive_json()["type"] == "status"
        r = c.get("/?token=s3cret")
        assert r.status_code == 200 and "sd35fp8_token" in r.headers["set-cookie"]
        assert c.get("/queue").status_code == 200  # the cookie the browser got
    with TestClient(create_app(tmp_path / "models", executor=make_fake_executor(tmp_path),
                               allow_hosts=TESTCLIENT_HOSTS)) as c:
        assert c.get("/queue", headers={"Origin": "http://evil.example"}).status_code == 403
        assert c.get("/queue", headers={"Origin": "http://testserver"}).status_code == 200


def test_listen_policy():
    check_listen("127.0.0.1", None, False)
    check_listen("::1", None, False)
    check_listen("0.0.0.0", "tok", False)
    check_listen("0.0.0.0", None, True)
    with pytest.raises(InputError, match="without authentication"):
        check_listen("0.0.0.0", None, False)


# ---- queue unit and batching seam -------------------------------------------------------------
def test_prompt_queue_order_and_limit():
    q = PromptQueue(max_queue=3)
    a, b, c = q.next_number(), q.next_number(), q.next_number(front=True)
    assert (a, b, c) == (0, 1, -2) and q.next_number(number="7") == 7.0
    for n, pid in ((a, "a"), (b, "b"), (c, "c")):
        q.put([n, pid, {}, {}, []])
    with pytest.raises(QueueFullError):
        q.put([9, "d", {}, {}, []])
    order = [q.get(timeout=0)[1][1] for _ in range(3)]
    assert order == ["c", "a", "b"] and q.get(timeout=0) is None


def test_batch_key_and_select():
    p1, p2, p3 = fake_prompt(seed=1), fake_prompt(seed=2), fake_prompt(steps=9)
    for p in (p1, p2, p3):
        p["4"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        p["2"]["class_type"] = "KSampler"
        p["2"]["inputs"].update(cfg=4.5, sampler_name="euler", scheduler="simple", denoise=1.0)
    assert batch_key(p1) == batch_key(p2) != batch_key(p3)
    assert batch_key(fake_prompt()) is None
    items = [[i, f"p{i}", p, {}, ["3"]] for i, p in enumerate((p1, p2, p3))]
    assert [i[1] for i in select_batch(items[0], items[1:], max_batch=4)] == ["p0", "p1"]
    assert select_batch(items[0], items[1:], max_batch=1) == [items[0]]


def test_encode_preview():
    assert encode_preview(b"abc", "PNG") == b"\0\0\0\1\0\0\0\2abc"
    assert encode_preview(b"abc")[:8] == b"\0\0\0\1\0\0\0\1"


def test_private_events_reach_only_their_subscriber():
    """The OpenAI stream's partial images (ws.PRIVATE_EVENTS) go to the route that subscribed to the prompt, never
    to a socket; the hub holds a subscription weakly, so one dropped unread frees what piled up in it."""
    import asyncio
    import gc

    from sd35fp8.server.ws import WebSocketHub

    async def main() -> tuple[int, int, int]:
        hub = WebSocketHub()
        q = hub.subscribe("p")
        hub.send("partial_image", {"prompt_id": "p", "index": 0, "image": b"x"})
        hub.send("partial_image", {"prompt_id": "other", "index": 0, "image": b"y"})
        await asyncio.sleep(0)
        got = q.qsize()
        hub.unsubscribe("p")
        hub.send("partial_image", {"prompt_id": "p", "index": 1, "image": b"x"})
        await asyncio.sleep(0)
        after = q.qsize()
        q2 = hub.subscribe("dropped")
        del q2
        gc.collect()
        return got, after, len(hub._subscribers)

    assert asyncio.run(main()) == (1, 1, 0)
