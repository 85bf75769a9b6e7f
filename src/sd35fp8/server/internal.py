"""ComfyUI's /internal routes (api_server/routes/internal/internal_routes.py): what the frontend's
terminal panel, model library and asset lists read. Like ComfyUI, they live under /internal only
(not /api/internal).

    GET   /internal/logs                    every buffered log line as one JSON string ("t - m" each)
    GET   /internal/logs/raw                {"entries": [{"t", "m"}], "size": {"cols", "rows"}}
    PATCH /internal/logs/subscribe          {"clientId", "enabled"}: new entries go to that socket
                                            as {"type": "logs", "data": {"entries", "size"}}
    GET   /internal/folder_paths            {kind: [folder, ...]}
    GET   /internal/files/{output|input|temp}  file names, newest first (hidden files left out)

The log buffer is a logging.Handler on the "sd35fp8" and "uvicorn" loggers, attached while the app
runs (ComfyUI intercepts stdout/stderr instead; this server's output goes through logging).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import deque
from datetime import datetime
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from sd35fp8.server.validation import LogsSubscribe, read_model
from sd35fp8.workflow import ModelFolders

LOGGERS = ("sd35fp8", "uvicorn")
CAPACITY = 300  # ComfyUI's app.logger keeps the last 300 entries


def terminal_size() -> dict:
    size = shutil.get_terminal_size(fallback=(80, 24))
    return {"cols": size.columns, "rows": size.lines}


class LogBuffer(logging.Handler):
    """The last CAPACITY log records as ComfyUI log entries {"t": ISO time, "m": text ending in a newline}.

    Each new entry also goes to the websocket clients subscribed through PATCH /internal/logs/subscribe
    (`send(event, data, client_id)`: the hub's thread-safe send; `connected()`: live client ids).
    """

    def __init__(self, send: Callable[[str, Any, str | None], None], connected: Callable[[], list[str]],
                 capacity: int = CAPACITY) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.entries: deque[dict] = deque(maxlen=capacity)
        self.subscriptions: set[str] = set()
        self._send, self._connected = send, connected
        self._sub_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = {"t": datetime.now().isoformat(), "m": self.format(record) + "\n"}
        except Exception:  # logging must never raise into the caller
            self.handleError(record)
            return
        self.entries.append(entry)
        with self._sub_lock:
            subscribed = set(self.subscriptions)
        if not subscribed:
            return
        live = set(self._connected())
        for client_id in subscribed:
            if client_id in live:
                self._send("logs", {"entries": [entry], "size": terminal_size()}, client_id)
            else:  # as ComfyUI: a disconnected client is unsubscribed
                self.subscribe(client_id, False)

    def subscribe(self, client_id: str, enabled: bool) -> None:
        with self._sub_lock:
            (self.subscriptions.add if enabled else self.subscriptions.discard)(client_id)

    def attach(self) -> None:
        """Listen on LOGGERS. Their levels are left alone: the buffer holds what the server's verbosity
        lets through (`sd35fp8 serve -v`: INFO and up; otherwise warnings and errors)."""
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self)


def internal_routes(folders: ModelFolders, logs: LogBuffer) -> APIRouter:
    r = APIRouter(prefix="/internal")

    @r.get("/logs")
    async def get_logs() -> str:
        return "".join(f"{e['t']} - {e['m']}" for e in list(logs.entries))

    @r.get("/logs/raw")
    async def get_raw_logs() -> dict:
        return {"entries": list(logs.entries), "size": terminal_size()}

    @r.patch("/logs/subscribe")
    async def subscribe_logs(request: Request) -> Response:
        body = await read_model(request, LogsSubscribe)  # 400: expected {"clientId": ..., "enabled": bool}
        logs.subscribe(body.clientId, body.enabled)
        return Response(status_code=200)

    @r.get("/folder_paths")
    async def get_folder_paths() -> dict:
        return {kind: [str(p) for p in folders.folders(kind)] for kind in folders.kinds}

    @r.get("/files/{directory_type}")
    async def get_files(directory_type: str) -> Any:
        folder = folders.folder_of(directory_type)  # None unless one of FOLDER_TYPES
        if folder is None:
            return JSONResponse({"error": "Invalid directory type"}, status_code=400)
        if not folder.is_dir():
            return []
        entries = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
        entries.sort(key=lambda p: -p.stat().st_mtime)
        return [p.name for p in entries]

    return r
