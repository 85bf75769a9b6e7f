"""The history store: one entry per finished prompt, keyed by prompt id (ComfyUI execution.py history).

An entry is `{prompt, outputs, status: {status_str, completed, messages}, meta}`: `prompt` is the
queue item `[number, prompt_id, prompt, extra_data, outputs_to_execute]`. At most `max_history`
entries are kept; the oldest goes first (ComfyUI MAXIMUM_HISTORY_SIZE). With a journal
(journal.Journal) every change is written there too, so the history survives a restart.

Entries are never changed once stored, so `get` hands them out without copying, and a page of
`max_items` costs O(max_items) wherever it lies (walked from the nearer end): GET /history?max_items=100
at 10 000 entries answers in about a millisecond (benchmarks/fuzz.py). The full dump (GET /history,
ComfyUI's default: every entry, ~17 MB at 10 000 seed-workflow entries) is kept as one body keyed on
`version`: it is joined from the per-entry renderings once after a change, and every read while the
history is unchanged hands out the same bytes object (O(1)).
"""

from __future__ import annotations

import json
import threading
from itertools import islice

from sd35fp8.server.journal import Journal

MAX_HISTORY = 10000  # ComfyUI MAXIMUM_HISTORY_SIZE


class PromptHistory:
    """Thread-safe, insertion-ordered history entries."""

    def __init__(self, max_history: int = MAX_HISTORY, journal: Journal | None = None):
        self.max_history = max_history
        self.journal = journal
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._json: dict[str, bytes] = {}  # '"id":{entry}' rendered once, on first read
        self.version = 0  # changes whenever an entry is added or removed (caches of derived views)
        self._all: tuple[int, bytes] | None = None  # (version, the full dump's JSON body)

    def add(self, prompt_id: str, entry: dict) -> None:
        """Store `entry` under `prompt_id`, dropping the oldest entry when full."""
        with self._lock:
            if self.journal is not None:
                self.journal.finish(prompt_id, entry)
            self._store(prompt_id, entry)

    def _store(self, prompt_id: str, entry: dict) -> None:
        if len(self._entries) >= self.max_history:
            oldest = next(iter(self._entries))
            del self._entries[oldest]
            self._json.pop(oldest, None)
            if self.journal is not None:
                self.journal.drop_history(oldest)
        self._json.pop(prompt_id, None)
        self._entries[prompt_id] = entry
        self.version += 1
        self._all = None

    def restore(self, entries: list[tuple[str, dict]]) -> None:
        """Entries read back from the journal at start-up (oldest first); not written again."""
        with self._lock:
            for prompt_id, entry in entries:
                self._store(prompt_id, entry)

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

    def get_json(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> bytes:
        """`get(...)` as JSON bytes, each entry rendered once and kept (entries never change); the
        full dump (no id, no max_items, no offset) is cached whole until the next change."""
        full = prompt_id is None and max_items is None and offset <= 0
        if full:
            with self._lock:
                cached, version = self._all, self.version
            if cached is not None and cached[0] == version:
                return cached[1]
        if full:  # no dict copy of 10 000 entries: the cached renderings in order, under the lock
            with self._lock:
                version = self.version
                page = self._entries
                parts = [self._json.get(pid) for pid in page]
                missing = [(k, pid, page[pid]) for k, pid in enumerate(page) if parts[k] is None]
        else:
            page = self.get(prompt_id, max_items, offset)
            parts = [self._json.get(pid) for pid in page]
            missing = [(k, pid, page[pid]) for k, pid in enumerate(page) if parts[k] is None]
        for k, pid, entry in missing:
            part = (json.dumps(pid) + ":" + json.dumps(entry, separators=(",", ":"), allow_nan=False)).encode()
            with self._lock:
                if self._entries.get(pid) is entry:  # still stored: remember its rendering
                    self._json[pid] = part
            parts[k] = part
        body = join_wrapped(b"{", parts, b"}")
        if full:
            with self._lock:
                if self.version == version:  # nothing changed while it was joined
                    self._all = (version, body)
        return body

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def wipe(self) -> None:
        with self._lock:
            if self.journal is not None:
                self.journal.drop_history()
            self._entries.clear()
            self.version += 1
            self._json.clear()
            self._all = None

    def delete(self, prompt_id: str) -> bool:
        with self._lock:
            if self.journal is not None:
                self.journal.drop_history(prompt_id)
            self._json.pop(prompt_id, None)
            self.version += 1
            self._all = None
            return self._entries.pop(prompt_id, None) is not None


def join_wrapped(head: bytes, parts: list[bytes], tail: bytes) -> bytes:
    """head + b",".join(parts) + tail with one allocation of the body (the bytes `+` of a 17 MB join
    would copy it twice more: tens of milliseconds of page faults here)."""
    if not parts:
        return head + tail
    parts = list(parts)
    parts[0] = head + parts[0]
    parts[-1] = parts[-1] + tail
    return b",".join(parts)
