"""Server hardening (issue 22) with the fake executor of test_server: durable queue + restart, drain on
SIGTERM, /health /ready /metrics, a dead or hung worker, faults inside a job (CUDA OOM, unwritable or
full output folder, a model file that changed or vanished).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from fastapi.testclient import TestClient

from live_server import free_port
from sd35fp8.server import create_app, stop_app
from sd35fp8.server.journal import JOURNAL_NAME
from sd35fp8.workflow import PromptExecutor
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, Node
from test_server import FAKE_CLASSES, HOLD, HOLD_SEED, TESTCLIENT_HOSTS, fake_prompt, make_fake_executor, run_to_end, \
    wait_for

ROOT = Path(__file__).resolve().parent.parent


def make_app(*args, **kwargs):
    return create_app(*args, allow_hosts=TESTCLIENT_HOSTS, **kwargs)


def post(c, prompt: dict, **extra) -> str:
    r = c.post("/prompt", json={"prompt": prompt, **extra})
    assert r.status_code == 200, r.text
    return r.json()["prompt_id"]


def journal_states(state_dir: Path) -> dict[str, str]:
    with sqlite3.connect(state_dir / JOURNAL_NAME) as db:
        return dict(db.execute("SELECT prompt_id, state FROM prompts").fetchall())


def error_message(entry: dict) -> str:
    (data,) = [d for e, d in entry["status"]["messages"] if e == "execution_error"]
    return data["exception_message"]


@pytest.fixture(autouse=True)
def _release_hold():
    HOLD.clear()
    yield
    HOLD.set()


# ---- durable queue ------------------------------------------------------------------------------
CLIENT = "lifecycle-client"


def _stopped_with_work(tmp_path: Path) -> list[str]:
    """A server with one running (held) and two pending prompts stops; returns their ids, oldest first."""
    app = make_app(tmp_path / "models", executor=make_fake_executor(tmp_path), state_dir=tmp_path / "state")
    with TestClient(app) as c:
        ids = [post(c, fake_prompt(seed=HOLD_SEED), client_id=CLIENT), post(c, fake_prompt(seed=2), client_id=CLIENT),
               post(c, fake_prompt(seed=3), client_id=CLIENT)]
        wait_for(lambda: c.get("/queue").json()["queue_running"])
        done = post(c, fake_prompt(seed=4), front=False)  # a 4th, deleted by the client: not re-run later
        assert c.post("/queue", json={"delete": [done]}).status_code == 200
        states = journal_states(tmp_path / "state")
        assert states == {ids[0]: "running", ids[1]: "pending", ids[2]: "pending"}, states
    stop_app(app, timeout=0.2)  # the held prompt is still running: left journaled, as after kill -9
    return ids


def test_restart_requeues_pending_and_running(tmp_path):
    ids = _stopped_with_work(tmp_path)
    app = make_app(tmp_path / "models", executor=make_fake_executor(tmp_path), state_dir=tmp_path / "state")
    with TestClient(app) as c:
        running, pending = (c.get("/queue").json()[k] for k in ("queue_running", "queue_pending"))
        assert [i[1] for i in running + pending] == ids  # same order: the interrupted one first
        HOLD.set()
        for pid in ids:
            assert run_to_end(c, pid)["status"]["status_str"] == "success"
        assert set(journal_states(tmp_path / "state").values()) == {"done"}
        new = post(c, fake_prompt(seed=9))
        run_to_end(c, new)
        assert c.get("/queue").json()["queue_pending"] == []
    stop_app(app)
    # history (with output file references) survives a restart too
    app = make_app(tmp_path / "models", executor=make_fake_executor(tmp_path), state_dir=tmp_path / "state")
    with TestClient(app) as c:
        history = c.get("/history").json()
        assert list(history) == ids + [new]
        img = history[ids[1]]["outputs"]["3"]["images"][0]
        assert c.get("/view", params=img).status_code == 200
    stop_app(app)


def test_restart_with_on_restart_fail_marks_failed(tmp_path):
    ids = _stopped_with_work(tmp_path)
    app = make_app(tmp_path / "models", executor=make_fake_executor(tmp_path), state_dir=tmp_path / "state",
                     on_restart="fail")
    with TestClient(app) as c:
        assert c.get("/queue").json() == {"queue_running": [], "queue_pending": []}
        history = c.get("/history").json()
        assert list(history) == ids
        for pid in ids:
            status = history[pid]["status"]
            assert status["status_str"] == "error" and not status["completed"]
            assert "--on-restart fail" in error_message(history[pid])
        assert "was running" in error_message(history[ids[0]])
        assert "was pending" in error_message(history[ids[1]])
        jobs = {j["id"]: j["status"] for j in c.get("/jobs").json()["jobs"]}
        assert all(jobs[pid] == "failed" for pid in ids)
        metrics = c.get("/metrics").text
        assert 'sd35fp8_prompts_total{outcome="failed_restart"} 3.0' in metrics
        # the client's WebSocket hears each failure too, on its first connection after the restart (once)
        for expect in (ids, []):
            with c.websocket_connect(f"/ws?clientId={CLIENT}") as ws:
                assert ws.receive_json()["type"] == "status"
                heard = [ws.receive_json() for _ in expect]
                assert [m["type"] for m in heard] == ["execution_error"] * len(expect)
                assert [m["data"]["prompt_id"] for m in heard] == expect
                assert all("--on-restart fail" in m["data"]["exception_message"] for m in heard)
                new = post(c, fake_prompt(seed=11 + len(expect)), client_id=CLIENT)
                after = []
                while not after or after[-1] != ("execution_success", new):  # up to the new prompt's end
                    m = ws.receive_json()
                    after.append((m["type"], m["data"].get("prompt_id")))
                assert not [m for m in after if m[0] == "execution_error"]  # nothing else was waiting
    stop_app(app)


def test_bad_on_restart_value(tmp_path):
    with pytest.raises(ValueError, match="on_restart"):
        make_app(tmp_path / "models", executor=make_fake_executor(tmp_path), state_dir=tmp_path, on_restart="x")


# ---- health, readiness, metrics --------------------------------------------------------------------
def test_health_ready_metrics_and_warmup(tmp_path):
    gate = threading.Event()
    app = make_app(tmp_path / "models", executor=make_fake_executor(tmp_path), warmup=gate.wait)
    with TestClient(app) as c:
        assert c.get("/health").json() == {"status": "ok"}
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["checks"]["warmed_up"] is False
        pid = post(c, fake_prompt(seed=5))  # accepted while warming up, runs after it
        time.sleep(0.3)
        assert c.get(f"/history/{pid}").json() == {}
        gate.set()
        wait_for(lambda: c.get("/ready").status_code == 200)
        run_to_end(c, pid)
        text = c.get("/metrics").text
        for name in ("sd35fp8_queue_pending 0.0", "sd35fp8_queue_running 0.0", "sd35fp8_ready 1.0",
                     'sd35fp8_prompts_total{outcome="success"} 1.0', "sd35fp8_image_seconds_count 1.0",
                     "sd35fp8_step_seconds_count 3.0", "sd35fp8_batch_size_count 1.0",
                     "sd35fp8_process_resident_bytes"):
            assert name in text, name
        assert c.get("/api/metrics").status_code == 200


class DyingExecutor(PromptExecutor):
    """execute raises outside the node error boundary on seed 13: the worker thread dies."""

    def execute(self, prompt, prompt_id="", *args, **kwargs):
        if prompt["2"]["inputs"]["seed"] == 13:
            raise SystemExit("simulated worker death")
        return super().execute(prompt, prompt_id, *args, **kwargs)


def test_dead_worker_is_restarted(tmp_path):
    base = make_fake_executor(tmp_path)
    ex = DyingExecutor(base.folders, device="cpu", classes=FAKE_CLASSES)
    app = make_app(tmp_path / "models", executor=ex, check_seconds=0.05)
    with TestClient(app) as c:
        wait_for(lambda: c.get("/ready").status_code == 200)
        dead = post(c, fake_prompt(seed=13))
        entry = run_to_end(c, dead)
        assert entry["status"]["status_str"] == "error" and "worker died" in error_message(entry)
        ok = post(c, fake_prompt(seed=14))
        assert run_to_end(c, ok)["status"]["status_str"] == "success"
        assert c.get("/ready").json()["checks"]["worker_restarts"] == 1
        assert "sd35fp8_worker_restarts_total 1.0" in c.get("/metrics").text


def test_hung_worker_turns_ready_false_and_is_restarted(tmp_path):
    app = make_app(tmp_path / "models", executor=make_fake_executor(tmp_path), hang_seconds=0.6,
                     check_seconds=0.05)
    with TestClient(app) as c:
        wait_for(lambda: c.get("/ready").status_code == 200)
        hung = post(c, fake_prompt(seed=HOLD_SEED))  # the fake sampler waits on HOLD without progress
        wait_for(lambda: c.get("/ready").status_code == 503 or c.get(f"/history/{hung}").json(), timeout=10)
        entry = run_to_end(c, hung)
        assert entry["status"]["status_str"] == "error" and "hung" in error_message(entry)
        wait_for(lambda: c.get("/ready").status_code == 200)
        ok = post(c, fake_prompt(seed=21))
        assert run_to_end(c, ok)["status"]["status_str"] == "success"


# ---- graceful stop ------------------------------------------------------------------------------
def _start_fake_server(tmp_path: Path, port: int, drain: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_serve.py"), str(tmp_path), str(port),
                             str(drain)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_drains_then_restart_runs_the_rest(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_fake_server(tmp_path, port, drain=30)
    try:
        wait_for(lambda: _ok(f"{url}/ready"), timeout=60)
        slow = fake_prompt(seed=1, steps=500)  # ~5 s each: the fake sampler sleeps 10 ms a step past 50
        ids = [requests.post(f"{url}/prompt", json={"prompt": {**slow, "2": {**slow["2"], "inputs": {
            **slow["2"]["inputs"], "seed": s}}}}, timeout=10).json()["prompt_id"] for s in (1, 2, 3)]
        wait_for(lambda: requests.get(f"{url}/queue", timeout=5).json()["queue_running"], timeout=30)
        proc.send_signal(signal.SIGTERM)
        (r,) = wait_for(lambda: _draining(url), timeout=10)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0
        assert requests.get(f"{url}/ready", timeout=5).status_code == 503
        out, _ = proc.communicate(timeout=60)
    except (AssertionError, requests.RequestException):
        proc.kill()
        print(proc.communicate()[0])
        raise
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    states = journal_states(tmp_path / "state")
    assert states[ids[0]] == "done" and [states[i] for i in ids[1:]] == ["pending", "pending"], (states, out)
    assert "2 prompt(s) left in the journal" in out and ids[1] in out, out
    # the next start runs what was left
    proc = _start_fake_server(tmp_path, port, drain=30)
    try:
        wait_for(lambda: _ok(f"{url}/ready"), timeout=60)
        hist = wait_for(lambda: len(h := requests.get(f"{url}/history", timeout=5).json()) == 3 and h, timeout=60)
        assert all(hist[i]["status"]["status_str"] == "success" for i in ids)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def _draining(url: str):
    r = requests.post(f"{url}/prompt", json={"prompt": fake_prompt(seed=50)}, timeout=5)
    return (r,) if r.status_code == 503 else None  # a tuple: a 503 Response is falsy


# ---- faults inside a job --------------------------------------------------------------------------
class OOMSampler(Node):
    """A sampler that allocates, then runs out of CUDA memory (as torch reports it)."""

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "sample"
    held: list = []

    @classmethod
    def INPUT_TYPES(cls, folders):
        return FAKE_CLASSES["FakeSampler"].INPUT_TYPES(folders)

    def sample(self, model, seed, steps, width):
        if seed == 66:
            OOMSampler.held.append(torch.empty(1 << 20))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return FAKE_CLASSES["FakeSampler"].sample(self, model, seed, steps, width)


def test_cuda_oom_is_a_clear_execution_error_and_the_next_prompt_runs(tmp_path):
    ex = make_fake_executor(tmp_path)
    ex.classes["FakeSampler"] = OOMSampler
    app = make_app(tmp_path / "models", executor=ex)
    with TestClient(app) as c, c.websocket_connect("/ws?clientId=oom") as ws:
        pid = post(c, fake_prompt(seed=66), client_id="oom")
        entry = run_to_end(c, pid)
        msg = error_message(entry)
        assert entry["status"]["status_str"] == "error"
        assert "out of memory" in msg and "--offload model" in msg and "smaller" in msg, msg
        events = []
        while not any(e["type"] == "execution_error" for e in events):
            events.append(ws.receive_json())
        assert "--offload model" in events[-1]["data"]["exception_message"]
        assert run_to_end(c, post(c, fake_prompt(seed=67)))["status"]["status_str"] == "success"


def test_unwritable_output_folder_fails_clearly(tmp_path):
    ex = make_fake_executor(tmp_path)
    app = make_app(tmp_path / "models", executor=ex)
    ex.folders.output_dir.rmdir() if ex.folders.output_dir.exists() else None
    ex.folders.output_dir.write_text("a file where the output folder should be")
    with TestClient(app) as c:
        entry = run_to_end(c, post(c, fake_prompt(seed=70)))
        msg = error_message(entry)
        assert entry["status"]["status_str"] == "error"
        assert str(ex.folders.output_dir) in msg and "output folder" in msg, msg


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
    from PIL import Image

    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        if hasattr(fp, "write"):  # some bytes reach the disk, then it is full
            fp.write(b"\x89PNG partial")
            fp.flush()
        else:
            Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    ex = make_fake_executor(tmp_path)
    app = make_app(tmp_path / "models", executor=ex)
    with TestClient(app) as c:
        monkeypatch.setattr(Image.Image, "save", full_disk)
        entry = run_to_end(c, post(c, fake_prompt(seed=71)))
        monkeypatch.setattr(Image.Image, "save", real_save)
        msg = error_message(entry)
        assert "No space left" in msg and str(ex.folders.output_dir) in msg, msg
        assert list(ex.folders.output_dir.rglob("*")) == []
        assert run_to_end(c, post(c, fake_prompt(seed=72)))["status"]["status_str"] == "success"


def test_model_file_changed_is_reloaded_and_vanished_is_reported(tmp_path):
    loads = []

    class CountingLoader(NODE_CLASS_MAPPINGS["CheckpointLoaderSimple"]):  # the real IS_CHANGED, no real load
        def load_checkpoint(self, ckpt_name):
            loads.append(self.ctx.folders.get_full_path_or_raise("checkpoints", ckpt_name))
            return ({"name": ckpt_name}, None, None)

    ex = make_fake_executor(tmp_path)
    ex.classes["CheckpointLoaderSimple"] = CountingLoader
    ckpt = tmp_path / "models" / "checkpoints" / "tiny.safetensors"
    app = make_app(tmp_path / "models", executor=ex)
    with TestClient(app) as c:
        run_to_end(c, post(c, fake_prompt(seed=80)))
        run_to_end(c, post(c, fake_prompt(seed=81)))
        assert len(loads) == 1  # cached
        ckpt.write_bytes(b"\1" * 16)  # replaced on disk
        run_to_end(c, post(c, fake_prompt(seed=82)))
        assert len(loads) == 2  # reloaded
        blocker = post(c, fake_prompt(seed=HOLD_SEED))  # keeps the worker busy while the file goes
        pid = post(c, fake_prompt(seed=83))
        ckpt.unlink()  # vanishes after the prompt was accepted, before it runs
        HOLD.set()
        run_to_end(c, blocker)
        entry = run_to_end(c, pid)
        assert entry["status"]["status_str"] == "error" and "tiny.safetensors" in error_message(entry)
        assert json.dumps(entry)  # a readable history entry, no crash


def test_worker_stop_races_start(tmp_path):
    """The app's lifespan may stop the worker while the warm-up thread starts it (a loaded machine):
    stop() never joins a thread that was not started, and no thread starts after stop()."""
    from sd35fp8.server.queue import PromptQueue
    from sd35fp8.server.worker import PromptWorker

    ex = make_fake_executor(tmp_path)
    for _ in range(200):
        w = PromptWorker(PromptQueue(), ex, lambda *a: None)
        t = threading.Thread(target=w.start)
        t.start()
        w.stop(timeout=5)  # RuntimeError("cannot join thread before it is started") before the fix
        t.join()
        assert not w.alive
    w = PromptWorker(PromptQueue(), ex, lambda *a: None)
    w.stop()
    w.start()
    w.restart("test")
    assert not w.alive and w._thread is None


def test_a_second_server_on_one_journal_is_refused(tmp_path):
    """Two servers whose --state-dir is the same folder (two output folders in one parent, by default) would show,
    run and re-queue each other's prompts: a journal whose owner is another live process on this host is refused,
    naming it; a stale owner (its process gone) is taken over."""
    import socket

    from sd35fp8.errors import InputError
    from sd35fp8.server.journal import OWNER_NAME, Journal

    state = tmp_path / "state"
    state.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (state / OWNER_NAME).write_text(f"{other.pid}@{socket.gethostname()}")
        with pytest.raises(InputError, match=f"in use by another running sd35fp8 server \\(pid {other.pid}\\)"):
            Journal(state)
    finally:
        other.kill()
        other.wait()
    Journal(state).close()  # its owner has exited: taken
    assert (state / OWNER_NAME).read_text().startswith(f"{os.getpid()}@")
