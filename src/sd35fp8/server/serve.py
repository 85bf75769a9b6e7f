"""`serve()`: run the ComfyUI-compatible app under uvicorn; `stop_app()`: stop its worker.

Ctrl-C: uvicorn stops accepting; the running prompt finishes; pending prompt ids are printed.
"""

from __future__ import annotations

import os
from typing import Any

from sd35fp8.server.app import create_app
from sd35fp8.server.connections import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S, DEFAULT_MAX_CONNECTIONS, \
    uvicorn_options
from sd35fp8.server.security import check_listen, is_loopback
from sd35fp8.server.tokens import resolve_token


def serve(listen: str = "127.0.0.1", port: int = 8188, models_dir: str | os.PathLike = "models",
          output_dir: str | os.PathLike | None = None, auth_token: str | None = None, insecure: bool = False,
          auth_token_file: str | os.PathLike | None = None, header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
          keep_alive: int = DEFAULT_KEEP_ALIVE_S, max_connections: int = DEFAULT_MAX_CONNECTIONS,
          scale: dict | None = None, **app_options: Any) -> list[str]:
    """Run the ComfyUI-compatible server until Ctrl-C. Returns the prompt ids left pending.

    The token comes from auth_token, else auth_token_file, else $SD35FP8_AUTH_TOKEN (tokens.resolve_token).
    header_timeout / keep_alive / max_connections: connections.uvicorn_options.
    app_options go to `create_app` (input_dir, temp_dir, device, max_queue, max_upload_bytes, limits,
    allow_hosts, cors_origin, ...).
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
    server = uvicorn.Server(config)
    shown = f"[{listen}]" if ":" in listen else listen
    print(f"sd35fp8 ComfyUI server: http://{shown}:{port}/" + ("  (auth token required)" if auth_token else ""))
    try:
        server.run()  # uvicorn stops accepting on Ctrl-C, then re-raises the KeyboardInterrupt
    except KeyboardInterrupt:
        print("Ctrl-C: the server stopped accepting requests")
    pending = stop_app(app)
    if scale and not scale.get("attach"):
        from sd35fp8.scale.ray_serve import shutdown

        shutdown(scale.get("app_name", "sd35fp8"))
    return pending


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
