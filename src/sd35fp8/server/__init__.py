"""ComfyUI-compatible HTTP + WebSocket server (FastAPI + uvicorn) over the workflow executor.

    from sd35fp8.server import create_app, serve
    serve("127.0.0.1", 8188, models_dir="ComfyUI/models", output_dir="ComfyUI/output")
"""

from __future__ import annotations

from sd35fp8.server.app import create_app, system_info
from sd35fp8.server.batching import batch_key, select_batch
from sd35fp8.server.history import PromptHistory
from sd35fp8.server.queue import PromptQueue, QueueFullError
from sd35fp8.server.security import check_listen
from sd35fp8.server.serve import serve, stop_app
from sd35fp8.server.worker import PromptWorker
from sd35fp8.server.ws import WebSocketHub, encode_preview

__all__ = [
    "PromptHistory", "PromptQueue", "PromptWorker", "QueueFullError", "WebSocketHub", "batch_key", "check_listen", "create_app",
    "encode_preview", "select_batch", "serve", "stop_app", "system_info",
]
