"""Live sampler previews (workflow/previews.py): ComfyUI's Latent2RGB frames over /ws, chosen by the server's
--preview-method or a prompt's extra_data["preview_method"], and their rows in a cross-prompt batch.

The shipped model (comfy_models' all-in-one file) at 64x64, a few euler steps, on the CPU.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from comfy_models import build_models_folder
from sd35fp8.server import create_app
from sd35fp8.server.openai_api import ImageRequest, build_graph, checkpoint_defaults
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow import ModelFolders, PromptExecutor
from sd35fp8.workflow.executor import PromptJob
from sd35fp8.workflow.previews import (SD3_LATENT_RGB_BIAS, SD3_LATENT_RGB_FACTORS, StepPreview, latent_rgb,
                                       partial_steps, resolve_method)

pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
CKPT = "stable-diffusion-3.5-fp8.safetensors"
HOSTS = ("testserver",)


def comfy_latent2rgb(x0: np.ndarray) -> np.ndarray:
    """ComfyUI latent_preview.py, written out in numpy: x0 [B, 16, h, w] -> uint8 [h, w, 3] of image 0."""
    rgb = np.einsum("chw,cr->hwr", x0[0].astype(np.float64), np.array(SD3_LATENT_RGB_FACTORS)) + SD3_LATENT_RGB_BIAS
    return np.round((np.clip(rgb, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def test_latent_rgb_is_comfyuis():
    x0 = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(0)) * 3
    got = latent_rgb(x0).numpy()
    assert got.shape == (6, 5, 3)
    assert np.abs(got.astype(int) - comfy_latent2rgb(x0.numpy())).max() <= 1  # float32 vs float64 rounding
    assert latent_rgb(torch.zeros(1, 16, 2, 2))[0, 0].tolist() == [158, 155, 152]  # the bias alone


def test_partial_steps_and_method():
    assert partial_steps(3, 8) == [2, 4, 6] and partial_steps(3, 4) == [1, 2, 3]
    assert partial_steps(1, 20) == [10] and partial_steps(2, 1) == [] and partial_steps(0, 9) == []
    assert resolve_method("latent2rgb", "none") == "latent2rgb" and resolve_method("TAESD", "none") == "taesd"
    for other in (None, "default", "nonsense", 3):  # ComfyUI set_preview_method: the server's own
        assert resolve_method(other, "auto") == "auto"
    assert not StepPreview("none").active and StepPreview("auto").active
    assert not StepPreview("none", partial_images=2).active  # partial images need a decoder
    with pytest.raises(Exception, match="preview method"):
        StepPreview("fancy")


def graph(seed: int = 1, steps: int = 3, size: int = 64) -> dict:
    req = ImageRequest(prompt="a red circle", size=f"{size}x{size}", steps=steps, seed=seed, sampler_name="euler")
    return build_graph(req, CKPT, checkpoint_defaults(SHIPPED_CHECKPOINT), "preview")


def run(client: TestClient, sid: str, extra: dict | None = None, flags: dict | None = None, **kw) -> list:
    """Queue a prompt for client `sid` (whose feature_flags message says `flags`); its messages up to the end:
    dicts (JSON) and bytes (binary frames)."""
    out = []
    with client.websocket_connect(f"/ws?clientId={sid}") as ws:
        ws.receive_json()
        if flags is not None:  # as ComfyUI's frontend does first thing; the server answers with its own
            ws.send_json({"type": "feature_flags", "data": flags})
            assert ws.receive_json()["data"]["supports_preview_metadata"] is True
        body = {"prompt": graph(**kw), "client_id": sid}
        if extra is not None:
            body["extra_data"] = extra
        assert client.post("/prompt", json=body).status_code == 200
        while True:
            m = ws.receive()
            if m.get("bytes") is not None:
                out.append(m["bytes"])
                continue
            import json

            msg = json.loads(m["text"])
            out.append(msg)
            if msg["type"] == "executing" and msg["data"]["node"] is None:
                return out


def frames(messages: list, meta: list | None = None) -> list[Image.Image]:
    """The JPEG preview frames of `messages`: PREVIEW_IMAGE (1) frames, or with `meta` given
    PREVIEW_IMAGE_WITH_METADATA (4) frames, whose metadata are appended to it."""
    import json

    images = []
    for m in messages:
        if isinstance(m, bytes):
            if meta is None:
                assert struct.unpack(">II", m[:8]) == (1, 1)  # PREVIEW_IMAGE, JPEG
                images.append(Image.open(io.BytesIO(m[8:])))
            else:
                kind, n = struct.unpack(">II", m[:8])
                assert kind == 4
                meta.append(json.loads(m[8:8 + n]))
                images.append(Image.open(io.BytesIO(m[8 + n:])))
    return images


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models_folder(tmp_path_factory.mktemp("previews"))


def test_ws_preview_frames(models, tmp_path):
    app = create_app(models, tmp_path / "output", device="cpu", serve_frontend=False, allow_hosts=HOSTS)
    with TestClient(app) as client:
        assert not frames(run(client, "a", steps=3))  # ComfyUI's default: none
        msgs = run(client, "a", {"preview_method": "latent2rgb"}, steps=3, seed=2)
        shots = frames(msgs)
        assert len(shots) == 3 and all(s.size == (8, 8) for s in shots)  # latent size: 1/8 of 64 px
        for i, m in enumerate(msgs):  # each frame right after its step's progress, as ComfyUI's hook sends it
            if isinstance(m, bytes):
                assert msgs[i - 1]["type"] == "progress"
        # a client that supports preview metadata (the frontend's feature_flags) gets ComfyUI's type-4 frames
        meta: list = []
        msgs = run(client, "m", {"preview_method": "latent2rgb"}, flags={"supports_preview_metadata": True},
                   steps=2, seed=5)
        pid = next(m["data"]["prompt_id"] for m in msgs if isinstance(m, dict) and m["type"] == "execution_start")
        assert len(frames(msgs, meta)) == 2
        assert meta[0] == {"node_id": "3", "prompt_id": pid, "display_node_id": "3", "parent_node_id": None,
                           "real_node_id": "3", "image_type": "image/jpeg"}
        assert len(frames(run(client, "m", {"preview_method": "latent2rgb"}, flags={"supports_preview_metadata": 1},
                              steps=2, seed=6))) == 2  # not exactly true (ComfyUI's supports_feature): legacy
    app = create_app(models, tmp_path / "output2", device="cpu", serve_frontend=False, allow_hosts=HOSTS,
                     preview_method="auto")
    with TestClient(app) as client:
        assert len(frames(run(client, "b", steps=2))) == 2  # the server's --preview-method
        assert not frames(run(client, "b", {"preview_method": "none"}, steps=2, seed=3))  # the prompt's wins
        assert len(frames(run(client, "b", {"preview_method": "default"}, steps=2, seed=4))) == 2


def test_batched_prompts_preview_their_own_rows(models, tmp_path):
    """Two prompts sampled as one batch (workflow/batch.py): each previews its own rows, as it would alone."""
    folders = ModelFolders(models, output_dir=tmp_path / "out", input_dir=tmp_path / "in", temp_dir=tmp_path / "t")
    ex = PromptExecutor(folders, device="cpu")

    def job(seed: int, pid: str, extra: dict, sink: list) -> PromptJob:
        g = graph(seed=seed, steps=2)
        return PromptJob(g, pid, extra, lambda event, data: sink.append((event, data)), ["9"])

    a, b, alone = [], [], []
    ex.execute_batch([job(5, "a", {"preview_method": "latent2rgb"}, a), job(6, "b", {}, b)])
    fresh = PromptExecutor(folders, device="cpu")  # ex's cache holds prompt a's sampler output
    fresh.execute(graph(seed=5, steps=2), "c", {"preview_method": "latent2rgb"},
               hooks=lambda event, data: alone.append((event, data)), execute_outputs=["9"])
    shots = [d["image"] for e, d in a if e == "preview_image"]
    assert len(shots) == 2 and not [e for e, _ in b if e == "preview_image"]
    assert all(d["prompt_id"] == "a" and d["node"] == "3" for e, d in a if e == "preview_image")
    assert shots == [d["image"] for e, d in alone if e == "preview_image"]
    assert [e for e, _ in a].count("progress") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_previews_and_partial_images_on_the_gpu_server_gpu(models, tmp_path):
    """The serving road on a GPU (compiled fused engine, CUDA graphs): /ws preview frames and the OpenAI stream's
    partial images come from the graphed steps, and the streamed image equals the plain request's."""
    import base64

    import openai

    from live_server import LiveServer

    app = create_app(models, tmp_path / "output", device="cuda", serve_frontend=False, allow_hosts=HOSTS,
                     preview_method="latent2rgb")
    with TestClient(app) as client:
        assert len(frames(run(client, "g", steps=3))) == 3
    app = create_app(models, tmp_path / "output2", device="cuda", serve_frontend=False)
    with LiveServer(app) as srv:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=600)
        extra = {"steps": 6, "seed": 2, "sampler_name": "euler"}
        events = list(c.images.generate(model=CKPT.removesuffix(".safetensors"), prompt="a red cube", size="64x64",
                                        stream=True, partial_images=2, extra_body=extra))
        plain = c.images.generate(model=CKPT.removesuffix(".safetensors"), prompt="a red cube", size="64x64",
                                  extra_body=extra)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert base64.b64decode(events[-1].b64_json) == base64.b64decode(plain.data[0].b64_json)


def reference_taesd(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """madebyollin's TAESD decoder written out with torch.nn.functional from the released key names."""
    import torch.nn.functional as F

    def conv(i: int | str, h: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, sd[f"{i}.weight"], sd.get(f"{i}.bias"), padding=1)

    def block(i: int, h: torch.Tensor) -> torch.Tensor:
        y = conv(f"{i}.conv.4", F.relu(conv(f"{i}.conv.2", F.relu(conv(f"{i}.conv.0", h)))))
        return F.relu(y + h)

    h = F.relu(conv(1, torch.tanh(x / 3) * 3))
    for first in (3, 8, 13):
        for i in range(first, first + 3):
            h = block(i, h)
        h = conv(first + 4, F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return conv(19, block(18, h))


def random_taesd(path, channels: int = 16) -> dict:
    from safetensors.torch import save_file

    from sd35fp8.models.taesd import TAESDDecoder

    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in TAESDDecoder(channels).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return sd


def test_taesd_decoder_loads_released_layout(tmp_path):
    from safetensors.torch import save_file

    from sd35fp8.checkpoints.taesd import load_taesd_decoder
    from sd35fp8.errors import CheckpointError

    sd = random_taesd(tmp_path / "taesd3_decoder.safetensors")
    dec = load_taesd_decoder(tmp_path / "taesd3_decoder.safetensors")
    assert dec.latent_channels == 16
    x = torch.randn(1, 16, 5, 4, generator=torch.Generator().manual_seed(1))
    out = dec(x)
    assert out.shape == (1, 3, 40, 32)
    torch.testing.assert_close(out, reference_taesd(sd, x), rtol=1e-5, atol=1e-5)
    torch.save(sd, tmp_path / "taesd3_decoder.pth")  # ComfyUI's other released form
    torch.testing.assert_close(load_taesd_decoder(tmp_path / "taesd3_decoder.pth")(x), out)
    save_file({k: v for k, v in sd.items() if k != "19.bias"}, str(tmp_path / "cut.safetensors"))
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*19\.bias"):
        load_taesd_decoder(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_taesd_decoder(tmp_path / "junk.safetensors")


def test_taesd_previews_from_vae_approx(models, tmp_path, caplog):
    """preview_method taesd: previews at the image's size by models/vae_approx/taesd3_decoder.*; without the file
    (or with one that does not load) latent2rgb's, as ComfyUI falls back."""
    app = create_app(models, tmp_path / "output", device="cpu", serve_frontend=False, allow_hosts=HOSTS)
    approx = models / "vae_approx" / "taesd3_decoder.safetensors"
    with TestClient(app) as client:
        shots = frames(run(client, "t", {"preview_method": "taesd"}, steps=2, seed=7))
        assert [s.size for s in shots] == [(8, 8)] * 2 and "previews use latent2rgb" in caplog.text
        random_taesd(approx)
        shots = frames(run(client, "t", {"preview_method": "taesd"}, steps=2, seed=8))
        assert [s.size for s in shots] == [(64, 64)] * 2
    approx.unlink()


def test_finisher_sends_in_order_and_flushes():
    """The finisher thread behind GPU previews: jobs run in submission order, a failing one is logged and
    dropped, flush() returns once everything submitted has run."""
    import time as _time

    from sd35fp8.workflow.previews import FINISHER

    seen = []

    def job(i):
        def run():
            _time.sleep(0.002)
            if i == 3:
                raise RuntimeError("a broken preview")
            seen.append(i)
        return run

    for i in range(8):
        FINISHER.submit(job(i))
    FINISHER.flush()
    assert seen == [0, 1, 2, 4, 5, 6, 7]
