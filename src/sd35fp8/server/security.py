"""Who may talk to the server, and the `serve()` entry point.

- Binds 127.0.0.1 by default. Any other address needs an auth token, or insecure=True said out loud.
- With a token, every HTTP request and WebSocket needs it: `Authorization: Bearer <token>`, the
  `X-Auth-Token` header, `?token=<token>`, or the cookie set when a browser first opens
  `/?token=<token>` (so the web UI, which cannot add headers, works).
- Browser CSRF guard (ComfyUI's origin-only middleware): a request whose Origin host differs from
  its Host is refused when the server listens on loopback.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sd35fp8.errors import InputError

log = logging.getLogger(__name__)

TOKEN_COOKIE = "sd35fp8_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, auth_token: str | None, insecure: bool) -> None:
    """Refuse to expose the server beyond this machine without a token (or insecure=True)."""
    if is_loopback(listen) or auth_token or insecure:
        return
    raise InputError(
        f"refusing to listen on {listen!r} without authentication: anyone who can reach it could run "
        "prompts and read your outputs. Pass an auth token (--auth-token, or SD35FP8_AUTH_TOKEN) or "
        "insecure=True (--insecure) if the network is trusted.")


def _host_of(value: str) -> str:
    return (urlsplit(value if "//" in value else f"//{value}").hostname or "").lower()


class SecurityMiddleware:
    """ASGI middleware: token check (HTTP + WebSocket) and the loopback Origin check."""

    def __init__(self, app: Any, auth_token: str | None = None, loopback: bool = True):
        self.app = app
        self.token = auth_token
        self.loopback = loopback

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.loopback and not self._origin_ok(headers):
            return await self._deny(scope, send, 403, "cross-origin request refused")
        if self.token is None:
            return await self.app(scope, receive, send)
        given, from_query = self._token_of(scope, headers)
        if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            return await self._deny(scope, send, 401, "missing or wrong auth token")
        if from_query and scope["type"] == "http":
            return await self.app(scope, receive, self._with_cookie(send))
        return await self.app(scope, receive, send)

    @staticmethod
    def _origin_ok(headers: dict[str, str]) -> bool:
        origin, host = headers.get("origin"), headers.get("host")
        if not origin or not host:
            return True
        o, h = _host_of(origin), _host_of(host)
        return o == h or (is_loopback(o) and is_loopback(h))

    @staticmethod
    def _token_of(scope: dict, headers: dict[str, str]) -> tuple[str | None, bool]:
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        if "x-auth-token" in headers:
            return headers["x-auth-token"], False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            return query["token"][0], True
        if "cookie" in headers:
            morsel = SimpleCookie(headers["cookie"]).get(TOKEN_COOKIE)
            if morsel is not None:
                return morsel.value, False
        return None, False

    def _with_cookie(self, send: Any) -> Any:
        cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return wrapped

    @staticmethod
    async def _deny(scope: dict, send: Any, status: int, reason: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        body = json.dumps({"error": {"type": "unauthorized" if status == 401 else "forbidden",
                                     "message": reason, "details": "", "extra_info": {}}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
