"""WebSocket hub: ComfyUI's /ws messages, sent from the worker thread into the asyncio loop.

JSON messages are `{"type": event, "data": data}`. Binary messages are ComfyUI's preview frames:
4-byte big-endian event type (1 = PREVIEW_IMAGE), 4-byte big-endian image type (1 = JPEG,
2 = PNG), then the encoded image; to a client whose feature_flags message said supports_preview_metadata,
ComfyUI's PREVIEW_IMAGE_WITH_METADATA instead: event type 4, the metadata's length, the metadata (JSON:
node_id, prompt_id, display_node_id, parent_node_id, real_node_id, image_type as a MIME type), the image.
`sid=None` broadcasts to every socket (ComfyUI send_sync).

Each socket has its own outgoing asyncio.Queue drained by one writer task, so messages keep the
order in which the worker produced them and a slow client never blocks the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import uuid
import weakref
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

log = logging.getLogger(__name__)

PREVIEW_IMAGE = 1  # ComfyUI BinaryEventTypes.PREVIEW_IMAGE
PREVIEW_IMAGE_WITH_METADATA = 4  # ComfyUI BinaryEventTypes.PREVIEW_IMAGE_WITH_METADATA
MIME_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}
# events no socket sees: they go to the in-process subscriber of data["prompt_id"] (the /v1 route streaming it)
PRIVATE_EVENTS = ("partial_image",)
IMAGE_TYPES = {"JPEG": 1, "PNG": 2}
_CLOSE = object()


def encode_preview(image: bytes, image_format: str = "JPEG") -> bytes:
    """ComfyUI encode_bytes(PREVIEW_IMAGE, (format, image)): two big-endian u32, then the bytes."""
    fmt = image_format.upper()
    if fmt not in IMAGE_TYPES:
        raise ValueError(f"preview format must be JPEG or PNG, got {image_format!r}")
    return struct.pack(">I", PREVIEW_IMAGE) + struct.pack(">I", IMAGE_TYPES[fmt]) + image


def encode_preview_with_metadata(image: bytes, image_format: str, prompt_id: str | None, node: str | None) -> bytes:
    """ComfyUI's PREVIEW_IMAGE_WITH_METADATA frame (server.py): type 4, metadata length, metadata JSON, image."""
    fmt = image_format.upper()
    if fmt not in MIME_TYPES:
        raise ValueError(f"preview format must be JPEG or PNG, got {image_format!r}")
    meta = json.dumps({"node_id": node, "prompt_id": prompt_id, "display_node_id": node, "parent_node_id": None,
                       "real_node_id": node, "image_type": MIME_TYPES[fmt]}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(meta)) + meta + image


class WebSocketHub:
    """Connected sockets by client id (sid), and a thread-safe `send` for the worker."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        # prompt id -> queue of (event, data) of its PRIVATE_EVENTS; weak: a subscriber that is dropped unread (a
        # streamed response never started, its client gone) takes its queue and what piles up in it along
        self._subscribers: weakref.WeakValueDictionary[str, asyncio.Queue] = weakref.WeakValueDictionary()
        self._metadata_previews: set[str] = set()  # sids whose feature_flags said supports_preview_metadata
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def client_ids(self) -> list[str]:
        with self._lock:
            return list(self._queues)

    # ---- from any thread --------------------------------------------------------------------
    def send(self, event: str, data: Any, sid: str | None = None) -> None:
        """Queue a message for one client (sid) or all (None). Safe to call from the worker thread.

        event "preview_image" with data {"image": bytes, "format": "JPEG"|"PNG"} goes out binary; PRIVATE_EVENTS
        go only to the subscriber of data["prompt_id"].
        """
        loop = self._loop
        if event in PRIVATE_EVENTS:
            with self._lock:
                sub = self._subscribers.get(data.get("prompt_id")) if isinstance(data, dict) else None
            if sub is not None and loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(sub.put_nowait, (event, data))
                except RuntimeError:  # the loop closed meanwhile
                    pass
            return
        if loop is None or loop.is_closed():
            return  # no server loop yet: nobody can be listening
        with self._lock:
            targets = list(self._queues.items()) if sid is None else (
                [(sid, self._queues[sid])] if sid in self._queues else [])
            # ComfyUI: the metadata frame only to the prompt's own client when it supports it; a broadcast
            # (a prompt without client_id) goes out as legacy frames to everyone
            rich = {sid} & self._metadata_previews if sid is not None else set()
        if event == "preview_image":
            fmt = data.get("format", "JPEG")
            plain = encode_preview(data["image"], fmt)
            meta = (encode_preview_with_metadata(data["image"], fmt, data.get("prompt_id"), data.get("node"))
                    if rich else plain)
        else:
            plain = meta = json.dumps({"type": event, "data": data})
        for target, q in targets:
            try:
                loop.call_soon_threadsafe(q.put_nowait, meta if target in rich else plain)
            except RuntimeError:  # the loop closed between the check and the call: server shut down
                return

    # ---- inside the loop --------------------------------------------------------------------
    def subscribe(self, prompt_id: str) -> asyncio.Queue:
        """A queue of (event, data) for the prompt's PRIVATE_EVENTS, until `unsubscribe` or until the caller drops
        the queue (the hub holds it weakly)."""
        self.bind(asyncio.get_running_loop())
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._subscribers[prompt_id] = q
        return q

    def unsubscribe(self, prompt_id: str) -> None:
        with self._lock:
            self._subscribers.pop(prompt_id, None)

    async def serve(self, ws: WebSocket, client_id: str | None, hello: dict, server_features: dict,
                    resume: list[dict] | None = None) -> None:
        """Accept, send the status hello (and `resume`: messages for a reconnecting client, such as the
        node its prompt is executing), then pump messages until the client leaves."""
        sid = client_id or uuid.uuid4().hex
        self.bind(asyncio.get_running_loop())
        await ws.accept()
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            old = self._queues.get(sid)
            self._queues[sid] = q
        if old is not None:
            old.put_nowait(_CLOSE)  # a reconnect with the same id takes over
        writer = asyncio.create_task(self._writer(ws, q))
        try:
            q.put_nowait(json.dumps({"type": "status", "data": {**hello, "sid": sid}}))
            for message in resume or []:
                q.put_nowait(json.dumps(message))
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                text = msg.get("text")
                if text:
                    self._on_client_message(sid, q, text, server_features)
        except WebSocketDisconnect:
            pass
        finally:
            with self._lock:
                if self._queues.get(sid) is q:
                    del self._queues[sid]
                    self._metadata_previews.discard(sid)
            q.put_nowait(_CLOSE)
            await writer

    def _on_client_message(self, sid: str, q: asyncio.Queue, text: str, server_features: dict) -> None:
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the C scanner's recursion
            log.warning("ignored a websocket message that is not JSON (or nests too deeply)")
            return
        if isinstance(msg, dict) and msg.get("type") == "feature_flags":
            flags = msg.get("data")
            with self._lock:  # ComfyUI feature_flags.supports_feature: exactly True
                if isinstance(flags, dict) and flags.get("supports_preview_metadata") is True and \
                        server_features.get("supports_preview_metadata"):
                    self._metadata_previews.add(sid)
                else:
                    self._metadata_previews.discard(sid)
            q.put_nowait(json.dumps({"type": "feature_flags", "data": server_features}))

    @staticmethod
    async def _writer(ws: WebSocket, q: asyncio.Queue) -> None:
        while True:
            message = await q.get()
            if message is _CLOSE:
                return
            try:
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_text(message)
            except (WebSocketDisconnect, RuntimeError, OSError):
                return  # the client went away; the reader side cleans up
