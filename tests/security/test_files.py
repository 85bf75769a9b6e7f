"""/view and /upload/image (issue 27 item 5): content type from the file's real format, nosniff and a
CSP on every answer, decompression bombs and over-long names refused, disk errors mapped to clear
507/500 with no partial file left."""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib

import pytest
from PIL import Image

from sd35fp8.server import files


def png_bytes(size: int = 8, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 10)).save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A few hundred bytes that declare width x height pixels (the issue's DecompressionBombError)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _upload(client, name: str, data: bytes, **form):
    return client.post("/upload/image", files={"image": (name, data, "image/png")}, data=form)


def _view(client, name: str, **params):
    return client.get("/view", params={"filename": name, "type": "input", **params})


def _safe_headers(r) -> None:
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in r.headers["content-security-policy"] and "sandbox" in r.headers[
        "content-security-policy"]


def test_polyglot_html_upload_is_served_as_an_image(client):
    poly = png_bytes() + b"<script>alert(document.cookie)</script>"
    r = _upload(client, "poly.html", poly)
    assert r.status_code == 200, r.text
    v = _view(client, "poly.html")
    assert v.status_code == 200 and v.headers["content-type"] == "image/png"
    assert v.headers["content-disposition"].startswith("inline")
    _safe_headers(v)


@pytest.mark.parametrize("fmt, ctype", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                         ("GIF", "image/gif"), ("BMP", "image/bmp")])
def test_images_keep_their_real_type_whatever_the_name(client, fmt, ctype):
    assert _upload(client, f"pic.{fmt.lower()}.svg", png_bytes(fmt=fmt)).status_code == 200
    v = _view(client, f"pic.{fmt.lower()}.svg")
    assert v.headers["content-type"] == ctype
    _safe_headers(v)


@pytest.mark.parametrize("name, data", [("page.html", b"<html><script>alert(1)</script></html>"),
                                        ("x.svg", b'<svg xmlns="http://www.w3.org/2000/svg"><script>1</script></svg>'),
                                        ("a.js", b"alert(1)"), ("latent.latent", b"\0\1\2")])
def test_non_images_are_attachments(client, app, name, data):
    (app.state.folders.output_dir).mkdir(parents=True, exist_ok=True)
    (app.state.folders.output_dir / name).write_bytes(data)  # e.g. written by a node, or put there by hand
    v = client.get("/view", params={"filename": name})
    assert v.status_code == 200 and v.headers["content-type"] == "application/octet-stream"
    assert v.headers["content-disposition"].startswith("attachment")
    _safe_headers(v)


def test_decompression_bomb_and_pixel_cap(client, tmp_path):
    r = _upload(client, "bomb.png", bomb_png())
    assert r.status_code == 400 and "pixels" in r.json()["error"]["message"]
    assert not (tmp_path / "input" / "bomb.png").exists()
    assert files.image_error(bomb_png(100, 100), max_pixels=50 * 50) is not None
    assert files.image_error(png_bytes(8), max_pixels=64) is None


def test_long_names(client, tmp_path):
    long = "a" * 300 + ".png"
    assert _view(client, long).status_code == 400
    assert client.get("/view", params={"filename": "a.png", "subfolder": "b" * 300}).status_code == 403
    assert client.get("/view", params={"filename": "a.png", "subfolder": "/".join(["b" * 200] * 30)}).status_code == 403
    assert _upload(client, long, png_bytes()).status_code == 400
    assert _upload(client, "ok.png", png_bytes(), subfolder="s" * 300).status_code == 403
    assert _upload(client, "é" * 128 + ".png", png_bytes()).status_code == 400  # 256 bytes in UTF-8
    assert not any((tmp_path / "input").rglob("*")) if (tmp_path / "input").exists() else True


def test_symlink_and_traversal_variants(client, tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    out = tmp_path / "output"
    out.mkdir(exist_ok=True)
    (out / "link.png").symlink_to(tmp_path / "secret.png")
    (out / "loop").symlink_to(out / "loop")
    for params in ({"filename": "link.png"}, {"filename": "x.png", "subfolder": "loop"},
                   {"filename": "..\\secret.png"}, {"filename": "secret.png", "subfolder": "..%2f"},
                   {"filename": "secret.png\0.png"}, {"filename": "secret.png [output]", "subfolder": "../"}):
        r = client.get("/view", params=params)
        assert r.status_code in (400, 403, 404), (params, r.status_code)


@pytest.mark.parametrize("err, status", [(errno.ENOSPC, 507), (errno.EDQUOT, 507), (errno.EROFS, 500),
                                         (errno.EACCES, 500)])
def test_disk_errors_leave_no_partial_file(client, tmp_path, monkeypatch, err, status):
    real_fdopen = os.fdopen

    class Failing(io.RawIOBase):
        def __init__(self, fd):
            self.f = real_fdopen(fd, "wb")

        def write(self, data):
            self.f.write(data[: len(data) // 2])  # half the bytes reach the disk, then the error
            raise OSError(err, os.strerror(err))

        def close(self):
            self.f.close()
            super().close()

    monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: Failing(fd))
    r = _upload(client, "full.png", png_bytes())
    assert r.status_code == status and r.json()["error"]["message"]
    assert [p.name for p in (tmp_path / "input").rglob("*")] == []


def test_read_only_folder(client, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "input"))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    r = _upload(client, "ro.png", png_bytes())
    assert r.status_code == 500 and "Read-only" in r.json()["error"]["message"]
