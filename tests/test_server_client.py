"""End to end with a published ComfyUI client (PyPI `comfy-api-simplified`) against a real uvicorn server.

The client queues the prompt (POST /prompt), follows it over /ws, reads /history and fetches the
image with /view. Backend: the shipped model on the CPU running the seed's all-in-one FP8 workflow
(tests/data/seed-fp8-allinone.json at 128x128, 4 steps); the fake executor of test_server.py when the
shipped weights are missing. SD35FP8_SERVER_MODELS (a ComfyUI models folder) and
SD35FP8_SERVER_WORKFLOW (an API-format workflow whose output node is titled "Save Image") point it at
other files.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

comfy_api = pytest.importorskip("comfy_api_simplified", reason="pip install comfy-api-simplified")
pytest.importorskip("websockets", reason="uvicorn needs websockets for /ws")
pytest.importorskip("uvicorn")

from live_server import LiveServer  # noqa: E402
from sd35fp8.server import create_app  # noqa: E402
from sd35fp8.workflow import ModelFolders, PromptExecutor  # noqa: E402
from test_server import HOLD, HOLD_SEED, fake_prompt, make_fake_executor, wait_for  # noqa: E402


def fake_backend(tmp_path: Path) -> tuple[PromptExecutor, dict, bool]:
    """(executor, prompt, gated): the fake sampler holds until the client's socket is connected."""
    return make_fake_executor(tmp_path), fake_prompt(seed=HOLD_SEED, steps=4), True


def real_backend(tmp_path: Path) -> tuple[PromptExecutor, dict, bool]:
    if os.environ.get("SD35FP8_SERVER_MODELS"):
        models = Path(os.environ["SD35FP8_SERVER_MODELS"])
        prompt = json.loads(Path(os.environ["SD35FP8_SERVER_WORKFLOW"]).read_text(encoding="utf-8"))
    else:
        from comfy_models import WORKFLOWS, build_models_folder

        models = build_models_folder(tmp_path)
        prompt = json.loads((WORKFLOWS / "seed-fp8-allinone.json").read_text(encoding="utf-8"))
        for node in prompt.values():
            if node["class_type"] == "EmptyLatentImage":
                node["inputs"].update(width=128, height=128)
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = 4
    folders = ModelFolders(models, output_dir=tmp_path / "output", input_dir=tmp_path / "input",
                           temp_dir=tmp_path / "temp")
    return PromptExecutor(folders, device=os.environ.get("SD35FP8_SERVER_DEVICE", "cpu")), prompt, False


@pytest.fixture()
def server(tmp_path):
    from sd35fp8.tiny import SHIPPED_CHECKPOINT

    real = os.environ.get("SD35FP8_SERVER_MODELS") or SHIPPED_CHECKPOINT.exists()
    backend = real_backend if real else fake_backend
    executor, prompt, gated = backend(tmp_path)
    app = create_app(tmp_path / "models", executor=executor)
    with LiveServer(app, timeout=20) as srv:
        HOLD.clear()
        try:
            yield app, srv.url, prompt, gated
        finally:
            HOLD.set()  # before the server stops: a held sampler would keep its worker busy


def test_client_end_to_end(server, caplog):
    app, url, prompt, gated = server
    if gated:  # release the sampler once the client listens, so it sees every progress message
        def release() -> None:
            wait_for(lambda: app.state.hub.client_ids, timeout=20)
            HOLD.set()
        threading.Thread(target=release, daemon=True).start()

    api = comfy_api.ComfyApiWrapper(url)
    assert "FakeSampler" in api.get_object_info() or not gated
    assert api.get_queue() == {"queue_running": [], "queue_pending": []}
    with caplog.at_level(logging.DEBUG, logger="comfy_api_simplified.comfy_api_wrapper"):
        t0 = time.time()
        images = api.queue_and_wait_images(comfy_api.ComfyWorkflowWrapper(prompt), "Save Image")
    messages = [r.msg for r in caplog.records if isinstance(r.msg, dict) and "type" in r.msg]
    kinds = [m["type"] for m in messages]
    assert "progress" in kinds and "executed" in kinds, kinds  # it connects after queueing
    last = [m for m in messages if m["type"] == "progress"][-1]["data"]
    assert last["value"] == last["max"]
    assert len(images) == 1
    name, data = next(iter(images.items()))
    img = Image.open(io.BytesIO(data))
    assert name.endswith(".png") and img.size[0] > 0 and "prompt" in img.info
    assert time.time() - t0 < 600
    history = requests.get(f"{url}/api/history", timeout=10).json()
    assert [v["status"]["status_str"] for v in history.values()] == ["success"]
    stats = api.get_system_stats()
    assert stats["devices"][0]["type"] in ("cpu", "cuda")
