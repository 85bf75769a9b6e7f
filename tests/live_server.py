"""An ASGI app served by uvicorn in a thread on 127.0.0.1 and a free port (tests and benchmarks).

    with LiveServer(create_app(...)) as srv:
        requests.get(f"{srv.url}/queue")
Leaving the block asks uvicorn to exit, joins its thread and stops the app's prompt worker.
"""

from __future__ import annotations

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app, timeout: float = 30.0):
        import uvicorn

        self.app, self.timeout, self.port = app, timeout, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        from sd35fp8.server import stop_app

        self.server.should_exit = True
        self.thread.join(self.timeout)
        stop_app(self.app, timeout=self.timeout)
