"""The auth token (issue 27 item 4): read from a file or the environment, compared in constant time,
throttled per client, and never shown after start-up: not in /system_stats, the access log, or
/internal/logs."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import requests
import websocket
from fastapi.testclient import TestClient

from conftest import Live, build_app
from sd35fp8.errors import InputError
from sd35fp8.server.tokens import FailureThrottle, Redactor, read_token_file, resolve_token, token_matches

TOKEN = "s3cret-Token_value-9f8e7d"


def test_token_sources(tmp_path, caplog):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    os.chmod(f, 0o600)
    assert read_token_file(f) == TOKEN and resolve_token(None, f, env={}) == TOKEN
    assert resolve_token(None, None, env={"SD35FP8_AUTH_TOKEN": TOKEN}) == TOKEN
    assert resolve_token(None, None, env={}) is None
    with caplog.at_level(logging.WARNING, logger="sd35fp8.server.tokens"):
        assert resolve_token(TOKEN, None, env={}) == TOKEN
        os.chmod(f, 0o644)
        read_token_file(f)
    assert "visible to other local users" in caplog.text and "readable by other users" in caplog.text
    assert TOKEN not in caplog.text
    (tmp_path / "empty").write_text("\n")
    for bad in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(InputError):
            read_token_file(bad)
    with pytest.raises(InputError, match="not both"):
        resolve_token(TOKEN, f)


def test_serve_cli_reads_the_token_file(tmp_path, monkeypatch):
    """`sd35fp8 serve --auth-token-file F` hands serve() the file, not the token (argv stays clean)."""
    import importlib

    from sd35fp8 import cli

    seen = {}
    monkeypatch.setattr(importlib.import_module("sd35fp8.server.serve"), "serve", lambda **kw: seen.update(kw) or [])
    f = tmp_path / "token"
    f.write_text(TOKEN)
    assert cli.main(["serve", "--auth-token-file", str(f), "--device", "cpu", "--allow-host", "a.lan",
                     "--enable-cors-header", "--max-text-chars", "99"]) == 0
    assert seen["auth_token_file"] == str(f) and seen["auth_token"] is None
    assert seen["allow_hosts"] == ["a.lan"] and seen["cors_origin"] == "*" and seen["limits"].max_text_chars == 99


def test_constant_time_compare_and_throttle():
    assert token_matches(TOKEN, TOKEN) and not token_matches(TOKEN[:-1], TOKEN) and not token_matches(None, TOKEN)
    assert not token_matches("\udcff", TOKEN)  # a lone surrogate from a bad header does not raise
    now = [0.0]
    t = FailureThrottle(max_failures=3, window_s=10, max_clients=2, clock=lambda: now[0])
    for _ in range(3):
        assert t.retry_after("a") == 0
        t.failed("a")
    assert 9 < t.retry_after("a") <= 10 and t.retry_after("b") == 0
    now[0] = 10.5
    assert t.retry_after("a") == 0  # the window slid past the failures
    for c in "xyz":
        t.failed(c)
    assert len(t._fails) <= 2  # bounded memory under address spraying


def test_redactor():
    r = Redactor([TOKEN])
    assert r.argv(["sd35fp8", "serve", "--auth-token", TOKEN, "--port", "1"]) == \
        ["sd35fp8", "serve", "--auth-token", "***", "--port", "1"]
    assert r.argv(["x", f"--auth-token={TOKEN}"]) == ["x", "--auth-token=***"]
    assert r.text(f'"GET /ws?clientId=a&token={TOKEN} HTTP/1.1" 101') == '"GET /ws?clientId=a&token=*** HTTP/1.1" 101'
    assert r.text("GET /?token=guess123") == "GET /?token=***"  # wrong guesses are not logged either


def test_token_never_shown(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sd35fp8", "serve", "--auth-token", TOKEN])
    app = build_app(tmp_path, auth_token=TOKEN, allow_hosts=())
    access = []

    class Keep(logging.Handler):
        def emit(self, record):
            access.append(self.format(record))

    keep = Keep()
    try:
        with Live(app, log_level="info") as srv:
            logging.getLogger("uvicorn.access").addHandler(keep)  # after uvicorn configured its logging
            logging.getLogger("uvicorn.error").addHandler(keep)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            stats = requests.get(f"{srv.url}/system_stats", headers=auth, timeout=10)
            assert stats.status_code == 200 and TOKEN not in stats.text
            assert stats.json()["system"]["argv"] == ["sd35fp8", "serve", "--auth-token", "***"]
            r = requests.get(f"{srv.url}/queue?token={TOKEN}", timeout=10)
            assert r.status_code == 200 and "sd35fp8_token" in r.headers["set-cookie"]
            ws = websocket.create_connection(f"ws://{srv.host}/ws?clientId=t&token={TOKEN}", timeout=10)
            ws.recv()
            ws.close()
            logging.getLogger("sd35fp8.server.test").warning("a line with the token %s in it", TOKEN)
            logs = requests.get(f"{srv.url}/internal/logs", headers=auth, timeout=10).text
            raw = requests.get(f"{srv.url}/internal/logs/raw", headers=auth, timeout=10).text
        assert any("token=***" in line for line in access), access
        for text in (logs, raw, *access):
            assert TOKEN not in text
        assert "a line with the token *** in it" in logs
    finally:
        logging.getLogger("uvicorn.access").removeHandler(keep)
        logging.getLogger("uvicorn.error").removeHandler(keep)


def test_failed_attempts_are_throttled(tmp_path):
    app = build_app(tmp_path, auth_token=TOKEN)
    with TestClient(app) as c:
        codes = [c.get("/queue", headers={"Authorization": f"Bearer guess{i}"}).status_code for i in range(12)]
        assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
        r = c.get("/queue", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # locked out for the window
        assert c.get("/queue", headers={"Cookie": "sd35fp8_token=\"\\x; bad"}).status_code == 429
    with TestClient(build_app(tmp_path, auth_token=TOKEN)) as c:  # a fresh server: the right token works
        assert c.get("/queue", headers={"X-Auth-Token": TOKEN}).status_code == 200
        assert c.get("/queue", headers={"Cookie": "sd35fp8_token=\"\\x; bad"}).status_code == 401


def test_cli_token_hidden_from_ps(tmp_path):
    """`sd35fp8 serve --auth-token T` warns at start and rewrites the process title: /proc/<pid>/cmdline
    (what ps shows) no longer holds the token once the server starts (setproctitle)."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import importlib, os, sys
        from sd35fp8 import cli

        def fake_serve(**kw):
            with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
                print("CMDLINE", f.read().replace(b"\\0", b" ").decode().strip())
            print("GOT", kw["auth_token"] == sys.argv[sys.argv.index("--auth-token") + 1])
            return []

        importlib.import_module("sd35fp8.server.serve").serve = fake_serve
        raise SystemExit(cli.main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", code, "serve", "--auth-token", TOKEN, "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cmdline = next(line for line in r.stdout.splitlines() if line.startswith("CMDLINE"))
    assert TOKEN not in cmdline and "--auth-token ***" in cmdline, cmdline
    assert "GOT True" in r.stdout  # the server still gets the real token
    assert "--auth-token puts the token on the command line" in r.stderr and "title is now rewritten" in r.stderr
    assert TOKEN not in r.stderr
