"""GET /view and POST /upload/image: files in output/, input/, temp/, never outside them.

/view?filename&subfolder&type: type is output (default), input or temp; a filename with a
separator or '..', or a subfolder that resolves (symlinks included) outside its folder, is refused.
/upload/image (multipart: image, overwrite, type, subfolder): the body is read with a size bound,
the file must decode as an image, and an existing name gets ' (1)' ... unless overwrite is set
(an identical existing file is reused, as ComfyUI does). Returns {name, subfolder, type}.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.requests import Request as StarletteRequest

from sd35fp8.workflow.folders import FOLDER_TYPES, ModelFolders, split_annotation
_FORM_OVERHEAD = 64 * 1024  # multipart headers and the small fields next to the image


def _fail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": "invalid_file", "message": message, "details": "", "extra_info": {}}},
                        status_code=status)


def resolve_inside(root: Path, subfolder: str, filename: str | None = None) -> Path | None:
    """root/subfolder[/filename] with symlinks resolved, or None when it leaves root."""
    root = root.resolve()
    parts = [p for p in subfolder.replace("\\", "/").split("/") if p not in ("", ".")]
    if os.path.isabs(subfolder) or ".." in parts:
        return None
    path = root.joinpath(*parts)
    if filename is not None:
        path = path / filename
    path = path.resolve()
    if os.path.commonpath((str(root), str(path))) != str(root):
        return None
    return path


def valid_filename(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") \
        and ".." not in name and "\0" not in name and not os.path.isabs(name)


async def read_bounded(request: Request, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def add_routes(r: APIRouter, folders: ModelFolders, max_upload_bytes: int) -> None:
    @r.get("/view")
    async def view(filename: str = "", subfolder: str = "", type: str = "output") -> Response:  # noqa: A002
        filename, type = split_annotation(filename, type)  # ComfyUI: 'x.png [input]' names its folder
        if not valid_filename(filename):
            return _fail(400, f"invalid filename {filename!r}")
        root = folders.folder_of(type)
        if root is None:
            return _fail(400, f"type must be one of {', '.join(FOLDER_TYPES)}, got {type!r}")
        path = resolve_inside(root, subfolder, filename)
        if path is None:
            return _fail(403, "path is outside the allowed folder")
        if not path.is_file():
            return _fail(404, f"file not found: {filename!r} in {type}/{subfolder}".rstrip("/"))
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"Content-Disposition": f'filename="{path.name}"'})

    @r.post("/upload/image")
    async def upload_image(request: Request) -> JSONResponse:
        body = await read_bounded(request, max_upload_bytes + _FORM_OVERHEAD)
        if body is None:
            return _fail(413, f"upload larger than the limit of {max_upload_bytes} bytes")

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        form = await StarletteRequest(request.scope, receive).form(max_files=1, max_fields=16)
        image = form.get("image")
        if not isinstance(image, UploadFile):
            return _fail(400, "multipart field 'image' (a file) is required")
        data = await image.read()
        if len(data) > max_upload_bytes:
            return _fail(413, f"upload larger than the limit of {max_upload_bytes} bytes")
        folder_type = str(form.get("type") or "input")
        subfolder = str(form.get("subfolder") or "")
        overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
        name = image.filename or ""
        if not valid_filename(name):
            return _fail(400, f"invalid filename {name!r}")
        root = folders.folder_of(folder_type)
        if root is None:
            return _fail(400, f"type must be one of {', '.join(FOLDER_TYPES)}, got {folder_type!r}")
        target_dir = resolve_inside(root, subfolder)
        if target_dir is None:
            return _fail(403, "subfolder is outside the allowed folder")
        error = _image_error(data)
        if error:
            return _fail(400, f"{name!r} is not a readable image: {error}")
        target_dir.mkdir(parents=True, exist_ok=True)
        final = _free_name(target_dir, name, data, overwrite)
        if not final.exists():
            final.write_bytes(data)
        return JSONResponse({"name": final.name, "subfolder": subfolder, "type": folder_type})


def _image_error(data: bytes) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def _free_name(folder: Path, name: str, data: bytes, overwrite: bool) -> Path:
    """ComfyUI: overwrite, reuse an identical file, or pick 'name (i).ext'."""
    path = folder / name
    if overwrite or not path.exists():
        if overwrite and path.exists():
            path.unlink()
        return path
    digest = hashlib.sha256(data).digest()
    stem, ext = os.path.splitext(name)
    i = 1
    while path.exists():
        if hashlib.sha256(path.read_bytes()).digest() == digest:
            return path
        path = folder / f"{stem} ({i}){ext}"
        i += 1
    return path
