"""The ComfyUI web UI (optional `comfyui-frontend-package` wheel) and the routes it needs to boot.

The wheel's module `comfyui_frontend_package` holds the built UI in `static/` (index.html, assets/).
Install it with `pip install sd35fp8[ui]` (or `pip install comfyui-frontend-package`); without it,
`/` answers with a page that says so and the API works as before.

Boot-time routes served here (minimal and correct for one local user):
/users, /settings[/{id}], /userdata (list, get, post, delete, move) stored under `user_dir`,
/i18n, /global_subgraphs, /node_replacements, /features (from app.py); /workflow_templates is
server/templates.py's.
"""

from __future__ import annotations

import json
import mimetypes
import os
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from sd35fp8.errors import InputError
from sd35fp8.server.validation import RequestError, read_json
from sd35fp8.workflow.folders import safe_relative_name

MISSING_UI_PAGE = """<!doctype html><html><head><title>sd35fp8</title></head><body>
<h1>sd35fp8 ComfyUI-compatible server</h1>
<p>The web UI is not installed. Install it with <code>pip install "sd35fp8[ui]"</code>
(the <code>comfyui-frontend-package</code> wheel) and restart the server.</p>
<p>The API works without it: <code>POST /prompt</code>, <code>GET /ws</code>, <code>GET /history</code>,
<code>GET /object_info</code>, ...</p></body></html>"""

MAX_USERDATA_BYTES = 32 * 1024 * 1024
# types a browser runs or renders as a document: a user file of one of these is served as bytes
ACTIVE_TYPES = {"text/html", "application/xhtml+xml", "text/javascript", "application/javascript",
                "application/x-javascript", "application/ecmascript", "text/css", "image/svg+xml", "text/xml",
                "application/xml", "message/rfc822"}


def frontend_static_dir() -> Path | None:
    """The wheel's static/ folder, or None when comfyui-frontend-package is not installed."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    static = Path(comfyui_frontend_package.__file__).parent / "static"
    return static if (static / "index.html").is_file() else None


def frontend_version() -> str | None:
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    return getattr(comfyui_frontend_package, "__version__", None)


def mount_frontend(app: FastAPI) -> Path | None:
    """Serve the UI at / (after every API route); a clear page when the wheel is missing."""
    static = frontend_static_dir()
    if static is None:
        @app.get("/", include_in_schema=False)
        async def missing_ui() -> HTMLResponse:
            return HTMLResponse(MISSING_UI_PAGE)
        return None

    @app.get("/user.css", include_in_schema=False)
    async def user_css() -> Response:
        return Response("", media_type="text/css")  # index.html links it; no user styles here

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/", StaticFiles(directory=static, html=True), name="frontend")
    return static


class UserStore:
    """One local user's settings and files (ComfyUI's user/default folder)."""

    def __init__(self, user_dir: str | os.PathLike):
        self.root = Path(user_dir).resolve() / "default"

    @property
    def settings_path(self) -> Path:
        return self.root / "comfy.settings.json"

    def settings(self) -> dict:
        if not self.settings_path.is_file():
            return {}
        try:
            return json.loads(self.settings_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"settings file {self.settings_path} is not valid JSON: {e}") from e

    def save_settings(self, settings: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.settings_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=4), encoding="utf-8")
        tmp.replace(self.settings_path)

    def path(self, name: str) -> Path:
        """A file under the user folder; names that climb out raise InputError."""
        rel = safe_relative_name(name, "user data path")
        try:
            path = (self.root / rel).resolve()
        except (OSError, ValueError) as e:  # a name the filesystem refuses (too deep, ...)
            raise InputError(f"invalid user data path {name[:80]!r}: {e}") from e
        if os.path.commonpath((self.root, path)) != str(self.root):
            raise InputError(f"user data path escapes the user folder: {name!r}")
        return path

    def listing(self, directory: str, recurse: bool, full_info: bool, split: bool) -> list:
        base = self.path(directory)
        try:
            found = base.is_dir()
        except OSError as e:  # ENAMETOOLONG and the like: no such folder can exist
            raise InputError(f"invalid user data folder {directory[:80]!r}: {e.strerror or e}") from e
        if not found:
            raise FileNotFoundError(directory)
        files = sorted(base.rglob("*") if recurse else base.glob("*"))
        out: list = []
        for f in files:
            if not f.is_file():
                continue
            rel = f.relative_to(base).as_posix()
            if full_info:
                st = f.stat()
                out.append({"path": rel, "size": st.st_size, "modified": int(st.st_mtime * 1000),
                            "created": int(st.st_ctime * 1000)})
            elif split:
                out.append([rel, *rel.split("/")])
            else:
                out.append(rel)
        return out

    def info(self, path: Path) -> dict:
        st = path.stat()
        return {"path": path.relative_to(self.root).as_posix(), "size": st.st_size,
                "modified": int(st.st_mtime * 1000), "created": int(st.st_ctime * 1000)}


def _flag(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    return default if value is None else value.lower() in ("1", "true", "yes")


def _user_path(store: UserStore, name: str) -> Path:
    try:
        return store.path(name)
    except InputError as e:
        raise HTTPException(400, str(e)) from e


def frontend_routes(store: UserStore) -> APIRouter:
    r = APIRouter()

    @r.get("/users")
    async def users() -> dict:
        return {"storage": "server", "migrated": True}

    @r.post("/users")
    async def create_user() -> JSONResponse:
        return JSONResponse({"error": "this server has one local user ('default')"}, status_code=400)

    @r.get("/settings")
    async def get_settings() -> dict:
        return store.settings()

    @r.post("/settings")
    async def post_settings(request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise RequestError(400, "invalid_request", "settings must be a JSON object")
        store.save_settings({**store.settings(), **body})
        return Response(status_code=200)

    @r.get("/settings/{setting_id}")
    async def get_setting(setting_id: str) -> JSONResponse:
        return JSONResponse(store.settings().get(setting_id))

    @r.post("/settings/{setting_id}")
    async def post_setting(setting_id: str, request: Request) -> Response:
        settings = store.settings()
        settings[setting_id] = await read_json(request)
        store.save_settings(settings)
        return Response(status_code=200)

    @r.get("/userdata")
    async def list_userdata(request: Request, dir: str = "") -> Any:  # noqa: A002 - ComfyUI's name
        if not dir:
            raise HTTPException(400, "dir is required")
        try:
            # ComfyUI: bare relative paths unless split=true (comfyui-skill-cli lists ?dir=workflows so)
            return store.listing(dir, _flag(request, "recurse", False), _flag(request, "full_info", False),
                                 _flag(request, "split", False))
        except InputError as e:
            raise HTTPException(400, str(e)) from e
        except FileNotFoundError:
            return JSONResponse([], status_code=404)

    @r.get("/userdata/{file:path}")
    async def get_userdata(file: str) -> FileResponse:
        path = _user_path(store, file)
        if not path.is_file():
            raise HTTPException(404, f"no user file {file!r}")
        # ComfyUI getuserdata: user files never render in the app's origin (stored XSS): an attachment, not
        # sniffed, a type that runs in a page (HTML, script, CSS, SVG, XML) sent as bytes; user.css is the exception
        if path == store.root / "user.css":
            return FileResponse(path, media_type="text/css", headers={"X-Content-Type-Options": "nosniff"},
                                content_disposition_type="inline")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if media.split(";")[0].strip().lower() in ACTIVE_TYPES or media.endswith(("+xml", "/xml")):
            media = "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff",
                                                             "Content-Disposition": "attachment"})

    @r.post("/userdata/{file:path}")
    async def post_userdata(file: str, request: Request) -> Any:
        if "/move/" in file:
            src, _, dest = file.partition("/move/")
            return _move(store, src, dest, _flag(request, "overwrite", True), _flag(request, "full_info", False))
        path = _user_path(store, file)
        if path.exists() and not _flag(request, "overwrite", True):
            raise HTTPException(409, f"user file {file!r} exists")
        body = await request.body()
        if len(body) > MAX_USERDATA_BYTES:
            raise HTTPException(413, f"user file larger than {MAX_USERDATA_BYTES} bytes")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        return store.info(path) if _flag(request, "full_info", False) else path.relative_to(store.root).as_posix()

    @r.delete("/userdata/{file:path}")
    async def delete_userdata(file: str) -> Response:
        path = _user_path(store, file)
        if not path.is_file():
            raise HTTPException(404, f"no user file {file!r}")
        path.unlink()
        return Response(status_code=204)

    async def nothing() -> dict:
        return {}

    # frontend catalogues this engine has none of: translations, subgraphs, node replacements
    for path in ("/i18n", "/global_subgraphs", "/node_replacements"):
        r.add_api_route(path, nothing, methods=["GET"], name=path.strip("/"))

    return r


def _move(store: UserStore, src: str, dest: str, overwrite: bool, full_info: bool) -> Any:
    a, b = _user_path(store, src), _user_path(store, dest)
    if not a.is_file():
        raise HTTPException(404, f"no user file {src!r}")
    if b.exists() and not overwrite:
        raise HTTPException(409, f"user file {dest!r} exists")
    b.parent.mkdir(parents=True, exist_ok=True)
    a.replace(b)
    os.utime(b, (time.time(), time.time()))
    return store.info(b) if full_info else b.relative_to(store.root).as_posix()
