"""A PNG saved by our server, dropped back in, reproduces the same image (issue 20).

The server runs a UI-format workflow as the web UI queues it (the API prompt from the graph, the graph
itself in extra_pnginfo): the shipped model with the shipped Canny ControlNet on a control image, a
KSampler whose seed widget says "randomize" (the frontend randomises after queueing: the saved
workflow holds the seed that ran). The PNG is fetched through /view, then dropped back in:

- `sd35fp8 run out.png` (the CLI entry point, a fresh executor): the embedded "prompt" runs again;
- the web UI: on a dropped PNG the browser reads the tEXt chunks (ComfyUI frontend getPngMetadata),
  loads the "workflow" graph (or, without one, the "prompt" as API JSON) and queues it: POST /prompt
  with the graph converted to an API prompt (the frontend's graphToPrompt; ui_to_api here) and the
  graph in extra_pnginfo. Both are posted to the same server after POST /free (else every node
  would come from the output cache and nothing would run again).

Each gives the server's pixels exactly. CPU, 128 px, 3 steps.
"""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sd35fp8.tiny import SHIPPED_CHECKPOINT, SHIPPED_CONTROLNET, SHIPPED_T5_TOKENIZER
from sd35fp8.workflow.ui_convert import ui_to_api

pytestmark = pytest.mark.skipif(not (SHIPPED_CHECKPOINT.exists() and SHIPPED_CONTROLNET.exists()),
                                reason="shipped model weights not built")
CKPT, CNET = "sd35fp8_tiny.safetensors", "sd35fp8_tiny_controlnet_canny.safetensors"
SIZE, STEPS, SEED = 128, 3, 417


def ui_workflow() -> dict:
    """A UI-format graph (nodes + links + widgets_values), as the frontend saves and sends it."""
    spec = [  # id, type, widgets_values, [(input name, type, origin id, origin slot)], output types
        (1, "CheckpointLoaderSimple", [CKPT], [], ["MODEL", "CLIP", "VAE"]),
        (2, "CLIPTextEncode", ["a red square and a blue circle on grass"], [("clip", "CLIP", 1, 1)], ["CONDITIONING"]),
        (3, "CLIPTextEncode", [""], [("clip", "CLIP", 1, 1)], ["CONDITIONING"]),
        (4, "ControlNetLoader", [CNET], [], ["CONTROL_NET"]),
        (5, "LoadImage", ["control.png", "image"], [], ["IMAGE", "MASK"]),
        (6, "Canny", [0.4, 0.8], [("image", "IMAGE", 5, 0)], ["IMAGE"]),
        (7, "ControlNetApplyAdvanced", [0.8, 0.0, 1.0],
         [("positive", "CONDITIONING", 2, 0), ("negative", "CONDITIONING", 3, 0),
          ("control_net", "CONTROL_NET", 4, 0), ("image", "IMAGE", 6, 0), ("vae", "VAE", 1, 2)],
         ["CONDITIONING", "CONDITIONING"]),
        (8, "EmptySD3LatentImage", [SIZE, SIZE, 1], [], ["LATENT"]),
        (9, "KSampler", [SEED, "randomize", STEPS, 4.5, "euler", "normal", 1.0],
         [("model", "MODEL", 1, 0), ("positive", "CONDITIONING", 7, 0), ("negative", "CONDITIONING", 7, 1),
          ("latent_image", "LATENT", 8, 0)], ["LATENT"]),
        (10, "VAEDecode", [], [("samples", "LATENT", 9, 0), ("vae", "VAE", 1, 2)], ["IMAGE"]),
        (11, "SaveImage", ["dropback"], [("images", "IMAGE", 10, 0)], []),
    ]
    nodes = {nid: {"id": nid, "type": kind, "pos": [nid * 50, 0], "size": [300, 100], "flags": {}, "order": nid,
                   "mode": 0, "inputs": [], "outputs": [{"name": t, "type": t, "links": []} for t in outs],
                   "properties": {}, "widgets_values": widgets}
             for nid, kind, widgets, _, outs in spec}
    links = []
    for nid, _, _, ins, _ in spec:
        for slot, (name, kind, origin, o_slot) in enumerate(ins):
            lid = len(links) + 1
            links.append([lid, origin, o_slot, nid, slot, kind])
            nodes[nid]["inputs"].append({"name": name, "type": kind, "link": lid})
            nodes[origin]["outputs"][o_slot]["links"].append(lid)
    return {"id": "dropback", "revision": 0, "last_node_id": len(spec), "last_link_id": len(links),
            "nodes": list(nodes.values()), "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dropback")
    for sub in ("models/checkpoints", "models/controlnet", "input"):
        (root / sub).mkdir(parents=True)
    shutil.copy(SHIPPED_CHECKPOINT, root / "models/checkpoints" / CKPT)
    shutil.copy(SHIPPED_T5_TOKENIZER, root / "models/checkpoints/spiece.model")  # the tiny model's vocabulary
    shutil.copy(SHIPPED_CONTROLNET, root / "models/controlnet" / CNET)
    control_image().save(root / "input/control.png")
    return root


def control_image() -> Image.Image:
    """The LoadImage input: two shapes (Canny gives their outlines to the ControlNet)."""
    img = Image.new("RGB", (SIZE, SIZE), (90, 160, 70))
    draw = ImageDraw.Draw(img)
    draw.rectangle((16, 20, 60, 64), fill=(220, 30, 30))
    draw.ellipse((70, 60, 118, 108), fill=(30, 40, 220))
    return img


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def run_prompt(client, prompt: dict, extra_pnginfo: dict | None = None) -> tuple[dict, bytes]:
    """POST /prompt, wait for its history entry, GET its one image through /view -> (image entry, bytes)."""
    body = {"prompt": prompt, "client_id": "dropback"}
    if extra_pnginfo is not None:
        body["extra_data"] = {"extra_pnginfo": extra_pnginfo}
    r = client.post("/prompt", json=body)
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        hist = client.get(f"/history/{pid}").json()
        if pid in hist and hist[pid]["status"].get("completed") is not None:
            break
        time.sleep(0.05)
    entry = hist[pid]
    assert entry["status"]["completed"], entry["status"]
    (image,) = [i for out in entry["outputs"].values() for i in out.get("images", [])]
    view = client.get("/view", params=image)
    assert view.status_code == 200 and view.headers["content-type"] == "image/png"
    return image, view.content


def test_server_png_dropped_back_reproduces(root, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from sd35fp8.cli import main
    from sd35fp8.server import create_app, stop_app

    wf = ui_workflow()
    app = create_app(root / "models", output_dir=root / "output", input_dir=root / "input", device="cpu",
                     serve_frontend=False, allow_hosts=("testserver",))  # TestClient's Host
    try:
        with TestClient(app) as client:
            # the web UI's Run: the graph as an API prompt, the graph itself for the PNG
            first, png = run_prompt(client, ui_to_api(wf), {"workflow": wf})
            want = pixels(png)
            assert want.shape == (SIZE, SIZE, 3) and want.std() > 1.0  # a real picture, not a blank
            text = Image.open(io.BytesIO(png)).text
            assert set(text) >= {"prompt", "workflow"}
            embedded_wf, embedded_prompt = json.loads(text["workflow"]), json.loads(text["prompt"])
            assert embedded_wf == wf and embedded_prompt["9"]["inputs"]["seed"] == SEED

            # (a) `sd35fp8 run out.png`: a fresh executor runs the embedded prompt
            dropped = tmp_path / "out.png"
            dropped.write_bytes(png)
            capsys.readouterr()
            rc = main(["run", str(dropped), "--models", str(root / "models"), "--output", str(tmp_path / "cli"),
                       "--device", "cpu"])
            printed = capsys.readouterr().out.split()
            assert rc == 0 and len(printed) == 1, printed
            assert np.array_equal(np.asarray(Image.open(printed[0]).convert("RGB")), want)
            assert json.loads(Image.open(printed[0]).text["workflow"]) == wf  # the graph travels on

            # (b) the web UI's drop: the graph from the "workflow" chunk, queued again
            assert client.post("/free", json={"unload_models": True, "free_memory": True}).status_code == 200
            again, png2 = run_prompt(client, ui_to_api(embedded_wf), {"workflow": embedded_wf})
            assert again["filename"] != first["filename"]  # executed again, not served from the cache
            assert np.array_equal(pixels(png2), want)
            # ... and a PNG with only the API prompt (the frontend loads it as API JSON and queues it)
            assert client.post("/free", json={"unload_models": True}).status_code == 200
            third, png3 = run_prompt(client, embedded_prompt)
            assert third["filename"] not in (first["filename"], again["filename"])
            assert np.array_equal(pixels(png3), want)
            assert set(Image.open(io.BytesIO(png3)).text) == {"prompt"}
    finally:
        stop_app(app)
