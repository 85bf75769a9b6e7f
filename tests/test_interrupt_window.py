"""An interrupt sent right after a prompt is taken stops it, even while it still waits in the batch
window (marked running, not yet executing): the server sends interrupts by prompt id and the executor
keeps the requests naming the prompts it starts (executor._start_interrupts); a request aimed at a
prompt that already finished does not stop the next one."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

import sd35fp8.server.queue as server_queue
from sd35fp8.server import create_app
from test_server import TESTCLIENT_HOSTS, fake_prompt, make_fake_executor, run_to_end, wait_for


def test_executor_keeps_an_interrupt_for_the_prompt_it_starts(tmp_path):
    ex = make_fake_executor(tmp_path)
    ex.interrupt("p1")  # came before p1 started executing
    assert ex.execute(fake_prompt(steps=3), "p1").interrupted
    ex.interrupt("gone")  # aimed at a prompt that finished before it was seen
    r = ex.execute(fake_prompt(steps=3), "p2")
    assert r.success and not r.interrupted


def test_interrupt_in_the_batch_window_stops_the_prompt(tmp_path, monkeypatch):
    monkeypatch.setattr(server_queue, "batch_key", lambda prompt: "one key")  # every prompt batchable: a window
    app = create_app(tmp_path / "models", executor=make_fake_executor(tmp_path), max_queue=3,
                     max_upload_bytes=20_000, allow_hosts=TESTCLIENT_HOSTS, max_batch=4, batch_wait_ms=1500)
    with TestClient(app) as client:
        pid = client.post("/prompt", json={"prompt": fake_prompt(steps=3)}).json()["prompt_id"]
        wait_for(lambda: client.get("/queue").json()["queue_running"])  # taken, waiting for company
        t0 = time.monotonic()
        assert client.post("/api/interrupt", json={"prompt_id": pid}).status_code == 200
        assert time.monotonic() - t0 < 1.0  # still inside the 1.5 s window
        entry = run_to_end(client, pid)
        assert entry["status"]["messages"][-1][0] == "execution_interrupted"
        assert entry["status"]["completed"] is False
        # a global interrupt (no prompt_id) sent in the window stops it too; the next prompt is not hit
        pid2 = client.post("/prompt", json={"prompt": fake_prompt(seed=2, steps=3)}).json()["prompt_id"]
        wait_for(lambda: client.get("/queue").json()["queue_running"])
        client.post("/api/interrupt", json={})
        assert run_to_end(client, pid2)["status"]["messages"][-1][0] == "execution_interrupted"
        pid3 = client.post("/prompt", json={"prompt": fake_prompt(seed=3, steps=3)}).json()["prompt_id"]
        assert run_to_end(client, pid3)["status"]["status_str"] == "success"
