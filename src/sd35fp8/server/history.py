"""The history store: one entry per finished prompt, keyed by prompt id (ComfyUI execution.py history).

An entry is `{prompt, outputs, status: {status_str, completed, messages}, meta}`: `prompt` is the
queue item `[number, prompt_id, prompt, extra_data, outputs_to_execute]`. At most `max_history`
entries are kept; the oldest goes first (ComfyUI MAXIMUM_HISTORY_SIZE). With a journal
(journal.Journal) every change is written there too, so the history survives a restart.

Entries are never changed once stored, so `get` hands them out without copying, and a page of
`max_items` costs O(max_items) wherever it lies (walked from the nearer end): GET /history?max_items=100
at 10 000 entries answers in about a millisecond (benchmarks/fuzz.py). The full dump (GET /history,
ComfyUI's default: every entry, ~17 MB at 10 000 seed-workflow entries) is never joined into one body
for the wire: each entry is rendered once, consecutive entries (by insertion number) are joined into
blocks of BLOCK entries, and the response sends the blocks one after another (ChunksResponse). A new
entry, or the oldest one dropped, re-joins only its own block, so the first read after a change costs
what a read of an unchanged history costs (benchmarks/history.py "after one change").
`changes_since(version)` tells derived views (jobs._Summaries) which entries came and went, so they
update in place instead of walking all 10 000 entries.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import Any

from starlette.responses import Response

from sd35fp8.server.journal import Journal

MAX_HISTORY = 10000  # ComfyUI MAXIMUM_HISTORY_SIZE
BLOCK = 256  # entries joined into one cached block of the full dump (~430 KB of seed-workflow entries)
CHANGE_LOG = 4096  # changes remembered for changes_since; a reader further behind rebuilds

Change = tuple[str, str, Any, int]  # ("add" | "del", prompt id, entry or None, insertion number)


class PromptHistory:
    """Thread-safe, insertion-ordered history entries."""

    def __init__(self, max_history: int = MAX_HISTORY, journal: Journal | None = None):
        self.max_history = max_history
        self.journal = journal
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._json: dict[str, bytes] = {}  # '"id":{entry}' rendered once, on first read
        self._seq: dict[str, int] = {}  # id -> insertion number (the dict's order is theirs)
        self._next_seq = 0
        self._blocks: dict[int, dict[str, None]] = {}  # insertion number // BLOCK -> its ids, in order
        self._block_json: dict[int, bytes] = {}  # a block's renderings joined with ","
        self.version = 0  # changes whenever an entry is added or removed (caches of derived views)
        self._log: deque[tuple[int, Change]] = deque(maxlen=CHANGE_LOG)  # (version after, change)
        self._log_floor = 0  # changes_since answers for versions >= this
        self._chunks: tuple[int, tuple[bytes, ...]] | None = None  # (version, the full dump's chunks)
        self._all: tuple[int, bytes] | None = None  # (version, the full dump joined: get_json)

    def add(self, prompt_id: str, entry: dict) -> None:
        """Store `entry` under `prompt_id`, dropping the oldest entry when full."""
        with self._lock:
            if self.journal is not None:
                self.journal.finish(prompt_id, entry)
            self._store(prompt_id, entry)

    def _changed(self, change: Change) -> None:
        self.version += 1
        self._chunks = self._all = None
        if len(self._log) == self._log.maxlen:
            self._log_floor = self._log[0][0]
        self._log.append((self.version, change))

    def _remove(self, prompt_id: str) -> dict | None:
        entry = self._entries.pop(prompt_id, None)
        if entry is None:
            return None
        self._json.pop(prompt_id, None)
        seq = self._seq.pop(prompt_id)
        block = self._blocks[seq // BLOCK]
        del block[prompt_id]
        if not block:
            del self._blocks[seq // BLOCK]
        self._block_json.pop(seq // BLOCK, None)
        self._changed(("del", prompt_id, None, seq))
        return entry

    def _store(self, prompt_id: str, entry: dict) -> None:
        if len(self._entries) >= self.max_history:
            oldest = next(iter(self._entries))
            self._remove(oldest)
            if self.journal is not None:
                self.journal.drop_history(oldest)
        self._json.pop(prompt_id, None)
        seq = self._seq.get(prompt_id)
        if seq is None:  # a new id goes last; a stored one keeps its place (a dict, as in ComfyUI)
            seq = self._seq[prompt_id] = self._next_seq
            self._next_seq += 1
            self._blocks.setdefault(seq // BLOCK, {})[prompt_id] = None
        self._entries[prompt_id] = entry
        self._block_json.pop(seq // BLOCK, None)
        self._changed(("add", prompt_id, entry, seq))

    def restore(self, entries: list[tuple[str, dict]]) -> None:
        """Entries read back from the journal at start-up (oldest first); not written again."""
        with self._lock:
            for prompt_id, entry in entries:
                self._store(prompt_id, entry)

    def changes_since(self, version: int) -> tuple[int, list[Change]] | None:
        """(the current version, the changes after `version`, oldest first), or None when they are no
        longer all remembered (a wipe, or more than CHANGE_LOG changes): then rebuild from `get()`."""
        with self._lock:
            if version < self._log_floor or version > self.version:
                return None
            if version == self.version:
                return version, []
            changes = [c for v, c in reversed(self._log) if v > version] if self._log else []
            if len(changes) != self.version - version:
                return None
            return self.version, changes[::-1]

    def snapshot(self) -> tuple[int, dict[str, dict], dict[str, int]]:
        """(version, every entry by id in order, their insertion numbers), all of one version."""
        with self._lock:
            return self.version, dict(self._entries), dict(self._seq)

    def get(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        """ComfyUI get_history: one id, or the last `max_items` entries (from `offset` when >= 0).
        The entries themselves are returned, not copies: callers only read them."""
        with self._lock:
            if prompt_id is not None:
                entry = self._entries.get(prompt_id)
                return {prompt_id: entry} if entry is not None else {}
            n = len(self._entries)
            if offset < 0 and max_items is not None:
                offset = max(n - max_items, 0)
            start = min(max(offset, 0), n)
            end = n if max_items is None else min(start + max(max_items, 0), n)
            if start >= end:
                return {}
            if start > n - end:  # nearer the newest end: walk back from it
                page = list(islice(reversed(self._entries.items()), n - end, n - start))[::-1]
            else:
                page = list(islice(self._entries.items(), start, end))
        return dict(page)

    def full_chunks(self) -> tuple[bytes, ...]:
        """The full dump's JSON body as chunks to send in order (b"{", block, b",", block, ..., b"}"):
        the same tuple while the history is unchanged; after a change only the blocks that changed
        are joined again (and only the entries never rendered are rendered)."""
        with self._lock:
            if self._chunks is not None and self._chunks[0] == self.version:
                return self._chunks[1]
            version = self.version
            blocks: list[Any] = []  # joined bytes, or [(id, entry, rendering or None), ...] to join
            for b, ids in self._blocks.items():
                joined = self._block_json.get(b)
                if joined is None:
                    joined = [(pid, self._entries[pid], self._json.get(pid)) for pid in ids]
                blocks.append((b, joined))
        rendered: dict[str, tuple[dict, bytes]] = {}
        for k, (b, joined) in enumerate(blocks):
            if isinstance(joined, bytes):
                continue
            parts = []
            for pid, entry, part in joined:
                if part is None:
                    part = render_entry(pid, entry)
                    rendered[pid] = (entry, part)
                parts.append(part)
            blocks[k] = (b, b",".join(parts), True)
        chunks = [b"{"]
        for k, block in enumerate(blocks):
            if k:
                chunks.append(b",")
            chunks.append(block[1])
        chunks.append(b"}")
        out = tuple(chunks)
        with self._lock:
            for pid, (entry, part) in rendered.items():
                if self._entries.get(pid) is entry:  # still stored: remember its rendering
                    self._json[pid] = part
            if self.version == version:  # nothing changed meanwhile: keep the blocks and the body
                for block in blocks:
                    if len(block) == 3:
                        self._block_json[block[0]] = block[1]
                self._chunks = (version, out)
        return out

    def get_json(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> bytes:
        """`get(...)` as JSON bytes, each entry rendered once and kept (entries never change); the
        full dump (no id, no max_items, no offset) is full_chunks() joined, kept until the next change."""
        if prompt_id is None and max_items is None and offset <= 0:
            with self._lock:
                cached = self._all
                if cached is not None and cached[0] == self.version:
                    return cached[1]
                version = self.version
            body = b"".join(self.full_chunks())
            with self._lock:
                if self.version == version:
                    self._all = (version, body)
            return body
        page = self.get(prompt_id, max_items, offset)
        parts = [self._json.get(pid) for pid in page]
        for k, pid in enumerate(page):
            if parts[k] is None:
                parts[k] = part = render_entry(pid, page[pid])
                with self._lock:
                    if self._entries.get(pid) is page[pid]:  # still stored: remember its rendering
                        self._json[pid] = part
        return join_wrapped(b"{", parts, b"}")

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def wipe(self) -> None:
        with self._lock:
            if self.journal is not None:
                self.journal.drop_history()
            self._entries.clear()
            self._json.clear()
            self._seq.clear()
            self._blocks.clear()
            self._block_json.clear()
            self.version += 1
            self._chunks = self._all = None
            self._log.clear()
            self._log_floor = self.version  # readers older than the wipe rebuild

    def delete(self, prompt_id: str) -> bool:
        with self._lock:
            if self.journal is not None:
                self.journal.drop_history(prompt_id)
            return self._remove(prompt_id) is not None


def render_entry(prompt_id: str, entry: dict) -> bytes:
    """'"id":{entry}' as the full dump and the pages carry it."""
    return (json.dumps(prompt_id) + ":" + json.dumps(entry, separators=(",", ":"), allow_nan=False)).encode()


def join_wrapped(head: bytes, parts: list[bytes], tail: bytes) -> bytes:
    """head + b",".join(parts) + tail with one allocation of the body (the bytes `+` of a 17 MB join
    would copy it twice more: tens of milliseconds of page faults here)."""
    if not parts:
        return head + tail
    parts = list(parts)
    parts[0] = head + parts[0]
    parts[-1] = parts[-1] + tail
    return b",".join(parts)


class ChunksResponse(Response):
    """A body given as a sequence of bytes sent in order, never joined: Content-Length is their sum
    (no chunked encoding), and uvicorn's flow control paces the writes. The bytes on the wire are
    those of Response(b"".join(chunks))."""

    def __init__(self, chunks: Sequence[bytes], status_code: int = 200, media_type: str = "application/json"):
        self.chunks = chunks
        super().__init__(None, status_code=status_code, media_type=media_type)
        self.raw_headers = [(k, str(sum(map(len, chunks))).encode() if k == b"content-length" else v)
                            for k, v in self.raw_headers]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        last = len(self.chunks) - 1
        for k, chunk in enumerate(self.chunks):
            if chunk or k == last:
                await send({"type": "http.response.body", "body": chunk, "more_body": k < last})
        if not self.chunks:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.background is not None:
            await self.background()
