"""Fixtures for the security suite: the real validator, routes and middleware over test_server's
fake executor (no model), through starlette's TestClient or a live uvicorn on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from sd35fp8.server import create_app, stop_app
from sd35fp8.server.connections import uvicorn_options
from sd35fp8.server.validation import Limits
from test_server import HOLD, fake_prompt, make_fake_executor  # noqa: F401 - re-exported to the tests

TESTCLIENT_HOST = "testserver"  # the Host header starlette's TestClient sends


def build_app(tmp_path, **options):
    options.setdefault("allow_hosts", (TESTCLIENT_HOST,))
    options.setdefault("max_upload_bytes", 200_000)
    options.setdefault("max_queue", 5)
    options.setdefault("serve_frontend", False)
    return create_app(tmp_path / "models", executor=make_fake_executor(tmp_path), **options)


@pytest.fixture()
def app(tmp_path):
    HOLD.clear()
    return build_app(tmp_path, limits=Limits(max_body_bytes=64_000, max_nodes=50, max_text_chars=500))


@pytest.fixture()
def client(app):
    with TestClient(app) as c:
        yield c
    HOLD.set()


def queued(c: TestClient) -> int:
    q = c.get("/queue").json()
    return len(q["queue_running"]) + len(q["queue_pending"]) + len(c.get("/history").json())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """The app under uvicorn on 127.0.0.1 with serve()'s connection settings (header deadline,
    keep-alive, connection cap); `log_level` info makes uvicorn write access lines."""

    def __init__(self, app, log_level: str = "warning", **conn):
        import uvicorn

        self.app, self.port = app, free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level=log_level, **uvicorn_options(**conn))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-security", daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        HOLD.set()
        self.server.should_exit = True
        self.thread.join(30)
        stop_app(self.app, timeout=30)
