"""The history store: one entry per finished prompt, keyed by prompt id (ComfyUI execution.py history).

An entry is `{prompt, outputs, status: {status_str, completed, messages}, meta}`: `prompt` is the
queue item `[number, prompt_id, prompt, extra_data, outputs_to_execute]`. At most `max_history`
entries are kept; the oldest goes first (ComfyUI MAXIMUM_HISTORY_SIZE).
"""

from __future__ import annotations

import copy
import threading

MAX_HISTORY = 10000  # ComfyUI MAXIMUM_HISTORY_SIZE


class PromptHistory:
    """Thread-safe, insertion-ordered history entries."""

    def __init__(self, max_history: int = MAX_HISTORY):
        self.max_history = max_history
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}

    def add(self, prompt_id: str, entry: dict) -> None:
        """Store `entry` under `prompt_id`, dropping the oldest entry when full."""
        with self._lock:
            if len(self._entries) >= self.max_history:
                self._entries.pop(next(iter(self._entries)))
            self._entries[prompt_id] = entry

    def get(self, prompt_id: str | None = None, max_items: int | None = None, offset: int = -1) -> dict:
        """ComfyUI get_history: one id, or the last `max_items` entries (from `offset` when >= 0)."""
        with self._lock:
            if prompt_id is not None:
                entry = self._entries.get(prompt_id)
                return {prompt_id: copy.deepcopy(entry)} if entry is not None else {}
            items = list(self._entries.items())
        if offset < 0 and max_items is not None:
            offset = max(len(items) - max_items, 0)
        offset = max(offset, 0)
        end = None if max_items is None else offset + max_items
        return {k: copy.deepcopy(v) for k, v in items[offset:end]}

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def wipe(self) -> None:
        with self._lock:
            self._entries.clear()

    def delete(self, prompt_id: str) -> bool:
        with self._lock:
            return self._entries.pop(prompt_id, None) is not None
