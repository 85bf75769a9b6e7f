"""`serve()`: run the ComfyUI-compatible app under uvicorn; `stop_app()`: stop its worker.

Stopping (SIGTERM or SIGINT / Ctrl-C), graceful:
    1st signal  POST /prompt answers 503 + Retry-After and /ready 503; the worker takes no new prompt;
                the running one may finish within `drain_seconds`; then uvicorn stops.
    2nd signal  stops at once.
Either way, what did not finish stays in the journal (`state_dir`, journal.py) and runs on the next
start (or is marked failed with on_restart="fail"); the log says which prompts were left.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from sd35fp8.server.app import create_app
from sd35fp8.server.connections import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S, DEFAULT_MAX_CONNECTIONS, \
    uvicorn_options
from sd35fp8.server.lifecycle import DEFAULT_DRAIN_SECONDS
from sd35fp8.server.security import check_listen, is_loopback
from sd35fp8.server.tokens import resolve_token

log = logging.getLogger(__name__)


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server whose first SIGTERM/SIGINT drains the prompt worker before exiting."""

        def __init__(self, config: Any, app: Any, drain_seconds: float):
            super().__init__(config)
            self.app, self.drain_seconds = app, drain_seconds
            self.signals: list[str] = []

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # signal handler: returns at once
            name = signal.Signals(sig).name
            self.signals.append(name)
            lifecycle = self.app.state.lifecycle
            if lifecycle.draining.is_set():
                log.warning("%s again: stopping now; unfinished prompts stay in the journal", name)
                self.should_exit = self.force_exit = True
                return
            running = self.app.state.queue.running_ids()
            log.warning("%s: draining: no new prompts (503); waiting up to %.0f s for the running prompt(s)%s "
                        "(%s again stops at once)", name, self.drain_seconds,
                        f" {', '.join(running)}" if running else "", name)
            lifecycle.begin_drain()
            threading.Thread(target=self._drain, name="sd35fp8-drain", daemon=True).start()

        def _drain(self) -> None:
            lifecycle = self.app.state.lifecycle
            if not lifecycle.wait_idle(self.drain_seconds):
                log.warning("drain: the running prompt did not finish within %.0f s (--drain-seconds); "
                            "it stays in the journal and runs again on the next start", self.drain_seconds)
            self.should_exit = True

    return DrainingServer


def serve(listen: str = "127.0.0.1", port: int = 8188, models_dir: str | os.PathLike = "models",
          output_dir: str | os.PathLike | None = None, auth_token: str | None = None, insecure: bool = False,
          auth_token_file: str | os.PathLike | None = None, header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
          keep_alive: int = DEFAULT_KEEP_ALIVE_S, max_connections: int = DEFAULT_MAX_CONNECTIONS,
          scale: dict | None = None, drain_seconds: float = DEFAULT_DRAIN_SECONDS,
          **app_options: Any) -> list[str]:
    """Run the ComfyUI-compatible server until SIGTERM / Ctrl-C. Returns the prompt ids left unfinished.

    The token comes from auth_token, else auth_token_file, else $SD35FP8_AUTH_TOKEN (tokens.resolve_token).
    header_timeout / keep_alive / max_connections: connections.uvicorn_options.
    drain_seconds: see the module docstring.
    app_options go to `create_app` (input_dir, temp_dir, device, max_queue, max_upload_bytes, limits,
    allow_hosts, cors_origin, state_dir, on_restart, warmup, hang_seconds, ...).
    scale: run the prompts on Ray Serve replicas (scale.options.scale_options: create_ray_app's keywords).
    """
    import uvicorn

    auth_token = resolve_token(auth_token, auth_token_file)
    check_listen(listen, auth_token, insecure)
    if scale:
        from sd35fp8.scale.ray_serve import create_ray_app

        app = create_ray_app(models_dir, output_dir, auth_token=auth_token, loopback=is_loopback(listen),
                             **scale, **app_options)
    else:
        app = create_app(models_dir, output_dir, auth_token=auth_token, loopback=is_loopback(listen), **app_options)
    config = uvicorn.Config(app, host=listen, port=port, log_level="info", ws_max_size=16 * 1024 * 1024,
                            timeout_graceful_shutdown=5,
                            **uvicorn_options(header_timeout, keep_alive, max_connections))
    server = _draining_server_class()(config, app, drain_seconds)
    shown = f"[{listen}]" if ":" in listen else listen
    print(f"sd35fp8 ComfyUI server: http://{shown}:{port}/" + ("  (auth token required)" if auth_token else ""))
    try:
        server.run()
    except KeyboardInterrupt:  # a Ctrl-C before the signal handlers were installed
        server.signals.append("SIGINT")
    pending = stop_app(app, timeout=0 if server.signals else None)
    if scale and not scale.get("attach"):
        from sd35fp8.scale.ray_serve import shutdown

        shutdown(scale.get("app_name", "sd35fp8"))
    return pending


def stop_app(app: Any, timeout: float | None = None) -> list[str]:
    """Stop the app's worker and close its journal; log and return the prompt ids left unfinished.

    timeout: how long to wait for a running prompt (None = until it finishes). A prompt still
    running after that is abandoned: with a journal it runs again on the next start.
    """
    state = app.state
    state.lifecycle.stop()
    running = state.queue.running_ids()
    if running and timeout != 0:
        log.info("waiting for the running prompt to finish: %s", ", ".join(running))
    pending = state.worker.stop(timeout)
    running = state.queue.running_ids()
    if running:
        state.worker.abandon()  # its late result must not reach a closed journal
    left = running + pending
    journal = getattr(state, "journal", None)
    if left:
        if journal is not None:
            log.warning("%d prompt(s) left in the journal %s, to run on the next start: %s", len(left),
                        journal.path, ", ".join(left))
        else:
            log.warning("%d prompt(s) did not run (no --state-dir: they are lost): %s", len(left), ", ".join(left))
    if journal is not None:
        journal.close()
    return left
