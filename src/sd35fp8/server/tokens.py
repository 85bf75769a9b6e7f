"""The auth token: where it comes from, how it is compared, and how it is kept out of sight.

- `resolve_token(token, token_file, env)`: `--auth-token-file` (first line) or the
  SD35FP8_AUTH_TOKEN environment variable; `--auth-token` on the command line still works but is
  visible to every local user in `ps` / /proc/<pid>/cmdline for the life of the process (Python
  cannot rewrite that memory portably), so it logs a warning naming the safer ways, and
  `mask_process_title` overwrites the process title (setproctitle: on Linux it rewrites the argv
  memory that /proc/<pid>/cmdline and `ps` read) with the token masked. Until then (interpreter
  start-up) it is visible; --auth-token-file or SD35FP8_AUTH_TOKEN (/proc/<pid>/environ: readable by
  the same user and root only) are the safe ways.
- `token_matches`: constant-time comparison (hmac.compare_digest on bytes).
- `FailureThrottle`: failed attempts per client address; past `max_failures` within `window_s`
  the client gets 429 with Retry-After until the oldest failure ages out.
- `Redactor`: replaces the token, and any `token=` query value, with `***` in text, argv lists
  and log records (`RedactingFilter` on uvicorn's loggers and the /internal/logs buffer).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from pathlib import Path

from sd35fp8.errors import InputError

log = logging.getLogger(__name__)

TOKEN_ENV = "SD35FP8_AUTH_TOKEN"
TOKEN_FLAGS = ("--auth-token",)
MASK = "***"
_QUERY_TOKEN = re.compile(r"((?:^|[?&;\s])token=)[^&\s\"']*", re.IGNORECASE)


def read_token_file(path: str | os.PathLike) -> str:
    """The first line of `path`, stripped. Warns when other users may read the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        mode = p.stat().st_mode
    except OSError as e:
        raise InputError(f"cannot read the auth token file {p}: {e.strerror or e}") from e
    token = text.splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise InputError(f"the auth token file {p} is empty")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("auth token file %s is readable by other users (mode %o); chmod 600 it", p, mode & 0o777)
    return token


def resolve_token(token: str | None = None, token_file: str | os.PathLike | None = None,
                  env: Mapping[str, str] | None = None) -> str | None:
    """The token to require: the explicit one, else the file's, else $SD35FP8_AUTH_TOKEN, else None."""
    if token and token_file:
        raise InputError("give the auth token once: --auth-token or --auth-token-file, not both")
    if token:
        log.warning("an auth token given on the command line is visible to other local users (ps, "
                     "/proc/<pid>/cmdline) for as long as the server runs; use --auth-token-file or %s",
                     TOKEN_ENV)
        return token
    if token_file:
        return read_token_file(token_file)
    value = (env if env is not None else os.environ).get(TOKEN_ENV, "").strip()
    return value or None


def mask_process_title(argv: list[str], token: str | None) -> bool:
    """Rewrite the process title (`ps`, /proc/<pid>/cmdline) as `argv` with the token masked, when
    the token appears in argv. True when it was rewritten; False (with a warning) when setproctitle
    is missing or the platform does not allow it; False silently when there was nothing to hide."""
    if not token or not any(token in arg for arg in argv):
        return False
    try:
        import setproctitle  # optional at import time: a C extension
    except ImportError:
        log.warning("the auth token stays visible in ps: setproctitle is not installed (pip install "
                    "setproctitle); use --auth-token-file or %s", TOKEN_ENV)
        return False
    setproctitle.setproctitle(" ".join(Redactor([token]).argv(list(argv))))
    title = setproctitle.getproctitle()
    if token in title:
        log.warning("could not hide the auth token from ps on this platform; use --auth-token-file or %s",
                    TOKEN_ENV)
        return False
    return True


def token_matches(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


class FailureThrottle:
    """Failed auth attempts per client address, in a sliding window; bounded memory."""

    def __init__(self, max_failures: int = 10, window_s: float = 60.0, max_clients: int = 10_000,
                 clock=time.monotonic):
        self.max_failures, self.window_s, self.max_clients = max_failures, window_s, max_clients
        self._clock = clock
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float:
        """Seconds this client must wait before its next attempt is even checked (0 = go ahead)."""
        with self._lock:
            fails = self._prune(client)
            if fails is None or len(fails) < self.max_failures:
                return 0.0
            return max(fails[0] + self.window_s - self._clock(), 0.001)

    def failed(self, client: str) -> None:
        with self._lock:
            fails = self._prune(client)
            if fails is None:
                fails = self._fails[client] = deque(maxlen=self.max_failures)
                while len(self._fails) > self.max_clients:
                    self._fails.popitem(last=False)
            fails.append(self._clock())
            self._fails.move_to_end(client)

    def _prune(self, client: str) -> deque[float] | None:
        fails = self._fails.get(client)
        if fails is None:
            return None
        cutoff = self._clock() - self.window_s
        while fails and fails[0] < cutoff:
            fails.popleft()
        if not fails:
            del self._fails[client]
            return None
        return fails


class Redactor:
    """Masks secrets in text: the given tokens, and the value of any `token=` query parameter."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for s in self.secrets:
            value = value.replace(s, MASK)
        return _QUERY_TOKEN.sub(r"\1" + MASK, value)

    def argv(self, argv: list[str]) -> list[str]:
        """argv with the values of --auth-token (both spellings) and any secret masked."""
        out, mask_next = [], False
        for arg in argv:
            if mask_next:
                out.append(MASK)
                mask_next = False
                continue
            name, eq, _ = arg.partition("=")
            if name in TOKEN_FLAGS:
                out.append(f"{name}={MASK}" if eq else arg)
                mask_next = not eq
                continue
            out.append(self.text(arg))
        return out


class RedactingFilter(logging.Filter):
    """Masks secrets in the record's message and in its string arguments, keeping their shape
    (uvicorn's access formatter unpacks its five arguments itself)."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor

    def _mask(self, value: object) -> object:
        return self.redactor.text(value) if isinstance(value, str) else value

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._mask(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._mask(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._mask(v) for k, v in record.args.items()}
        return True


REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn")


def install_log_redaction(redactor: Redactor, handlers: Iterable[logging.Handler] = ()) -> RedactingFilter:
    """Mask secrets in what uvicorn logs (access lines carry ?token=) and in `handlers`."""
    f = RedactingFilter(redactor)
    for name in REDACTED_LOGGERS:
        logging.getLogger(name).addFilter(f)
    for h in handlers:
        h.addFilter(f)
    return f


def remove_log_redaction(f: logging.Filter, handlers: Iterable[logging.Handler] = ()) -> None:
    for name in REDACTED_LOGGERS:
        logging.getLogger(name).removeFilter(f)
    for h in handlers:
        h.removeFilter(f)
