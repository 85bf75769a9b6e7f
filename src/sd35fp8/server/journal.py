"""The durable journal of the queue and the history: SQLite (standard library) in WAL mode.

One row per accepted prompt, written before POST /prompt answers 200 (`accept`), then moved along:

    pending  -> running (`start`) -> done (`finish`: the history entry, output file references included)

A row is gone only when a client deletes it (POST /queue delete/clear, POST /history delete/clear)
or the history grows past its cap. Every write is one committed transaction with
`synchronous=FULL`, so a `kill -9` (or a power loss) after `/prompt` answered leaves the prompt in
the file. On start-up `recover()` hands back the history and the prompts that were pending or
running when the last process stopped; the server re-queues them or marks them failed
(`--on-restart requeue|fail`).

The file is `<state_dir>/sd35fp8-queue.sqlite3` (plus SQLite's -wal / -shm files beside it); beside it
`sd35fp8-queue.owner` names the process that opened it, and a second live server on this host is refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd35fp8.errors import InputError

log = logging.getLogger(__name__)

JOURNAL_NAME = "sd35fp8-queue.sqlite3"
OWNER_NAME = "sd35fp8-queue.owner"  # "<pid>@<host>" of the server process that opened the journal last
STATES = ("pending", "running", "done")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS prompts (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,  -- acceptance order (history order)
    prompt_id TEXT NOT NULL UNIQUE,
    item      TEXT NOT NULL,                      -- JSON queue item [number, id, prompt, extra, outputs]
    state     TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done')),
    entry     TEXT                                -- JSON history entry once done
);
CREATE INDEX IF NOT EXISTS prompts_state ON prompts (state, seq);
"""


@dataclass
class Recovered:
    """What a previous process left: history entries (oldest first) and unfinished queue items."""

    history: list[tuple[str, dict]] = field(default_factory=list)
    pending: list[list] = field(default_factory=list)  # queue items that had not started
    running: list[list] = field(default_factory=list)  # queue items that were running


def _dumps(value: Any) -> str:
    # default=str: a history entry may carry non-JSON values (ComfyUI format_value makes them str too)
    return json.dumps(value, default=str, allow_nan=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _claim(state_dir: Path) -> None:
    """Write this process into the state folder's owner file, or InputError when another live sd35fp8 process
    on this host holds the journal (two servers on one journal would show, run and re-queue each other's
    prompts). A stale owner (its process gone) or one of another host (its liveness unknown: logged) is taken."""
    owner = state_dir / OWNER_NAME
    me, host = f"{os.getpid()}@{socket.gethostname()}", socket.gethostname()
    try:
        text = owner.read_text().strip()
    except OSError:
        text = ""
    pid, _, their_host = text.partition("@")
    if text and text != me and pid.isdigit():
        if their_host == host and _alive(int(pid)):
            raise InputError(f"--state-dir {state_dir}: its queue journal is in use by another running sd35fp8 server "
                             f"(pid {pid}); two servers on one journal would show and run each other's prompts. Give "
                             f"this one its own --state-dir (the default is sd35fp8-state/ beside the output folder), "
                             f"or --state-dir none (if pid {pid} is no sd35fp8 server, delete {owner})")
        if their_host != host:
            log.warning("queue journal in %s was last opened by %s on host %s; taking it over", state_dir, pid,
                        their_host)
    try:
        owner.write_text(me)
    except OSError as e:
        raise InputError(f"--state-dir {state_dir}: cannot write {OWNER_NAME} ({e.strerror})") from e


class Journal:
    """Thread-safe access to the journal file (one connection, one lock)."""

    def __init__(self, state_dir: str | Path):
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--state-dir {self.state_dir}: cannot create the folder ({e.strerror})") from e
        _claim(self.state_dir)
        self.path = self.state_dir / JOURNAL_NAME
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise InputError(f"queue journal {self.path}: cannot open it ({e})") from e

    def _write(self, sql: str, args: tuple | list = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    # ---- the queue --------------------------------------------------------------------------
    def accept(self, item: list) -> None:
        """A prompt was accepted: journal it as pending (before the client hears 200)."""
        # a resubmitted prompt_id replaces the old row (the history entry it had goes too)
        self._write("INSERT OR REPLACE INTO prompts (prompt_id, item, state) VALUES (?, ?, 'pending')",
                    (item[1], _dumps(item)))

    def start(self, prompt_ids: list[str]) -> None:
        """The worker took these prompts."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE prompts SET state = 'running' WHERE prompt_id = ?",
                                 [(p,) for p in prompt_ids])

    def finish(self, prompt_id: str, entry: dict) -> None:
        """The prompt finished (any outcome): its history entry replaces the pending/running row."""
        self._write("INSERT INTO prompts (prompt_id, item, state, entry) VALUES (?, ?, 'done', ?) "
                    "ON CONFLICT(prompt_id) DO UPDATE SET state = 'done', entry = excluded.entry",
                    (prompt_id, _dumps(entry.get("prompt")), _dumps(entry)))

    def requeue(self, prompt_ids: list[str]) -> None:
        """Items that were running go back to pending (restart with --on-restart requeue)."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("UPDATE prompts SET state = 'pending' WHERE prompt_id = ? AND state != 'done'",
                                 [(p,) for p in prompt_ids])

    def drop_pending(self, prompt_ids: list[str] | None = None) -> None:
        """A client deleted queue items (None: cleared the whole queue)."""
        if prompt_ids is None:
            self._write("DELETE FROM prompts WHERE state = 'pending'")
            return
        with self._lock, self._db:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM prompts WHERE prompt_id = ? AND state = 'pending'",
                                 [(p,) for p in prompt_ids])

    # ---- the history ------------------------------------------------------------------------
    def drop_history(self, prompt_id: str | None = None) -> None:
        """A client deleted a history entry (None: cleared the history)."""
        if prompt_id is None:
            self._write("DELETE FROM prompts WHERE state = 'done'")
        else:
            self._write("DELETE FROM prompts WHERE prompt_id = ? AND state = 'done'", (prompt_id,))

    # ---- start-up ---------------------------------------------------------------------------
    def recover(self) -> Recovered:
        """Everything the file holds, in acceptance order."""
        out = Recovered()
        with self._lock:
            rows = self._db.execute("SELECT prompt_id, item, state, entry FROM prompts ORDER BY seq").fetchall()
        for prompt_id, item, state, entry in rows:
            try:
                if state == "done":
                    out.history.append((prompt_id, json.loads(entry)))
                else:
                    (out.pending if state == "pending" else out.running).append(json.loads(item))
            except (json.JSONDecodeError, TypeError) as e:  # a row we cannot read is reported, never dropped silently
                log.error("queue journal %s: row for prompt %s (%s) is unreadable (%s); left in the file",
                          self.path, prompt_id, state, e)
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM prompts GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | dict(rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
