"""Connection hygiene (issue 27 item 6, serve()'s uvicorn settings): a client that never finishes its
request headers is dropped after the header deadline, however slowly it trickles bytes; a normal
keep-alive client is not."""

from __future__ import annotations

import socket
import time

import requests

from conftest import Live, build_app, fake_prompt


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_header_deadline(tmp_path):
    with Live(build_app(tmp_path, allow_hosts=()), header_timeout=0.5, keep_alive=5) as srv:
        idle = socket.create_connection(("127.0.0.1", srv.port))  # connects, sends nothing
        assert _closed_within(idle, 5)

        slow = socket.create_connection(("127.0.0.1", srv.port))  # slowloris: a byte at a time
        slow.sendall(b"GET /queue HTTP/1.1\r\n")
        closed = False
        for _ in range(40):
            time.sleep(0.1)
            try:
                slow.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed or _closed_within(slow, 2)

        with requests.Session() as s:  # keep-alive requests spaced beyond the header deadline still work
            for _ in range(2):
                assert s.get(f"{srv.url}/queue", timeout=5).status_code == 200
                time.sleep(0.8)


def _request(sock: socket.socket, host: str) -> bytes:
    """One keep-alive GET /queue on `sock`; the response head and body (Content-Length framed)."""
    sock.sendall(f"GET /queue HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return head


def test_keep_alive_timeout(tmp_path):
    """An idle keep-alive connection is closed after --keep-alive seconds, not before."""
    with Live(build_app(tmp_path, allow_hosts=()), header_timeout=30, keep_alive=1) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        assert _request(sock, srv.host).startswith(b"HTTP/1.1 200")
        t = time.monotonic()
        assert _closed_within(sock, 10)
        assert 0.5 < time.monotonic() - t < 5
    with Live(build_app(tmp_path, allow_hosts=()), header_timeout=30, keep_alive=5) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        assert _request(sock, srv.host).startswith(b"HTTP/1.1 200")
        assert not _closed_within(sock, 1.5)  # still open: the same connection serves another request
        sock.settimeout(10)
        assert _request(sock, srv.host).startswith(b"HTTP/1.1 200")
        sock.close()


def test_connection_cap(tmp_path):
    """With --max-connections N open connections (the asking one included) a request is answered 503
    (uvicorn limit_concurrency: connections >= N); once one closes, requests are served again."""
    with Live(build_app(tmp_path, allow_hosts=()), header_timeout=30, keep_alive=30, max_connections=3) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        for sock in held:
            assert _request(sock, srv.host).startswith(b"HTTP/1.1 200")
        extra = socket.create_connection(("127.0.0.1", srv.port))
        extra.settimeout(10)
        assert _request(extra, srv.host).startswith(b"HTTP/1.1 503")
        extra.close()
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as again:
                if _request(again, srv.host).startswith(b"HTTP/1.1 200"):
                    break
            assert time.monotonic() < deadline, "the freed connection slot was never reused"
            time.sleep(0.1)
        for sock in held:
            sock.close()


def test_serve_passes_the_connection_settings(tmp_path, monkeypatch):
    """serve() hands uvicorn the header deadline, keep-alive timeout and connection cap it was given."""
    import importlib

    import uvicorn

    from sd35fp8.server.connections import HeaderTimeoutH11Protocol

    serve_mod = importlib.import_module("sd35fp8.server.serve")
    seen = {}

    class FakeServer:
        def __init__(self, config, app, drain_seconds):
            seen["config"], self.signals = config, []

        def run(self):
            pass

    monkeypatch.setattr(serve_mod, "_draining_server_class", lambda: FakeServer)
    monkeypatch.setattr(serve_mod, "create_app", lambda *a, **kw: build_app(tmp_path, allow_hosts=()))
    monkeypatch.setattr(serve_mod, "stop_app", lambda app, timeout=None: [])
    assert serve_mod.serve(header_timeout=3.5, keep_alive=7, max_connections=11) == []
    config = seen["config"]
    assert isinstance(config, uvicorn.Config)
    assert config.timeout_keep_alive == 7 and config.limit_concurrency == 11
    assert issubclass(config.http, HeaderTimeoutH11Protocol) and config.http.header_timeout == 3.5


def test_websocket_outlives_the_header_deadline(tmp_path):
    """An upgraded connection is the WebSocket's: the header deadline no longer applies to it (it
    closed every /ws connection header_timeout seconds after it opened, and messages sent meanwhile
    were lost to the client)."""
    import json

    import websocket

    with Live(build_app(tmp_path, allow_hosts=()), header_timeout=0.5, keep_alive=5) as srv:
        ws = websocket.create_connection(f"ws://{srv.host}/ws?clientId=abc", timeout=5)
        try:
            assert json.loads(ws.recv())["type"] == "status"
            time.sleep(2.0)  # four header deadlines
            r = requests.post(f"{srv.url}/prompt", json={"prompt": fake_prompt(seed=5), "client_id": "abc"}, timeout=10)
            assert r.status_code == 200
            ws.settimeout(10)
            seen = set()
            while "execution_success" not in seen:  # still open, still delivering, to the end of the prompt
                msg = ws.recv()
                if isinstance(msg, str):
                    m = json.loads(msg)
                    if m["data"].get("prompt_id") in (None, r.json()["prompt_id"]):
                        seen.add(m["type"])
        finally:
            ws.close()
