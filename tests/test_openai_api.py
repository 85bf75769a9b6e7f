"""The OpenAI-compatible images API (server/openai_api.py) with the official `openai` client.

The shipped model (all-in-one FP8 file of comfy_models) at 32x32, 4 euler steps. Each image must equal
the one the ComfyUI route makes from the same graph (same queue, same engine): pixel for pixel.
"""

from __future__ import annotations

import base64
import io
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from comfy_models import build_models_folder
from live_server import LiveServer
from sd35fp8.server import create_app
from sd35fp8.server.openai_api import (EditRequest, ImageRequest, build_edit_graph, build_graph, checkpoint_defaults,
                                       checkpoint_max_side, edit_image, parse_size)
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from test_upload_mask import short_png

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")

MODEL = "stable-diffusion-3.5-fp8"


def pixels(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    models = build_models_folder(root)
    app = create_app(models, root / "output", device="cpu", serve_frontend=False)
    with LiveServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("dall-e-3")
    assert e.value.body["code"] == "model_not_found"


def test_generate_b64_and_url_match_comfy_route(server, client):
    extra = {"steps": 4, "seed": 7, "sampler_name": "euler", "negative_prompt": "blurry"}
    got = client.images.generate(model=MODEL, prompt="a red cube", size="32x32", n=2,
                                 response_format="b64_json", extra_body=extra)
    assert len(got.data) == 2
    imgs = [pixels(base64.b64decode(d.b64_json)) for d in got.data]
    assert imgs[0].shape == (32, 32, 3) and not np.array_equal(imgs[0], imgs[1])  # n = a batch of 2 noises

    for fmt, magic in (("jpeg", b"\xff\xd8"), ("webp", b"RIFF")):  # gpt-image-1's output_format
        enc = client.images.generate(model=MODEL, prompt="a red cube", size="32x32", output_format=fmt,
                                     output_compression=90, extra_body=extra)
        raw = base64.b64decode(enc.data[0].b64_json)
        assert raw.startswith(magic) and pixels(raw).shape == (32, 32, 3)
        assert np.abs(pixels(raw).astype(int) - imgs[0].astype(int)).mean() < 12  # the same image, lossy
    by_url = client.images.generate(model=MODEL, prompt="a red cube", size="32x32", n=2,
                                    response_format="url", extra_body=extra)
    assert [pixels(requests.get(d.url, timeout=30).content).tolist() for d in by_url.data] == \
        [i.tolist() for i in imgs]

    # the same graph through POST /prompt gives the same pixels; history holds the four OpenAI prompts and it
    req = ImageRequest(prompt="a red cube", size="32x32", n=2, **extra)
    defaults = checkpoint_defaults(SHIPPED_CHECKPOINT)
    graph = build_graph(req, f"{MODEL}.safetensors", defaults, "comfy")
    pid = requests.post(f"{server.url}/prompt", json={"prompt": graph}, timeout=30).json()["prompt_id"]
    for _ in range(3000):
        hist = requests.get(f"{server.url}/history/{pid}", timeout=30).json()
        if pid in hist:
            break
        import time

        time.sleep(0.1)
    (ui,) = hist[pid]["outputs"].values()
    comfy = [pixels(requests.get(f"{server.url}/view", params=i, timeout=30).content) for i in ui["images"]]
    assert [c.tolist() for c in comfy] == [i.tolist() for i in imgs]
    assert len(requests.get(f"{server.url}/history", timeout=30).json()) == 5


def test_errors_have_openai_shape(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, prompt="x", size="30x30")
    assert e.value.body["param"] == "size" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, prompt="x", n=11)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, prompt="x", extra_body={"sampler_name": "nope", "steps": 1})
    assert "sampler_name" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model="dall-e-3", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:  # the server's --max-pixel-steps budget, as POST /prompt
        client.images.generate(model=MODEL, prompt="x", size="2048x2048", n=10, extra_body={"steps": 200})
    assert e.value.body["code"] == "prompt_over_budget"
    # larger than the model's position table (the shipped model: 16 cells x patch 2 x 8 = 256 px): a 400
    # before queueing, not a 500 from the sampler (benchmarks/scale.py once asked 1024x1024 on the GPU)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=MODEL, prompt="x", size="1024x1024", extra_body={"steps": 1})
    assert e.value.body["param"] == "size" and "256x256" in e.value.body["message"]


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def test_edit_with_the_openai_client(server, client):
    """client.images.edit: a whole-image edit (img2img), a masked edit (only the transparent part of the mask
    changes much), n images, and the graph the route builds equals POST /prompt's result pixel for pixel."""
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8))  # 40 x 48: not a multiple of 16
    extra = {"steps": 4, "seed": 3, "sampler_name": "euler"}
    whole = client.images.edit(model=MODEL, image=("src.png", _png(src), "image/png"), prompt="a red cube",
                               extra_body=extra)
    (w,) = [pixels(base64.b64decode(d.b64_json)) for d in whole.data]
    assert w.shape == (48, 32, 3)  # the image's size rounded down to multiples of 16

    ramp = np.linspace(40, 215, 64)
    src = Image.fromarray(np.stack([np.tile(ramp, (64, 1)), np.tile(ramp[:, None], (1, 64)),
                                    np.full((64, 64), 128.0)], -1).astype(np.uint8))  # smooth: the VAE keeps it
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 64, 32))  # top half transparent: repaint it, keep the bottom
    got = client.images.edit(model=MODEL, image=("src.png", _png(src), "image/png"), prompt="a red cube",
                             mask=("mask.png", _png(mask), "image/png"), n=2, response_format="b64_json",
                             extra_body=extra)
    imgs = [pixels(base64.b64decode(d.b64_json)) for d in got.data]
    assert len(imgs) == 2 and imgs[0].shape == (64, 64, 3) and not np.array_equal(imgs[0], imgs[1])
    # what the route ran: the image stored with the mask's alpha (LoadImage: MASK = 1 - alpha, 1 = repaint),
    # its MASK into SetLatentNoiseMask, the latent repeated for n (the sampler's masking: test_inpaint_nodes.py)
    png, masked, size = edit_image(_png(src), _png(mask), 64 * 64)
    alpha = np.asarray(Image.open(io.BytesIO(png)))[..., 3]
    assert masked and size == (64, 64) and (alpha[:32] == 0).all() and (alpha[32:] == 255).all()
    req = EditRequest(prompt="a red cube", n=2, **extra)
    graph, w, h = build_edit_graph(req, f"{MODEL}.safetensors", checkpoint_defaults(SHIPPED_CHECKPOINT), "x",
                                   "openai/a.png", True, (64, 64))
    assert (w, h) == (64, 64) and graph["14"]["inputs"]["mask"] == ["11", 1]
    assert graph["15"]["inputs"] == {"samples": ["14", 0], "amount": 2} and graph["3"]["inputs"]["denoise"] == 1.0
    assert graph["3"]["inputs"]["latent_image"] == ["15", 0] and "5" not in graph
    assert not edit_image(_png(src), None, 64 * 64)[1]  # an opaque image without a mask: a whole-image edit

    with pytest.raises(openai.BadRequestError) as e:  # a mask of another size
        client.images.edit(model=MODEL, image=("src.png", _png(src), "image/png"), prompt="x",
                           mask=("mask.png", _png(Image.new("RGBA", (16, 16))), "image/png"), extra_body=extra)
    assert e.value.body["param"] == "mask" and "same size" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # not an image
        client.images.edit(model=MODEL, image=("src.png", b"not a png", "image/png"), prompt="x")
    assert e.value.body["param"] == "image"
    with pytest.raises(openai.BadRequestError) as e:  # a size that is not WIDTHxHEIGHT in 16s
        client.images.edit(model=MODEL, image=("src.png", _png(src), "image/png"), prompt="x", size="65x64")
    assert e.value.body["param"] == "size"
    url = f"{server.url}/v1/images/edits"
    for kw in ({"json": {"prompt": "x"}},  # not multipart
               {"data": {"prompt": "x", "image": "text"}},  # image not a file
               {"files": {"image": ("a.png", _png(src))}},  # no prompt
               {"files": {"image": ("a.png", _png(src)), "mask": ("m.png", b"junk")}, "data": {"prompt": "x"}},
               # a header that reads, pixel data cut short (found by benchmarks/fuzz.py: was a 500)
               {"files": {"image": ("a.png", _png(src)), "mask": ("m.png", short_png(64))},
                "data": {"prompt": "x"}},
               {"files": {"image": ("a.png", short_png(64))}, "data": {"prompt": "x"}},
               {"files": {"image": ("a.png", _png(src))}, "data": {"prompt": "x", "n": "many"}},
               {"files": {"image": ("a.png", _png(src)), "other": ("b.png", _png(src))}, "data": {"prompt": "x"}},
               {"data": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}):
        r = requests.post(url, timeout=30, **kw)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (kw.keys(), r.text)


def test_stream_with_partial_images(client):
    """stream=True: server-sent events as the openai client parses them: partial_images partial images (the step's
    prediction decoded by the VAE, full size), then the image, equal to the one a plain request makes."""
    extra = {"steps": 8, "seed": 11, "sampler_name": "euler"}
    events = list(client.images.generate(model=MODEL, prompt="a red cube", size="64x64", stream=True,
                                         partial_images=3, extra_body=extra))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    done = events[-1]
    assert (done.size, done.output_format, done.quality, done.background) == ("64x64", "png", "auto", "auto")
    assert done.usage.input_tokens == done.usage.input_tokens_details.text_tokens > 0
    parts = [pixels(base64.b64decode(e.b64_json)) for e in events[:3]]
    final = pixels(base64.b64decode(done.b64_json))
    assert all(p.shape == (64, 64, 3) for p in parts)
    plain = client.images.generate(model=MODEL, prompt="a red cube", size="64x64", extra_body=extra)
    assert np.array_equal(final, pixels(base64.b64decode(plain.data[0].b64_json)))
    assert np.abs(parts[-1] - final).mean() < np.abs(parts[0] - final).mean()  # the previews converge
    # no partial images asked: the image alone; n = 2: one completed event each; edits stream as image_edit.*
    assert [e.type for e in client.images.generate(model=MODEL, prompt="a red cube", size="32x32", stream=True,
                                                   n=2, output_format="jpeg", extra_body=extra)] == \
        ["image_generation.completed"] * 2
    src = base64.b64decode(plain.data[0].b64_json)
    kinds = [e.type for e in client.images.edit(model=MODEL, image=("a.png", src, "image/png"), prompt="a blue cube",
                                                stream=True, partial_images=1, extra_body={"steps": 4, "seed": 1})]
    assert kinds == ["image_edit.partial_image", "image_edit.completed"]


def test_variations_and_newer_fields(client):
    """client.images.create_variation (img2img with no prompt), the newer gpt-image fields (safety_identifier,
    complexity, quality xhigh / max accepted), and clear 400s for what SD3.5 cannot make."""
    extra = {"steps": 2, "seed": 4, "sampler_name": "euler"}
    src = _png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)))
    got = client.images.create_variation(model=MODEL, image=("v.png", src, "image/png"), n=2, extra_body=extra)
    imgs = [pixels(base64.b64decode(d.b64_json)) for d in got.data]
    assert len(imgs) == 2 and imgs[0].shape == (48, 48, 3) and not np.array_equal(imgs[0], imgs[1])
    ok = client.images.generate(model=MODEL, prompt="x", size="32x32", quality="xhigh", safety_identifier="u-1",
                                complexity="low", partial_images=2, extra_body=extra)
    assert len(ok.data) == 1
    for kw, param in ((dict(background="transparent"), "background"), (dict(output_format="gif"), "output_format"),
                      (dict(output_format="svg"), "output_format"), (dict(frame_count=4), "frame_count")):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(model=MODEL, prompt="x", size="32x32", extra_body=extra, **kw)
        assert e.value.body["param"] == param and e.value.body["code"] == "unsupported_value", kw
    with pytest.raises(openai.BadRequestError) as e:
        client.images.create_variation(model=MODEL, image=("v.png", src, "image/png"),
                                       extra_body={**extra, "stream": "true"})
    assert e.value.body["param"] == "stream" and e.value.body["code"] == "unsupported_value"
    assert len(client.images.create_variation(model=MODEL, image=("v.png", src, "image/png"),
                                              extra_body={**extra, "stream": False}).data) == 1  # sent as "false"


def test_input_error_while_running_is_400(tmp_path, monkeypatch):
    """An InputError raised while the prompt runs (here the MMDiT's own size check, with the route's
    header check switched off) is the request's fault: 400 invalid_value, not 500 generation_failed."""
    import sd35fp8.server.openai_api as api

    monkeypatch.setattr(api, "checkpoint_max_side", lambda path: None)
    app = create_app(build_models_folder(tmp_path), tmp_path / "output", device="cpu", serve_frontend=False)
    with LiveServer(app) as srv:
        r = requests.post(f"{srv.url}/v1/images/generations", timeout=300, json={
            "model": MODEL, "prompt": "x", "size": "512x512", "steps": 1, "seed": 0})
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=300)
        with pytest.raises(openai.APIError, match="position table"):  # streamed: an error event, the client raises
            list(client.images.generate(model=MODEL, prompt="x", size="512x512", stream=True,
                                        extra_body={"steps": 1, "seed": 0}))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_value" and "position table" in err["message"]


def test_checkpoint_max_side():
    assert checkpoint_max_side(SHIPPED_CHECKPOINT) == 256


def test_parse_size():
    assert parse_size("64x48", (1, 1)) == (64, 48)
    assert parse_size(None, (1024, 1024)) == (1024, 1024)
    with pytest.raises(Exception, match="multiples of 16"):
        parse_size("100x100", (1, 1))


def _readme_section() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return text.split("## Serving at scale", 1)[1].split("\n## ", 1)[0]


def test_readme_curl_and_openai_examples(server, tmp_path):
    """The README's curl command and openai client example, run as written against the live server."""
    import shlex
    import subprocess

    section = _readme_section()
    curl = [line for line in section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines() if line.startswith("curl")]
    (cmd,) = curl
    argv = [a.replace("http://127.0.0.1:8188", server.url) for a in shlex.split(cmd)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    import json

    assert pixels(base64.b64decode(json.loads(out)["data"][0]["b64_json"])).shape == (128, 128, 3)

    code = section.split("```python\n", 1)[1].split("```", 1)[0].replace("http://127.0.0.1:8188", server.url)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=300)
    assert pixels((tmp_path / "cube.png").read_bytes()).shape == (128, 128, 3)


TINY = {"steps": 2, "seed": 5, "sampler_name": "euler"}


def test_client_nulls_and_response_fields(client):
    """What the openai client sends for an explicit None (JSON null) means the default, as OpenAI reads it; the
    response carries ImagesResponse's GPT-image fields (background, output_format, quality, size, usage with its
    token details, safety_identifier), parsed by the client also through with_raw_response; OpenAI's value sets
    for style and moderation."""
    got = client.images.generate(model=MODEL, prompt="a red cube", size="32x32", n=None, response_format=None,
                                 background=None, moderation=None, output_compression=None, output_format=None,
                                 partial_images=None, quality=None, style=None, stream=None, complexity=None,
                                 safety_identifier=None, extra_body=TINY)
    assert isinstance(got, openai.types.ImagesResponse) and len(got.data) == 1 and got.data[0].b64_json
    assert (got.background, got.output_format, got.quality, got.size) == ("opaque", "png", "medium", "32x32")
    assert got.usage.input_tokens == got.usage.input_tokens_details.text_tokens == got.usage.total_tokens > 0
    assert got.usage.output_tokens == 0 and got.usage.output_tokens_details.image_tokens == 0
    assert got.safety_identifier is None

    raw = client.images.with_raw_response.generate(model=MODEL, prompt="a red cube", size="32x32", quality="hd",
                                                   output_format="jpeg", user="u-1", style="natural",
                                                   moderation="low", extra_body=TINY)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("application/json")
    parsed = raw.parse()
    assert (parsed.quality, parsed.output_format, parsed.safety_identifier) == ("high", "jpeg", "u-1")
    assert base64.b64decode(parsed.data[0].b64_json).startswith(b"\xff\xd8")
    # safety_identifier wins over user unless empty; a URL answer is the saved PNG
    by_url = client.images.generate(model=MODEL, prompt="x", size="32x32", response_format="url", user="u-1",
                                    safety_identifier="s-1", output_format="webp", extra_body=TINY)
    assert (by_url.output_format, by_url.safety_identifier) == ("png", "s-1") and by_url.data[0].url
    assert client.images.generate(model=MODEL, prompt="x", size="32x32", user="u-2", safety_identifier="",
                                  extra_body=TINY).safety_identifier == "u-2"
    done = list(client.images.generate(model=MODEL, prompt="x", size="32x32", stream=True, safety_identifier="s-2",
                                       extra_body=TINY))[-1]
    assert done.type == "image_generation.completed" and done.safety_identifier == "s-2"

    for field, value in (("style", "bogus"), ("moderation", "high")):  # outside OpenAI's Literal: refused by name
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(model=MODEL, prompt="x", size="32x32", extra_body={**TINY, field: value})
        assert e.value.body["param"] == field, field


def test_edit_multipart_fields(client):
    """client.images.edit's multipart forms: image=[one file] (sent as image[]) is an edit; several images, a
    markup file and svg (sent as svg[model]) are refused by name with unsupported_value; None / stream=False /
    input_fidelity are accepted; with_raw_response parses."""
    src = ("a.png", _png(Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32, 3), dtype=np.uint8))),
           "image/png")
    one = client.images.edit(model=MODEL, image=[src], prompt="a red cube", n=None, stream=False,
                             input_fidelity="high", quality="standard", output_format="webp", output_compression=80,
                             extra_body=TINY)
    assert (one.size, one.quality, one.output_format) == ("32x32", "medium", "webp")
    assert base64.b64decode(one.data[0].b64_json).startswith(b"RIFF")
    raw = client.images.with_raw_response.edit(model=MODEL, image=src, prompt="a red cube", extra_body=TINY)
    assert raw.status_code == 200 and len(raw.parse().data) == 1
    for kw, param in ((dict(image=[src, src]), "image"), (dict(image=[src] * 6), "image"),
                      (dict(image=src, markup=src), "markup"), (dict(image=src, svg={"model": "m"}), "svg")):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.edit(model=MODEL, prompt="x", extra_body=TINY, **kw)
        assert e.value.body["param"] == param and e.value.body["code"] == "unsupported_value", (param, e.value.body)
    assert "6 images" in client_error(lambda: client.images.edit(model=MODEL, prompt="x", image=[src] * 6))["message"]


def client_error(call) -> dict:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.body


def test_async_client(server):
    """openai.AsyncOpenAI: models, generate (plain, raw, streamed), edit (plain, streamed), variation, errors."""
    import asyncio

    async def main() -> None:
        ac = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        assert MODEL in [m.id async for m in ac.models.list()]
        assert (await ac.models.retrieve(MODEL)).owned_by == "sd35fp8"
        got = await ac.images.generate(model=MODEL, prompt="a", size="32x32", extra_body=TINY)
        assert got.size == "32x32" and pixels(base64.b64decode(got.data[0].b64_json)).shape == (32, 32, 3)
        raw = await ac.images.with_raw_response.generate(model=MODEL, prompt="a", size="32x32", extra_body=TINY)
        assert isinstance(raw.parse(), openai.types.ImagesResponse)
        stream = await ac.images.generate(model=MODEL, prompt="a", size="32x32", stream=True, extra_body=TINY)
        assert [e.type async for e in stream] == ["image_generation.completed"]
        src = ("a.png", base64.b64decode(got.data[0].b64_json), "image/png")
        assert len((await ac.images.edit(model=MODEL, prompt="b", image=src, extra_body=TINY)).data) == 1
        stream = await ac.images.edit(model=MODEL, prompt="b", image=src, stream=True, extra_body=TINY)
        assert [e.type async for e in stream] == ["image_edit.completed"]
        assert len((await ac.images.create_variation(model=MODEL, image=src, n=2, extra_body=TINY)).data) == 2
        with pytest.raises(openai.BadRequestError) as e:
            await ac.images.generate(model=MODEL, prompt="a", size="30x30")
        assert e.value.body["param"] == "size"
        with pytest.raises(openai.NotFoundError):
            await ac.models.retrieve("dall-e-3")
        await ac.close()

    asyncio.run(main())


def test_other_v1_urls_have_openai_shape(server, client):
    """A /v1 URL the server does not serve answers 404 (a known one with another method 405, with Allow) in
    OpenAI's error shape, not FastAPI's {"detail"}: the client raises its typed errors with a message."""
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "invalid_request_error" and "/v1/chat/completions" in e.value.body["message"]
    with pytest.raises(openai.APIStatusError) as e:
        client.models.delete(MODEL)
    assert e.value.status_code == 405 and e.value.body["code"] == "method_not_allowed"
    r = requests.get(f"{server.url}/v1/images/generations", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and set(r.json()["error"]) == \
        {"message", "type", "param", "code"}


def test_auth_token_with_the_openai_client(tmp_path):
    """With --auth-token the openai client's api_key is the token (Authorization: Bearer); a wrong one is a 401 in
    OpenAI's error shape (code invalid_api_key), which the client raises as AuthenticationError."""
    app = create_app(build_models_folder(tmp_path), tmp_path / "output", device="cpu", serve_frontend=False,
                     auth_token="s3cret-token")
    with LiveServer(app) as srv:
        good = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret-token", max_retries=0, timeout=60)
        assert MODEL in [m.id for m in good.models.list()]
        bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.body == {"message": "missing or wrong auth token", "type": "invalid_request_error",
                                "param": None, "code": "invalid_api_key"}
        r = requests.get(f"{srv.url}/queue", timeout=30)  # the ComfyUI routes keep ComfyUI's shape
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized" and "node_errors" in r.json()
