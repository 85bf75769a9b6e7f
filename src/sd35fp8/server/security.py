"""Who may talk to the server: one ASGI middleware for HTTP and WebSocket alike.

Checks, in order (each refusal is ComfyUI's JSON error shape; a WebSocket is closed before accept,
which the client sees as HTTP 403):
1. Host allow-list (DNS rebinding): when listening on loopback, the Host header must name a
   loopback address (localhost, 127.0.0.0/8, ::1) or a host given with --allow-host ('*' = any).
2. Browser origin, as ComfyUI's origin_only_middleware, stricter: `Sec-Fetch-Site: cross-site` is
   refused; an Origin must equal the Host as host:port (a page on another local port is another
   origin; ports are compared when both carry one, as ComfyUI does); an opaque `Origin: null` is
   refused. With `cors_origin` (--enable-cors-header [ORIGIN], as ComfyUI) these origin checks are
   replaced by CORS headers on every response and preflight OPTIONS answered 200.
3. Auth token (when set): `Authorization: Bearer`, `X-Auth-Token`, `?token=` or the HttpOnly
   cookie set when a browser first opens `/?token=`; compared in constant time; failed attempts
   throttled per client address (429 + Retry-After).
4. Body size: a declared Content-Length over the route's limit is 413 before the route runs; a
   streamed body is cut off at the limit (413 as well).
JSON Content-Type on state-changing JSON routes is checked by validation.read_json.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sd35fp8.errors import InputError
from sd35fp8.server.tokens import FailureThrottle, token_matches

log = logging.getLogger(__name__)

TOKEN_COOKIE = "sd35fp8_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
CORS_METHODS = b"POST, GET, DELETE, PUT, OPTIONS, PATCH"  # ComfyUI create_cors_middleware
CORS_HEADERS = b"Content-Type, Authorization, X-Auth-Token"


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
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
        "prompts and read your outputs. Pass an auth token (--auth-token-file, or SD35FP8_AUTH_TOKEN) or "
        "insecure=True (--insecure) if the network is trusted.")


def split_host(value: str) -> tuple[str, int | None] | None:
    """('host', port) of a Host header or an origin URL; None when it does not parse."""
    try:
        parts = urlsplit(value if "//" in value else f"//{value}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:  # a port that is not a number, a bad IPv6 literal
        return None


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes its route's limit."""


class SecurityMiddleware:
    """Host allow-list, origin rules (or CORS), auth token with throttling, body-size bound."""

    def __init__(self, app: Any, auth_token: str | None = None, loopback: bool = True,
                 allow_hosts: Iterable[str] = (), cors_origin: str | None = None,
                 body_limit: Callable[[str], int] | None = None, throttle: FailureThrottle | None = None):
        self.app = app
        self.token = auth_token
        self.loopback = loopback
        self.allow_hosts = {h.lower().strip("[]") for h in allow_hosts}
        self.cors_origin = cors_origin
        self.body_limit = body_limit
        self.throttle = throttle or FailureThrottle()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        reason = self._host_refused(headers)
        if reason:
            return await _deny(scope, send, 403, "forbidden_host", reason)
        if self.cors_origin is not None:
            send = self._with_cors(send)
            if scope["type"] == "http" and scope["method"] == "OPTIONS":  # preflight: answered, no token
                return await _respond(send, 200, b"", [])
        else:
            reason = self._origin_refused(headers)
            if reason:
                log.warning("refused a cross-origin %s to %s: %s", scope["type"], scope.get("path"), reason)
                return await _deny(scope, send, 403, "forbidden_origin", reason)
        if self.token is not None:
            client = (scope.get("client") or ("unknown", 0))[0]
            wait = self.throttle.retry_after(client)
            if wait > 0:
                return await _deny(scope, send, 429, "too_many_auth_failures",
                                   "too many failed auth attempts; retry later",
                                   [(b"retry-after", str(int(wait) + 1).encode())])
            given, from_query = self._token_of(scope, headers)
            if not token_matches(given, self.token):
                self.throttle.failed(client)
                return await _deny(scope, send, 401, "unauthorized", "missing or wrong auth token",
                                   [(b"www-authenticate", b"Bearer")])
            if from_query and scope["type"] == "http":
                send = self._with_cookie(send)
        if scope["type"] == "http" and scope["method"] in BODY_METHODS and self.body_limit is not None:
            return await self._bounded(scope, receive, send, headers)
        return await self.app(scope, receive, send)

    # ---- checks -------------------------------------------------------------------------------
    def _host_refused(self, headers: dict[str, str]) -> str | None:
        if "*" in self.allow_hosts or (not self.loopback and not self.allow_hosts):
            return None
        host = headers.get("host")
        parsed = split_host(host) if host else None
        if parsed is None or not parsed[0]:
            return "missing or malformed Host header"
        name = parsed[0].strip("[]")
        if (self.loopback and is_loopback(name)) or name in self.allow_hosts:
            return None
        return (f"Host {name!r} is not served here (DNS rebinding guard); start the server with "
                f"--allow-host {name} if this name is yours")

    @staticmethod
    def _origin_refused(headers: dict[str, str]) -> str | None:
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return "Sec-Fetch-Site: cross-site"
        origin, host = headers.get("origin"), headers.get("host")
        if origin is None:
            return None  # not a browser, or a same-origin GET (browsers send Origin on POST and WS)
        if origin.strip().lower() == "null":
            return "opaque Origin 'null' (a file:// page, sandboxed frame or cross-site redirect)"
        o, h = split_host(origin), split_host(host or "")
        if o is None or h is None or not o[0]:
            return f"malformed Origin {origin!r}"
        if o[0] != h[0] or (o[1] is not None and h[1] is not None and o[1] != h[1]):
            return f"Origin {origin!r} does not match Host {host!r}"
        return None

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
            try:
                morsel = SimpleCookie(headers["cookie"]).get(TOKEN_COOKIE)
            except CookieError:
                return None, False
            if morsel is not None:
                return morsel.value, False
        return None, False

    # ---- response wrappers ----------------------------------------------------------------------
    def _with_cookie(self, send: Any) -> Any:
        cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")
        return _add_headers(send, [(b"set-cookie", cookie)])

    def _with_cors(self, send: Any) -> Any:
        return _add_headers(send, [(b"access-control-allow-origin", self.cors_origin.encode("latin-1")),
                                   (b"access-control-allow-methods", CORS_METHODS),
                                   (b"access-control-allow-headers", CORS_HEADERS),
                                   (b"access-control-allow-credentials", b"true")])

    async def _bounded(self, scope: dict, receive: Any, send: Any, headers: dict[str, str]) -> None:
        limit = self.body_limit(scope.get("path", ""))
        declared = headers.get("content-length", "")
        if declared and (not declared.isdigit() or int(declared) > limit):
            return await _deny(scope, send, 413, "body_too_large", "Request body is too large",
                               [], details=f"Content-Length {declared}; the limit is {limit} bytes")
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await _deny(scope, send, 413, "body_too_large", "Request body is too large", [],
                            details=f"more than {limit} bytes")


def _add_headers(send: Any, extra: list[tuple[bytes, bytes]]) -> Any:
    async def wrapped(message: dict) -> None:
        if message["type"] in ("http.response.start", "websocket.http.response.start"):
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


async def _respond(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _deny(scope: dict, send: Any, status: int, type_: str, reason: str,
                headers: list[tuple[bytes, bytes]] = (), details: str = "") -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
        return
    if scope.get("path", "").startswith("/v1/"):  # the OpenAI API's clients read OpenAI's error shape
        message = f"{reason} ({details})" if details else reason
        code = "invalid_api_key" if status == 401 else type_
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
    else:
        body = json.dumps({"error": {"type": type_, "message": reason, "details": details, "extra_info": {}},
                           "node_errors": {}}).encode()
    await _respond(send, status, body, [(b"content-type", b"application/json"), *headers])
