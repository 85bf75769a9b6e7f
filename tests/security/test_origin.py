"""Origin, Host, Sec-Fetch-Site and content-type rules for HTTP and WebSocket (issue 27 item 3),
through TestClient and through a live uvicorn on 127.0.0.1 (real sockets, real headers)."""

from __future__ import annotations

import json

import pytest
import requests
import websocket
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from conftest import Live, build_app, fake_prompt, queued


def _post(c, headers: dict, body: dict | None = None):
    return c.post("/prompt", content=json.dumps(body or {"prompt": fake_prompt()}),
                  headers={"content-type": "application/json", **headers})


HOSTILE = [
    ({"origin": "http://localhost:3000", "host": "localhost:8188"}, "another local port"),
    ({"origin": "http://127.0.0.1:3000", "host": "127.0.0.1:8188"}, "another local port (IP)"),
    ({"origin": "http://evil.example", "host": "127.0.0.1:8188"}, "another site"),
    ({"origin": "null", "host": "127.0.0.1:8188"}, "opaque origin"),
    ({"origin": "http://[::1", "host": "127.0.0.1:8188"}, "malformed origin"),
    ({"sec-fetch-site": "cross-site", "host": "127.0.0.1:8188"}, "Sec-Fetch-Site"),
    ({"host": "evil.example"}, "DNS rebinding: a foreign Host"),
    ({"host": "evil.example:8188", "origin": "http://evil.example:8188"}, "DNS rebinding, same-origin page"),
    ({"host": "127.0.0.1:abc"}, "malformed Host"),
]
FRIENDLY = [
    {"host": "127.0.0.1:8188", "origin": "http://127.0.0.1:8188", "sec-fetch-site": "same-origin"},
    {"host": "localhost:8188", "origin": "http://localhost:8188"},
    {"host": "[::1]:8188", "origin": "http://[::1]:8188"},
    {"host": "localhost:8188", "origin": "http://localhost"},  # ComfyUI: a port on one side only is ignored
    {"host": "127.0.0.1:8188"},  # a script: no Origin
    {"host": "127.0.0.1:8188", "sec-fetch-site": "same-site"},
]


@pytest.mark.parametrize("headers, what", HOSTILE, ids=[w for _, w in HOSTILE])
def test_hostile_http_and_ws_are_refused(client, headers, what):
    r = _post(client, headers)
    assert r.status_code == 403, (what, r.status_code)
    assert r.json()["error"]["type"] in ("forbidden_origin", "forbidden_host")
    with pytest.raises(WebSocketDisconnect) as e:
        with client.websocket_connect("/ws?clientId=x", headers=headers) as ws:
            ws.receive_json()
    assert e.value.code == 1008
    assert queued(client) == 0


@pytest.mark.parametrize("headers", FRIENDLY)
def test_same_origin_http_and_ws_pass(client, headers):
    assert _post(client, headers).status_code == 200
    with client.websocket_connect("/ws?clientId=y", headers=headers) as ws:
        assert ws.receive_json()["type"] == "status"


def test_preflight_free_post_is_refused(client):
    """text/plain (or form, or typeless) POSTs are what a page may send cross-site without a preflight;
    a browser marks them with Origin / Sec-Fetch-*, even when (CORS mode, or an old browser) the origin
    checks let them through."""
    for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = client.post("/prompt", content=json.dumps({"prompt": fake_prompt()}),
                        headers={"content-type": ctype, "origin": "http://testserver", "sec-fetch-site": "same-origin"})
        assert r.status_code == 415, ctype
    assert queued(client) == 0


def test_cors_mode_still_refuses_preflight_free_posts(tmp_path):
    with TestClient(build_app(tmp_path, cors_origin="*")) as c:
        r = c.post("/prompt", content=json.dumps({"prompt": fake_prompt()}),
                   headers={"content-type": "text/plain", "origin": "http://any.example", "sec-fetch-site": "cross-site"})
        assert r.status_code == 415 and queued(c) == 0


def test_allow_host(tmp_path):
    app = build_app(tmp_path, allow_hosts=("testserver", "studio.lan"))
    with TestClient(app) as c:
        assert _post(c, {"host": "studio.lan:8188", "origin": "http://studio.lan:8188"}).status_code == 200
        assert _post(c, {"host": "other.lan:8188"}).status_code == 403


def test_non_loopback_listen_skips_the_host_list_but_not_origin(tmp_path):
    app = build_app(tmp_path, allow_hosts=(), loopback=False)
    with TestClient(app) as c:
        assert _post(c, {"host": "gpu-box:8188"}).status_code == 200
        assert _post(c, {"host": "gpu-box:8188", "origin": "http://evil.example"}).status_code == 403
        assert _post(c, {"host": "gpu-box:8188", "sec-fetch-site": "cross-site"}).status_code == 403


def test_enable_cors_header(tmp_path):
    """ComfyUI --enable-cors-header ORIGIN: CORS headers on every answer, preflight answered, the origin
    checks off (the Host list stays: DNS rebinding is about the Host, not the page)."""
    app = build_app(tmp_path, cors_origin="http://tool.example")
    with TestClient(app) as c:
        pre = c.options("/prompt", headers={"origin": "http://tool.example",
                                            "access-control-request-method": "POST"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "http://tool.example"
        assert "POST" in pre.headers["access-control-allow-methods"]
        r = _post(c, {"origin": "http://tool.example", "sec-fetch-site": "cross-site"})
        assert r.status_code == 200 and r.headers["access-control-allow-credentials"] == "true"
        assert _post(c, {"host": "evil.example"}).status_code == 403


def test_live_server_http_and_websocket(tmp_path):
    """The same rules over real sockets: uvicorn's own header parsing, a real WebSocket handshake."""
    with Live(build_app(tmp_path, allow_hosts=())) as srv:
        ok = requests.post(f"{srv.url}/prompt", json={"prompt": fake_prompt()},
                           headers={"Origin": srv.url}, timeout=10)
        assert ok.status_code == 200
        for headers in ({"Origin": "http://localhost:3000"}, {"Sec-Fetch-Site": "cross-site"},
                        {"Host": "rebind.evil.example"}, {"Origin": "null"}):
            r = requests.post(f"{srv.url}/prompt", json={"prompt": fake_prompt()}, headers=headers, timeout=10)
            assert r.status_code == 403, headers
        r = requests.post(f"{srv.url}/prompt", data=json.dumps({"prompt": fake_prompt()}),
                          headers={"Content-Type": "text/plain", "Origin": srv.url}, timeout=10)
        assert r.status_code == 415

        ws = websocket.create_connection(f"ws://{srv.host}/ws?clientId=live", origin=srv.url, timeout=10)
        assert json.loads(ws.recv())["type"] == "status"
        ws.close()
        for kwargs in ({"origin": "http://localhost:3000"}, {"origin": "http://evil.example"},
                       {"host": "rebind.evil.example"}, {"header": ["Sec-Fetch-Site: cross-site"]}):
            with pytest.raises(websocket.WebSocketBadStatusException) as e:
                websocket.create_connection(f"ws://{srv.host}/ws?clientId=bad", timeout=10, **kwargs)
            assert e.value.status_code == 403, kwargs
