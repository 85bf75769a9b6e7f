"""Engine replicas on Ray Serve (scale/ray_serve.py): a local Ray cluster, 2 CPU replicas of the shipped model.

20 concurrent requests, 10 through the OpenAI route (openai client) and 10 through POST /prompt: each
answered with its own image, equal pixel for pixel to the image one local PromptExecutor makes from the same graph
alone on one thread (the replicas: one thread per CPU actor; max_batch=1, since FP8 dynamic matmuls
on the CPU round by thread count and batch), history complete. Then a replica process is killed while prompts run: every prompt ends in history (success,
or "error" with the replica failure named), none is lost, and Ray Serve brings the replica back.
Skipped when ray[serve] is not installed (pip install "sd35fp8[scale]").
"""

from __future__ import annotations

import base64
import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from comfy_models import build_models_folder
from live_server import LiveServer
from sd35fp8.server.openai_api import ImageRequest, build_graph, checkpoint_defaults
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow import ModelFolders, PromptExecutor, validate_prompt
from sd35fp8.workflow.executor import PromptJob

pytestmark = [pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built"),
              pytest.mark.slow]
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

MODEL = "stable-diffusion-3.5-fp8"
N = 20
WORDS = ["red cube", "blue ball", "green tree", "a cat", "a dog", "a house", "a boat", "a lamp", "a star", "a car"]


def pixels(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(int)


def request(i: int) -> ImageRequest:
    return ImageRequest(prompt=WORDS[i % len(WORDS)], size="32x32", steps=3, seed=100 + i, sampler_name="euler",
                        cfg=3.0, negative_prompt="")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from sd35fp8.scale.ray_serve import create_ray_app, shutdown

    root = tmp_path_factory.mktemp("ray")
    models = build_models_folder(root)
    app = create_ray_app(models, root / "output", replicas=2, device="cpu", serve_frontend=False, max_batch=1,
                         deployment={"health_check_period_s": 2.0, "num_cpus": 0.5}, preview_method="latent2rgb")
    with LiveServer(app, timeout=120) as srv:
        srv.models, srv.root = models, root
        yield srv
    shutdown()


@pytest.fixture(scope="module")
def reference(cluster):
    """The 20 images from one local executor, each prompt alone on one thread, as the replicas run them
    (max_batch=1: FP8 dynamic matmuls on the CPU round by thread count and batch)."""
    folders = ModelFolders(cluster.models, output_dir=cluster.root / "ref")
    ex = PromptExecutor(folders, device="cpu")
    defaults = checkpoint_defaults(SHIPPED_CHECKPOINT)
    jobs = []
    for i in range(N):
        g = build_graph(request(i), f"{MODEL}.safetensors", defaults, f"ref{i}")
        jobs.append(PromptJob(g, f"ref{i}", {}, None, validate_prompt(g, ex.classes, folders)[2]))
    out, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as the replicas (Ray: one thread per CPU actor)
    try:
        results = [ex.execute(j.prompt, j.prompt_id, {}, execute_outputs=j.execute_outputs) for j in jobs]
    finally:
        torch.set_num_threads(threads)
    for r in results:
        (ui,) = r.outputs.values()
        (img,) = ui["images"]
        out[int(r.prompt_id[3:])] = pixels((folders.output_dir / img["subfolder"] / img["filename"]).read_bytes())
    return out


def wait_history(url: str, pid: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = requests.get(f"{url}/history/{pid}", timeout=30).json()
        if pid in h:
            return h[pid]
        time.sleep(0.2)
    raise AssertionError(f"prompt {pid} never reached history")


def comfy_image(url: str, entry: dict) -> np.ndarray:
    (ui,) = entry["outputs"].values()
    (img,) = ui["images"]
    return pixels(requests.get(f"{url}/view", params=img, timeout=30).content)


def replica_pids(handle, want: int = 2, tries: int = 60) -> set[int]:
    pids: set[int] = set()
    for _ in range(tries):
        pids.add(handle.info.remote().result()["pid"])
        if len(pids) >= want:
            break
    return pids


def test_twenty_concurrent_requests_each_get_their_image(cluster, reference):
    url = cluster.url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    defaults = checkpoint_defaults(SHIPPED_CHECKPOINT)

    def via_openai(i: int) -> np.ndarray:
        r = request(i)
        extra = {k: v for k, v in r.model_dump().items() if k in ("steps", "seed", "sampler_name", "cfg")}
        got = client.images.generate(model=MODEL, prompt=r.prompt, size=r.size, response_format="b64_json",
                                     extra_body=extra)
        return pixels(base64.b64decode(got.data[0].b64_json))

    def via_comfy(i: int) -> np.ndarray:
        g = build_graph(request(i), f"{MODEL}.safetensors", defaults, f"comfy{i}")
        pid = requests.post(f"{url}/prompt", json={"prompt": g}, timeout=30).json()["prompt_id"]
        entry = wait_history(url, pid)
        assert entry["status"]["status_str"] == "success", entry["status"]
        return comfy_image(url, entry)

    with ThreadPoolExecutor(N) as pool:
        futs = {i: pool.submit(via_openai if i % 2 else via_comfy, i) for i in range(N)}
        images = {i: f.result() for i, f in futs.items()}
    diffs = [int(np.abs(images[i] - reference[i]).max()) for i in range(N)]
    assert diffs == [0] * N, f"max uint8 difference to the one-process image, per request: {diffs}"
    hist = requests.get(f"{url}/history", timeout=30).json()
    assert len(hist) >= N and all(e["status"]["status_str"] == "success" for e in hist.values())
    assert requests.get(f"{url}/queue", timeout=30).json() == {"queue_running": [], "queue_pending": []}


def test_killed_replica_loses_no_prompt_and_comes_back(cluster, reference):
    from ray import serve

    url, handle = cluster.url, cluster.app.state.ray_handle
    before = replica_pids(handle)
    assert len(before) == 2
    defaults = checkpoint_defaults(SHIPPED_CHECKPOINT)
    pids = []
    for i in range(8):
        g = build_graph(request(i), f"{MODEL}.safetensors", defaults, f"kill{i}")
        pids.append(requests.post(f"{url}/prompt", json={"prompt": g}, timeout=30).json()["prompt_id"])
    deadline = time.monotonic() + 120
    while not requests.get(f"{url}/queue", timeout=30).json()["queue_running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(sorted(before)[0], signal.SIGKILL)
    entries = {pid: wait_history(url, pid) for pid in pids}
    states = [e["status"]["status_str"] for e in entries.values()]
    assert set(states) <= {"success", "error"} and "success" in states
    for i, pid in enumerate(pids):
        e = entries[pid]
        if e["status"]["status_str"] == "success":
            assert np.array_equal(comfy_image(url, e), reference[i])
        else:
            (msg,) = [m[1] for m in e["status"]["messages"] if m[0] == "execution_error"]
            assert "engine replica failed" in msg["exception_message"]
    # Ray Serve replaces the dead replica
    deadline = time.monotonic() + 180
    while True:
        status = serve.status().applications["sd35fp8"].deployments["SD35Engine"]
        if status.replica_states.get("RUNNING", 0) == 2 and status.status == "HEALTHY":
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    while len(after := replica_pids(handle, tries=20)) < 2:  # the handle learns of the new replica a little later
        assert time.monotonic() < deadline, after
        time.sleep(1)
    assert after != before


def test_previews_and_stream_through_replicas(cluster):
    """The replicas run with the server's --preview-method (create_ray_app passes it with the other engine
    options): /ws preview frames and the OpenAI stream's partial images come back from a replica."""
    import json
    import struct

    import websockets.sync.client as ws_client

    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=600)
    events = list(client.images.generate(model=MODEL, prompt="a red cube", size="32x32", stream=True, partial_images=2,
                                         extra_body={"steps": 4, "seed": 1, "sampler_name": "euler"}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    g = build_graph(request(0), f"{MODEL}.safetensors", checkpoint_defaults(SHIPPED_CHECKPOINT), "ws")
    shots = []
    with ws_client.connect(f"{cluster.url.replace('http', 'ws')}/ws?clientId=rw", open_timeout=30) as ws:
        ws.recv(timeout=30)
        requests.post(f"{cluster.url}/prompt", json={"prompt": g, "client_id": "rw"}, timeout=30).raise_for_status()
        while True:
            m = ws.recv(timeout=600)
            if isinstance(m, bytes):
                shots.append(struct.unpack(">II", m[:8]))
            elif json.loads(m)["type"] == "executing" and json.loads(m)["data"]["node"] is None:
                break
    assert shots == [(1, 1)] * 3  # request(0): 3 steps, one JPEG frame each


def test_deploy_config_is_valid_and_builds():
    """deploy/ray_serve.yaml passes Ray Serve's schema and its import_path builds the engine app."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from sd35fp8.scale.ray_serve import DEPLOYMENT_NAME, build_app

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "ray_serve.yaml").read_text())
    (app,) = ServeDeploySchema.model_validate(config).applications
    assert app.import_path == "sd35fp8.scale.ray_serve:build_app"
    built = build_app(app.args)
    deployment = built._bound_deployment
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment._deployment_config.autoscaling_config.max_replicas == 4
    assert deployment.ray_actor_options["num_gpus"] == 1
