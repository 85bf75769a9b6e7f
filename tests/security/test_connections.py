"""Connection hygiene (issue 27 item 6, serve()'s uvicorn settings): a client that never finishes its
request headers is dropped after the header deadline, however slowly it trickles bytes; a normal
keep-alive client is not."""

from __future__ import annotations

import socket
import time

import requests

from conftest import Live, build_app


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
