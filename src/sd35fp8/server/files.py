"""GET /view and POST /upload/image: files in output/, input/, temp/, never outside them.

/view?filename&subfolder&type: type is output (default), input or temp; a filename with a
separator or '..', a name or path longer than the file system allows, or a subfolder that resolves
(symlinks included) outside its folder, is refused. The content type comes from the file's actual
format, never its name: a PNG, JPEG, WebP, GIF or BMP is served inline as that image type; anything
else (a polyglot named .html, a .latent, ...) as application/octet-stream attachment. Every answer
carries `X-Content-Type-Options: nosniff` and a CSP that runs nothing (`default-src 'none'; sandbox`).
ComfyUI's conversions of an image: `preview=webp|jpeg[;quality]` (the UI's Comfy.PreviewFormat setting) and
`channel=rgb|a` (the mask editor's colour and mask layers), within the upload pixel cap (view_converted).
/upload/image (multipart: image, overwrite, type, subfolder): the body is read with a size bound,
the image header must declare at most `max_pixels` pixels (no decompression bomb) and the file must
verify as an image; an existing name gets ' (1)' ... unless overwrite is set (an identical existing
file is reused, as ComfyUI does). The file is written to a temporary name and renamed, so a full
disk (507) or an unwritable folder (500, with the reason) leaves no partial file. Returns
{name, subfolder, type}.
/upload/mask (the same fields plus original_ref, JSON {filename, type, subfolder}; ComfyUI's mask
editor): stores the original image as RGBA with the uploaded image's alpha (ComfyUI's alpha copy, PNG
text chunks kept); a missing original is a 404 naming it (ComfyUI answers 200 and writes nothing).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.requests import Request as StarletteRequest

from sd35fp8.workflow.folders import FOLDER_TYPES, ModelFolders, split_annotation

NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, apfs, ntfs)
PATH_MAX = 4096
DEFAULT_MAX_UPLOAD_PIXELS = 8192 * 8192
IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
               "BMP": "image/bmp"}  # formats a browser shows as an image, never as a document
VIEW_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
                "Cross-Origin-Resource-Policy": "same-origin"}
FORM_OVERHEAD = 64 * 1024  # multipart headers and the small fields next to the image


def _fail(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": "invalid_file", "message": message, "details": "", "extra_info": {}}},
                        status_code=status)


def resolve_inside(root: Path, subfolder: str, filename: str | None = None) -> Path | None:
    """root/subfolder[/filename] with symlinks resolved, or None when it leaves root."""
    root = root.resolve()
    parts = [p for p in subfolder.replace("\\", "/").split("/") if p not in ("", ".")]
    if os.path.isabs(subfolder) or ".." in parts or not all(_fits(p) for p in parts):
        return None
    path = root.joinpath(*parts)
    if filename is not None:
        path = path / filename
    if len(os.fsencode(str(path))) > PATH_MAX:
        return None
    try:
        path = path.resolve()
    except (OSError, RuntimeError):  # ENAMETOOLONG, ELOOP, a symlink loop
        return None
    if os.path.commonpath((str(root), str(path))) != str(root):
        return None
    return path


def _fits(component: str) -> bool:
    try:
        return len(component.encode("utf-8")) <= NAME_MAX and "\0" not in component
    except UnicodeEncodeError:  # a lone surrogate
        return False


def valid_filename(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") \
        and ".." not in name and _fits(name) and not os.path.isabs(name)


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


def add_routes(r: APIRouter, folders: ModelFolders, max_upload_bytes: int,
               max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS) -> None:
    @r.get("/view")
    async def view(filename: str = "", subfolder: str = "", type: str = "output",  # noqa: A002
                   preview: str | None = None, channel: str | None = None) -> Response:
        filename, type = split_annotation(filename, type)  # ComfyUI: 'x.png [input]' names its folder
        if not valid_filename(filename):
            return _fail(400, f"invalid filename {filename[:300]!r}")
        root = folders.folder_of(type)
        if root is None:
            return _fail(400, f"type must be one of {', '.join(FOLDER_TYPES)}, got {type[:100]!r}")
        path = resolve_inside(root, subfolder, filename)
        if path is None:
            return _fail(403, "path is outside the allowed folder")
        if not path.is_file():
            return _fail(404, f"file not found: {filename!r} in {type}/{subfolder}".rstrip("/"))
        media = image_type(path)
        if media and (preview is not None or channel in ("rgb", "a")):
            converted = await asyncio.to_thread(bounded_decode, view_converted, path, preview, channel,
                                                max_upload_pixels)
            if isinstance(converted, str):
                return _fail(400, f"cannot convert {filename!r}: {converted}")
            data, converted_media = converted
            return Response(data, media_type=converted_media,
                            headers={**VIEW_HEADERS, "Content-Disposition": inline_disposition(path.name)})
        disposition = "inline" if media else "attachment"
        return FileResponse(path, media_type=media or "application/octet-stream", filename=path.name,
                            content_disposition_type=disposition, headers=dict(VIEW_HEADERS))

    @r.post("/upload/image")
    async def upload_image(request: Request) -> JSONResponse:
        return await _upload(request, folders, max_upload_bytes, max_upload_pixels, mask=False)

    @r.post("/upload/mask")
    async def upload_mask(request: Request) -> JSONResponse:
        return await _upload(request, folders, max_upload_bytes, max_upload_pixels, mask=True)


async def _upload(request: Request, folders: ModelFolders, max_upload_bytes: int, max_upload_pixels: int,
                  mask: bool) -> JSONResponse:
    """/upload/image, and /upload/mask (ComfyUI server.py upload_mask: the stored file is the image named
    by `original_ref` {filename, type (default output), subfolder} as RGBA with the uploaded image's
    alpha as its alpha, PNG text chunks kept; the mask editor posts it, LoadImage reads it back as MASK)."""
    body = await read_bounded(request, max_upload_bytes + FORM_OVERHEAD)
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
    overwrite = form.get("overwrite") in ("true", "1")  # ComfyUI: exactly these strings ("True" does not overwrite)
    name = image.filename or ""
    if not valid_filename(name):
        return _fail(400, f"invalid filename {name[:300]!r} (no separators or '..', at most {NAME_MAX} bytes)")
    root = folders.folder_of(folder_type)
    if root is None:
        return _fail(400, f"type must be one of {', '.join(FOLDER_TYPES)}, got {folder_type[:100]!r}")
    target_dir = resolve_inside(root, subfolder)
    if target_dir is None or resolve_inside(root, subfolder, name) is None:
        return _fail(403, "subfolder is outside the allowed folder or too long")
    # a full decode (a mask is decoded with its original below), off the event loop
    error = await asyncio.to_thread(bounded_decode, image_error, data, max_upload_pixels, not mask)
    if error:
        return _fail(400, f"{name!r} is not a readable image: {error}")
    if mask:
        data_or_error = await asyncio.to_thread(bounded_decode, _masked_original, form.get("original_ref"), folders,
                                                data, max_upload_pixels)
        if isinstance(data_or_error, JSONResponse):
            return data_or_error
        data = data_or_error
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        final = _free_name(target_dir, name, data, overwrite)
        if not final.exists():
            write_atomic(final, data)
    except OSError as e:
        return _disk_error(e, f"{folder_type}/{subfolder}".rstrip("/"))
    return JSONResponse({"name": final.name, "subfolder": subfolder, "type": folder_type})


def _masked_original(original_ref: object, folders: ModelFolders, mask_png: bytes,
                     max_pixels: int) -> bytes | JSONResponse:
    """The PNG bytes of `original_ref`'s image with the alpha channel of `mask_png` (ComfyUI's alpha copy)."""
    from PIL import PngImagePlugin

    try:
        ref = json.loads(str(original_ref)) if original_ref is not None else None
    except json.JSONDecodeError as e:
        return _fail(400, f"original_ref is not JSON: {e}")
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        return _fail(400, "multipart field 'original_ref' (JSON with filename, type, subfolder) is required")
    filename, folder_type = split_annotation(ref["filename"], str(ref.get("type") or "output"))
    if not valid_filename(filename):
        return _fail(400, f"invalid original_ref filename {filename[:300]!r}")
    root = folders.folder_of(folder_type)
    if root is None:
        return _fail(400, f"original_ref type must be one of {', '.join(FOLDER_TYPES)}, got {folder_type[:100]!r}")
    path = resolve_inside(root, str(ref.get("subfolder") or ""), filename)
    if path is None:
        return _fail(403, "original_ref is outside the allowed folder")
    if not path.is_file():
        return _fail(404, f"original image not found: {filename!r} in {folder_type}/{ref.get('subfolder') or ''}"
                     .rstrip("/"))
    raw = path.read_bytes()
    error = image_error(raw, max_pixels, decode=False)  # decode_rgba below decodes it
    if error:
        return _fail(400, f"original image {filename!r} is not a readable image: {error}")
    original, mask = decode_rgba(raw), decode_rgba(mask_png)
    for what, got in ((f"original image {filename!r}", original), ("mask", mask)):
        if isinstance(got, str):
            return _fail(400, f"{what} does not decode: {got}")
    (rgba, text), alpha = original, mask[0].getchannel("A")
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    if alpha.size != rgba.size:
        return _fail(400, f"mask is {alpha.size[0]}x{alpha.size[1]}, the original image {filename!r} is "
                     f"{rgba.size[0]}x{rgba.size[1]}")
    rgba.putalpha(alpha)
    out = io.BytesIO()
    rgba.save(out, format="PNG", compress_level=4, pnginfo=info)
    return out.getvalue()


def view_converted(path: Path, preview: str | None, channel: str | None, max_pixels: int) -> tuple[bytes, str] | str:
    """ComfyUI view_image's conversions of an image: `preview=webp|jpeg[;quality]` re-encodes it (webp when the
    format is another or `channel` holds an 'a'; RGB for jpeg or channel=rgb; quality 90 unless given),
    `channel=rgb` is its colour as PNG, `channel=a` its alpha (opaque without one) on black as RGBA PNG (the mask
    editor's two layers). (bytes, media type), or why the image does not convert."""
    from PIL import Image

    channel = channel or ""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                return f"{w}x{h} is {w * h} pixels; the limit is {max_pixels}"
            out = io.BytesIO()
            if preview is not None:
                parts = preview.split(";")
                fmt = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in channel else "webp"
                quality = min(int(parts[-1]), 100) if parts[-1].isdigit() else 90
                if fmt == "jpeg" or channel == "rgb":
                    img = img.convert("RGB")
                img.save(out, format=fmt, quality=quality)
                return out.getvalue(), f"image/{fmt}"
            if channel == "rgb":
                rgb = Image.merge("RGB", img.split()[:3]) if img.mode == "RGBA" else img.convert("RGB")
                rgb.save(out, format="PNG")
            else:
                alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
                layer = Image.new("RGBA", img.size)
                layer.putalpha(alpha)
                layer.save(out, format="PNG")
            return out.getvalue(), "image/png"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


def inline_disposition(name: str) -> str:
    """Content-Disposition naming `name` (ComfyUI: filename="name"); RFC 5987 for a name outside ASCII."""
    from urllib.parse import quote

    if name.isascii() and name.isprintable() and '"' not in name and "\\" not in name:
        return f'inline; filename="{name}"'
    return f"inline; filename*=utf-8''{quote(name)}"


def decode_rgba(data: bytes) -> tuple[Any, dict] | str:
    """(the image as RGBA, its PNG text chunks), or why it does not decode: the pixel check after
    image_error(..., decode=False), which reads the header and chunks only."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGBA"), dict(getattr(img, "text", None) or {})
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


def image_type(path: Path) -> str | None:
    """The browser image type of the file's actual content (its name is not trusted), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # reads the header only
            return IMAGE_TYPES.get(img.format or "")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


_DECODES = threading.BoundedSemaphore(2)  # uploads decoded at once: each holds up to max_upload_pixels x 4 bytes


def bounded_decode(fn, *args):
    """fn(*args) holding one of the _DECODES slots: a worker thread's decode of an upload (asyncio.to_thread)."""
    with _DECODES:
        return fn(*args)


def image_error(data: bytes, max_pixels: int, decode: bool = True) -> str | None:
    """Why `data` is not an acceptable image (None = it is): unreadable, more than max_pixels, chunks that do
    not verify, or (decode) too little pixel data (a truncated PNG whose chunks verify: only the decode finds
    it). decode=False: header, size and chunks only, for a caller that decodes the image next (decode_rgba)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                return f"{w}x{h} is {w * h} pixels; the limit is {max_pixels}"
            img.verify()
        if decode:
            with Image.open(io.BytesIO(data)) as img:  # verify() leaves the image unusable: open it again
                img.load()
    except Image.DecompressionBombError as e:
        return str(e)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: a failure leaves nothing behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _disk_error(e: OSError, where: str) -> JSONResponse:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return _fail(507, f"no space left to store the upload in {where}: {e.strerror}")
    if e.errno == errno.ENAMETOOLONG:
        return _fail(400, f"file name too long for the file system in {where}")
    return _fail(500, f"cannot write the upload to {where}: {e.strerror or e}")


def _free_name(folder: Path, name: str, data: bytes, overwrite: bool) -> Path:
    """ComfyUI: overwrite, reuse an identical file, or pick 'name (i).ext'."""
    path = folder / name
    if overwrite or not path.exists():
        return path  # write_atomic replaces an existing file in one step
    digest = hashlib.sha256(data).digest()
    stem, ext = os.path.splitext(name)
    i = 1
    while path.exists():
        if path.is_file() and hashlib.sha256(path.read_bytes()).digest() == digest:
            return path
        path = folder / f"{stem} ({i}){ext}"
        i += 1
    return path
