"""uvicorn's HTTP/1.1 protocol with a request-header deadline (slowloris, half-open connections).

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but waits forever for the first
request's headers, and any byte resets its keep-alive timer. `HeaderTimeoutH11Protocol` closes a
connection whose request headers are not complete `header_timeout` seconds after it opened or after
its previous response ended, however slowly bytes trickle in; a connection upgraded to a WebSocket
leaves the deadline behind. `uvicorn_options` gathers the
connection settings `serve()` passes to uvicorn.Config.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_S = 5
DEFAULT_MAX_CONNECTIONS = 256


class HeaderTimeoutH11Protocol(H11Protocol):
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._seen_cycle = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.cycle is self._seen_cycle and not self.transport.is_closing():
            self.transport.close()  # no complete request since the timer started

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._seen_cycle:  # a new request's headers are in
            self._seen_cycle = self.cycle
            self._disarm()

    def handle_websocket_upgrade(self, event: Any) -> None:
        """The connection becomes a WebSocket's (its own protocol, pings and close): no header deadline."""
        self._disarm()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        finished = self.cycle
        super().on_response_complete()  # may start a pipelined request (handle_events)
        if not self.transport.is_closing() and self.cycle is finished:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_with_timeout(header_timeout: float) -> type[HeaderTimeoutH11Protocol]:
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": float(header_timeout)})


def uvicorn_options(header_timeout: float = DEFAULT_HEADER_TIMEOUT_S, keep_alive: int = DEFAULT_KEEP_ALIVE_S,
                    max_connections: int = DEFAULT_MAX_CONNECTIONS) -> dict[str, Any]:
    """uvicorn.Config keywords: header deadline, keep-alive timeout, and a cap on concurrent
    connections and tasks (uvicorn answers 503 beyond it)."""
    return {"http": protocol_with_timeout(header_timeout), "timeout_keep_alive": int(keep_alive),
            "limit_concurrency": int(max_connections)}

