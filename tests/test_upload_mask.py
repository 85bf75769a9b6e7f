"""POST /upload/mask (ComfyUI server.py upload_mask): the stored file is the original image (named by
original_ref) as RGBA with the uploaded mask's alpha, PNG text kept; LoadImage then gives MASK = 1 - alpha."""

from __future__ import annotations

import io
import json

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from sd35fp8.server import create_app
from sd35fp8.workflow.engine import load_image
from test_server import TESTCLIENT_HOSTS, make_fake_executor


def _png(img: Image.Image, text: dict | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_upload_mask_copies_the_alpha_onto_the_original(tmp_path):
    app = create_app(tmp_path / "models", executor=make_fake_executor(tmp_path), allow_hosts=TESTCLIENT_HOSTS)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    alpha = np.full((8, 8), 255, np.uint8)
    alpha[2:5, 3:6] = 0  # the painted (masked) area: transparent
    mask_rgba = np.zeros((8, 8, 4), np.uint8)
    mask_rgba[..., 3] = alpha
    with TestClient(app) as client:
        up = client.post("/upload/image", files={"image": ("photo.png", _png(Image.fromarray(rgb), {"prompt": "{}"}),
                                                           "image/png")}).json()
        assert up == {"name": "photo.png", "subfolder": "", "type": "input"}
        ref = json.dumps({"filename": "photo.png", "type": "input", "subfolder": ""})
        r = client.post("/upload/mask", files={"image": ("clipspace-mask.png", _png(Image.fromarray(mask_rgba)),
                                                         "image/png")},
                        data={"original_ref": ref, "type": "input", "subfolder": "clipspace"})
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
        stored = tmp_path / "input" / "clipspace" / "clipspace-mask.png"
        with Image.open(stored) as img:
            assert img.mode == "RGBA" and img.text.get("prompt") == "{}"
            out = np.array(img)
        assert (out[..., :3] == rgb).all() and (out[..., 3] == alpha).all()
        image, mask = load_image(stored)  # LoadImage: MASK = 1 - alpha
        assert torch_equal_mask(mask[0], 1.0 - alpha / 255.0)
        # errors name what is wrong
        missing = json.dumps({"filename": "nope.png", "type": "input"})
        r = client.post("/upload/mask", files={"image": ("m.png", _png(Image.fromarray(mask_rgba)), "image/png")},
                        data={"original_ref": missing})
        assert r.status_code == 404 and "nope.png" in r.text
        r = client.post("/upload/mask", files={"image": ("m.png", _png(Image.fromarray(mask_rgba)), "image/png")})
        assert r.status_code == 400 and "original_ref" in r.text
        outside = json.dumps({"filename": "photo.png", "type": "input", "subfolder": "../.."})
        r = client.post("/upload/mask", files={"image": ("m.png", _png(Image.fromarray(mask_rgba)), "image/png")},
                        data={"original_ref": outside})
        assert r.status_code == 403
        # a mask whose header reads but whose pixel data is cut short: a 400, not a 500
        r = client.post("/upload/mask", files={"image": ("m.png", short_png(8), "image/png")},
                        data={"original_ref": ref})
        assert r.status_code == 400, r.text
        # the same as a plain upload: refused at once, not stored for LoadImage to fail on later
        r = client.post("/upload/image", files={"image": ("s.png", short_png(8), "image/png")})
        assert r.status_code == 400 and "s.png" in r.text, r.text


def short_png(side: int) -> bytes:
    """A well-formed PNG (chunks and CRCs intact) whose one IDAT holds far fewer pixels than its header says."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def torch_equal_mask(mask, expected: np.ndarray) -> bool:
    return bool(np.allclose(mask.numpy(), expected.astype(np.float32), atol=1e-6))
