"""`serve()`: run the ComfyUI-compatible app under uvicorn; `stop_app()`: stop its worker.

Ctrl-C: uvicorn stops accepting; the running prompt finishes; pending prompt ids are printed.
"""

from __future__ import annotations

import os
from typing import Any

from sd35fp8.server.app import create_app
from sd35fp8.server.security import check_listen, is_loopback


def serve(listen: str = "127.0.0.1", port: int = 8188, models_dir: str | os.PathLike = "models",
          output_dir: str | os.PathLike | None = None, auth_token: str | None = None, insecure: bool = False,
          **app_options: Any) -> list[str]:
    """Run the ComfyUI-compatible server until Ctrl-C. Returns the prompt ids left pending.

    app_options go to `create_app` (input_dir, temp_dir, device, max_queue, max_upload_bytes, ...).
    """
    import uvicorn

    auth_token = auth_token or os.environ.get("SD35FP8_AUTH_TOKEN") or None
    check_listen(listen, auth_token, insecure)
    app = create_app(models_dir, output_dir, auth_token=auth_token, loopback=is_loopback(listen), **app_options)
    config = uvicorn.Config(app, host=listen, port=port, log_level="info", ws_max_size=16 * 1024 * 1024,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    shown = f"[{listen}]" if ":" in listen else listen
    print(f"sd35fp8 ComfyUI server: http://{shown}:{port}/" + ("  (auth token required)" if auth_token else ""))
    try:
        server.run()  # uvicorn stops accepting on Ctrl-C, then re-raises the KeyboardInterrupt
    except KeyboardInterrupt:
        print("Ctrl-C: the server stopped accepting requests")
    return stop_app(app)


def stop_app(app: Any, timeout: float | None = None) -> list[str]:
    """Stop the app's worker: the running prompt finishes; print and return the pending ids."""
    state = app.state
    running = state.queue.running_ids()
    if running:
        print(f"waiting for the running prompt to finish: {', '.join(running)} (Ctrl-C again to interrupt)")
    try:
        pending = state.worker.stop(timeout)
    except KeyboardInterrupt:
        state.worker.interrupt()
        pending = state.worker.stop(timeout)
    if pending:
        print(f"{len(pending)} prompt(s) were still pending and did not run: {', '.join(pending)}")
    return pending
