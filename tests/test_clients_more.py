"""More published ComfyUI clients, end to end against a real uvicorn server with the shipped model on the CPU.

Each test drives one PyPI client library exactly as its README shows a user driving a real ComfyUI (it skips
where the library is not installed), on the shipped tiny model at 64x64 with 2 steps. Clients that cannot be
installed beside this project's pins are covered by the HTTP / WebSocket calls their source makes, reproduced
with requests / httpx / urllib (the `*_calls` tests). Audited (see each test): comfy-toolkit 0.1.0, comfyapi
2.0.1, comfy-headless 3.1.1, comfykit 0.1.12, comfyui-async-api-tool 0.1.0, comfyui-utils 0.0.1,
comfyui-workflow-client 0.1.0, comfyui-xy 0.3.0, pycomfy 0.4.0, comfy-commander 0.1.2, comfyflow 0.1.0,
comfy-ui-client 0.0.1.10, comfyui-skill-cli 0.2.14, comfyui-cli 0.1.1; by their calls: comfy-catapult 3.0.0 (pins websockets<13), comfy-api-client 0.1.0
(pins httpx<0.28) and comfyui-api-client 0.1.0 (pins Pillow==10.2; its modules import a package it does not
ship). comfy-api-simplified and comfy-script have their own files (test_server_client.py,
test_server_comfyscript.py).
"""

from __future__ import annotations

import asyncio
import io
import json
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from PIL import Image

from comfy_models import tiny_base_prompt, tiny_checkpoint_folder
from live_server import LiveServer
from sd35fp8.server import create_app
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow import ModelFolders, PromptExecutor

pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
pytest.importorskip("uvicorn")
pytest.importorskip("websockets", reason="uvicorn needs websockets for /ws")


@dataclass
class Comfy:
    url: str  # http://127.0.0.1:PORT
    host: str  # 127.0.0.1:PORT, the form most clients take
    root: Path  # models/, input/, output/, temp/


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = tiny_checkpoint_folder(tmp_path_factory.mktemp("clients"))
    folders = ModelFolders(root / "models", output_dir=root / "output", input_dir=root / "input",
                           temp_dir=root / "temp")
    app = create_app(root / "models", executor=PromptExecutor(folders, device="cpu"))
    with LiveServer(app, timeout=20) as srv:
        yield Comfy(srv.url, f"127.0.0.1:{srv.port}", root)


def workflow(seed: int = 1, prefix: str = "cl") -> dict:
    """An API-format text to image graph on the shipped model, as ComfyUI's "Save (API Format)" writes it."""
    p = tiny_base_prompt()
    p["2"]["_meta"] = {"title": "Positive"}
    p["5"] = {"class_type": "KSampler", "_meta": {"title": "KSampler"}, "inputs": {
        "model": ["1", 0], "seed": seed, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    p["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
    p["7"] = {"class_type": "SaveImage", "_meta": {"title": "Save Image"},
              "inputs": {"images": ["6", 0], "filename_prefix": prefix}}
    return p


def png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def png_file(path: Path, color=(200, 30, 30), size: int = 16, mode: str = "RGB") -> Path:
    Image.new(mode, (size, size), color).save(path)
    return path


def history(comfy: Comfy) -> dict:
    return requests.get(f"{comfy.url}/history", timeout=10).json()


# ---- installed clients ----------------------------------------------------------------------------------------
def test_comfy_toolkit(comfy):
    """comfy-toolkit: urllib client; /ws opened before POST /prompt, progress and node callbacks, then /history
    re-read until it holds outputs, /view; polling wait; a refused graph's 400 body in ComfySubmitError."""
    ct = pytest.importorskip("comfy_toolkit", reason="pip install comfy-toolkit")
    pytest.importorskip("websocket", reason="pip install websocket-client")
    c = ct.ComfyClient(comfy.url)
    assert c.is_online() and c.queue_status() == {"running": 0, "pending": 0}
    assert c.vram_stats()["vram_total"] > 0
    steps, nodes = [], []
    r = c.submit_and_track(workflow(seed=1, prefix="toolkit"), on_progress=lambda v, m: steps.append((v, m)),
                           on_node=nodes.append, history_retry_delay=0.1)
    assert steps[-1] == (2, 2) and "5" in nodes and "7" in nodes
    (img,) = r["images"]
    assert img["filename"].startswith("toolkit_") and img["type"] == "output"
    assert png(c.download(img)).size == (64, 64)
    pid = c.submit(workflow(seed=2, prefix="toolkit"))
    assert c.wait(pid, poll_interval=0.2, max_wait=120)["status"] == "completed"
    bad = workflow()
    bad["5"]["inputs"]["steps"] = 0
    with pytest.raises(ct.ComfySubmitError, match="value_smaller_than_min"):
        c.submit(bad)
    c.interrupt()  # POST /interrupt with a JSON body: nothing runs, 200


def test_comfyapi(comfy, tmp_path):
    """comfyapi: POST /prompt with a random numeric client id, /history/{id} polling ({} until done), the output
    URL /view?filename=...&type=output without a subfolder, a batch of seeds waited for in threads."""
    comfyapi = pytest.importorskip("comfyapi", reason="pip install comfyapi")
    wf_path = tmp_path / "wf.json"
    wf_path.write_text(json.dumps(workflow(seed=3, prefix="comfyapi")))
    api = comfyapi.ComfyAPIManager()
    api.set_base_url(comfy.url)
    api.load_workflow(str(wf_path))
    api.edit_workflow(["2", "inputs", "text"], "a red circle")
    pid = api.submit_workflow()
    filename, url = api.wait_for_finish(pid, poll_interval=0.2, max_wait_time=120)
    assert filename.startswith("comfyapi_") and url.endswith("&type=output") and api.check_queue(pid)
    saved = api.download_output(url, save_path=str(tmp_path / "out"))
    assert png(Path(saved).read_bytes()).size == (64, 64)
    uids = api.batch_submit(seeds=[4, 5], seed_node_path=["5", "inputs", "seed"])
    results, errors = api.wait_and_get_all_outputs(uids)
    assert errors == [] and len(results) == 2 and len({f for f, _ in results}) == 2


def test_comfy_headless(comfy):
    """comfy-headless: /system_stats health and VRAM, /object_info/{class} for checkpoints, samplers and
    schedulers, its own SD1-style graph (EmptyLatentImage) polled through /history, /view, /queue, /interrupt,
    POST /queue clear; extra_data.extra_pnginfo as PNG text chunks; the WebSocket client's progress events."""
    pytest.importorskip("comfy_headless", reason="pip install comfy-headless")
    from comfy_headless import ComfyClient, ComfyWSClient

    c = ComfyClient(comfy.url)
    assert c.is_online() and c.get_vram_gb() > 0
    assert c.get_checkpoints() == ["tiny.safetensors"]
    assert "euler" in c.get_samplers() and "normal" in c.get_schedulers()
    progress = []
    r = c.generate_image("a blue square", width=64, height=64, steps=2, cfg=4.0, seed=6, timeout=120,
                         on_progress=lambda p, s: progress.append(p))
    assert r["success"] and r["error"] is None and progress[-1] == 1.0, r
    (img,) = r["images"]
    assert png(c.get_image(img["filename"], img["subfolder"], img["type"])).size == (64, 64)
    deps = c.check_workflow_dependencies(c.build_txt2img_workflow("x", width=64, height=64))
    assert deps["all_installed"] and deps["missing"] == []
    assert c.check_workflow_types(c.build_txt2img_workflow("x", width=64, height=64))["errors"] == []

    pid = c.queue_prompt(workflow(seed=7, prefix="headless"), extra_pnginfo={"provenance": {"run": 7}})
    entry = c.wait_for_completion(pid, timeout=120, poll_interval=0.2)
    (img,) = entry["outputs"]["7"]["images"]
    info = png(c.get_image(img["filename"], img["subfolder"], img["type"])).info
    assert json.loads(info["provenance"]) == {"run": 7} and "prompt" in info
    assert c.get_queue() == {"queue_running": [], "queue_pending": []}
    assert c.cancel_current() and c.clear_queue()

    async def ws_run():
        async with ComfyWSClient(comfy.url) as ws:
            pid = await ws.queue_prompt(workflow(seed=8, prefix="headless"))
            seen = []

            async def on(p):
                seen.append(p.status)

            final = await ws.wait_for_completion(pid, timeout=120, on_progress=on)
            out = (await ws.get_history(pid))[pid]["outputs"]["7"]["images"][0]
            return final.status, seen, await ws.get_image(out["filename"], out["subfolder"], out["type"])

    status, seen, data = asyncio.run(ws_run())
    assert status == "completed" and {"started", "executing", "progress", "node_complete"} <= set(seen), seen
    assert png(data).size == (64, 64)


def test_comfykit(comfy, tmp_path):
    """comfykit: a workflow file whose node titles carry its DSL ($prompt.text!); seed 0 becomes a random 63-bit
    seed; the HTTP executor polls /history, the WebSocket one collects `executed` outputs until executing None.
    Its api key travels in extra_data.api_key_comfy_org, which ComfyUI keeps out of /queue and /history."""
    pytest.importorskip("comfykit", reason="pip install comfykit")
    from comfykit import ComfyKit

    wf = workflow(seed=0, prefix="kit")
    wf["2"]["_meta"] = {"title": "Prompt, $prompt.text!"}
    wf["7"]["_meta"] = {"title": "$output.images"}
    path = tmp_path / "kit.json"
    path.write_text(json.dumps(wf))

    async def run(kind: str):
        kit = ComfyKit(comfyui_url=comfy.url, executor_type=kind, api_key="sk-comfykit-secret")
        return await kit.execute(str(path), {"prompt": "a green triangle"})

    for kind in ("http", "websocket"):
        r = asyncio.run(run(kind))
        assert r.status == "completed", (kind, r.msg)
        (url,) = r.images
        assert png(requests.get(url, timeout=10).content).size == (64, 64)
        entry = history(comfy)[r.prompt_id]
        assert entry["prompt"][2]["2"]["inputs"]["text"] == "a green triangle"
        assert entry["prompt"][2]["5"]["inputs"]["seed"] != 0
    assert "sk-comfykit-secret" not in requests.get(f"{comfy.url}/history", timeout=10).text


def test_comfyui_async_api_tool(comfy):
    """comfyui-async-api-tool: least-loaded server from GET /prompt + GET /queue, POST /prompt then /ws (aiohttp),
    execution_success for the prompt, /history timestamps for the generation time, /view; /upload/image."""
    pytest.importorskip("comfyui_async_api_tool", reason="pip install comfyui-async-api-tool")
    import aiohttp
    from comfyui_async_api_tool import ComfyClient

    async def run():
        async with aiohttp.ClientSession() as session:
            c = ComfyClient(session, servers=[comfy.url], max_listen_seconds=60, fetch_image_timeout=60)
            best = await c.pick_server()
            events = [e async for e in c.run(workflow(prefix="asynctool"), values={"5": {"seed": 42}})]
            up = await c.upload_image(comfy.url, png_file_bytes())
            return best, events, up

    best, events, up = asyncio.run(run())
    assert best["status"] == "success" and best["load"] == 0
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "image", events
    assert [e["data"] for e in events if e["type"] == "progress"][-1] == 100.0
    assert png(events[-1]["data"]).size == (64, 64) and events[-1]["generation_ms"] >= 0
    assert up["type"] == "input" and (comfy.root / "input" / up["name"]).is_file()


def png_file_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_comfyui_utils(comfy):
    """comfyui-utils: POST /prompt, then /ws: each `status` makes it read /queue for its place, or (the prompt
    gone from it) /history for the entry whose prompt[2] equals the graph it sent; the node ids of `executing` as
    ints; the node errors of a refused graph."""
    comfy_mod = pytest.importorskip("comfyui_utils.comfy", reason="pip install comfyui-utils")

    class Callbacks(comfy_mod.Callbacks):
        def __init__(self):
            self.events, self.result = [], None

        async def queue_position(self, position):
            self.events.append(("queue", position))

        async def in_progress(self, node_id, progress, total):
            self.events.append((node_id, progress, total))

        async def completed(self, outputs, cached):
            self.result = (outputs, cached)

    api = comfy_mod.ComfyAPI(comfy.host)
    first, again = Callbacks(), Callbacks()
    asyncio.run(api.submit(workflow(seed=9, prefix="utils"), first))
    asyncio.run(api.submit(workflow(seed=9, prefix="utils"), again))  # the same graph: every node cached
    for cb in (first, again):
        outputs, _ = cb.result
        assert outputs["images"][0]["filename"].startswith("utils_"), cb.events
    assert first.result[0] == again.result[0]  # ComfyUI: a cached SaveImage reports the file it saved before
    got = []

    async def keep(f):
        got.append(png(f.read()).size)

    asyncio.run(api.fetch(first.result[0]["images"][0], keep))
    assert got == [(64, 64)]
    bad = workflow()
    bad["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(ValueError, match="Node 5, sampler_name"):
        asyncio.run(api.submit(bad, Callbacks()))


def test_comfyui_workflow_client(comfy, tmp_path):
    """comfyui-workflow-client: nodes found by class or title; an image uploaded into input/temp/ and named
    'temp/temp.png' in LoadImage; an extra input the node does not declare (seed_control) is ignored, as ComfyUI
    does; the sync client polls /history, the async one waits for executing None on /ws."""
    pytest.importorskip("comfyuiclient", reason="pip install comfyui-workflow-client")
    from comfyuiclient import ComfyUIClient, ComfyUIClientAsync

    wf = workflow(seed=10, prefix="wfclient")
    wf["5"]["inputs"]["seed_control"] = "fixed"  # its UI-format converter keeps this widget
    wf["20"] = {"class_type": "LoadImage", "_meta": {"title": "Load"}, "inputs": {"image": "x.png", "upload": "image"}}
    wf["21"] = {"class_type": "ImageScale", "inputs": {"image": ["20", 0], "upscale_method": "nearest-exact",
                                                        "width": 8, "height": 8, "crop": "disabled"}}
    wf["22"] = {"class_type": "SaveImage", "_meta": {"title": "Scaled"},
                "inputs": {"images": ["21", 0], "filename_prefix": "wfclient_scaled"}}
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(wf))
    c = ComfyUIClient(comfy.host, str(path))
    c.connect()
    c.set_data("Positive", text="a dog")
    c.set_data("KSampler", seed=11)
    c.set_data("Load", image=Image.new("RGB", (32, 32), (0, 200, 0)))
    out = c.generate(["Save Image", "Scaled"])
    c.close()
    assert out["Save Image"].size == (64, 64) and out["Scaled"].size == (8, 8)
    assert out["Scaled"].convert("RGB").getpixel((4, 4)) == (0, 200, 0)
    assert (comfy.root / "input" / "temp" / "temp.png").is_file()

    async def run():
        a = ComfyUIClientAsync(comfy.host, str(path))
        await a.connect()
        try:
            await a.set_data("Load", image=Image.new("RGB", (32, 32), (0, 0, 200)))
            return await a.generate(["Scaled"])
        finally:
            await a.close()

    assert asyncio.run(run())["Scaled"].convert("RGB").getpixel((4, 4)) == (0, 0, 200)


def test_comfyui_xy(comfy, tmp_path):
    """comfyui-xy: /upload/image (type input, overwrite), /object_info/{class}, POST /prompt without a client id
    polled through /history, every file of the outputs (a PreviewImage's temp file too) through /view;
    /upload/mask without original_ref is refused; the aiohttp client."""
    pytest.importorskip("comfyui_xy", reason="pip install comfyui-xy")
    from comfyui_xy import AsyncComfyUiClient, ComfyUiClient, ComfyUiHttpError

    image = png_file(tmp_path / "xy.png", (9, 90, 9))
    with ComfyUiClient(comfy.url, raise_on_error=True, execution_timeout=120) as c:
        name = c.upload_image(str(image))
        assert name == "xy.png" and c.upload_image(str(image)) == "xy.png"  # overwrite=true
        with pytest.raises(ComfyUiHttpError):
            c.upload_mask(str(image))  # ComfyUI needs original_ref too
        assert list(c.get_object_info("KSampler")) == ["KSampler"]
        wf = workflow(seed=12, prefix="xy")
        wf["20"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        wf["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}}
        responses = c.process_workflow(wf)
        files = {(r.node_id, r.source_type): r for r in responses if r.is_file}
        assert files[("7", "output")].image.size == (64, 64)
        assert files[("21", "temp")].image.convert("RGB").getpixel((0, 0)) == (9, 90, 9)
        assert c.interrupt() and c.get_queue() == {"queue_running": [], "queue_pending": []}

    async def run():
        async with AsyncComfyUiClient(comfy.url, raise_on_error=True, execution_timeout=120) as a:
            return await a.process_workflow(workflow(seed=13, prefix="xy_async"))

    (r,) = asyncio.run(run())
    assert r.filename.startswith("xy_async_") and r.image.size == (64, 64)


def test_pycomfy(comfy):
    """pycomfy: its bundled SD1.5 text-to-image template (nodes with a top-level "title" key besides class_type
    and inputs) with the checkpoint, sampler settings and size replaced; images from the `executed` message."""
    pytest.importorskip("pycomfy", reason="pip install pycomfy")
    from pycomfy import ComfyAPI

    with ComfyAPI(comfy.host) as api:
        images = api.text_to_image("a red circle", checkpoint_name="tiny.safetensors", steps=2, cfg=4.0,
                                   width=64, height=64, seed=14)
    assert [i.size for i in images] == [(64, 64)]


def test_comfy_commander(comfy, tmp_path):
    """comfy-commander: an API workflow file edited by node title, executed and polled through /history, every
    output fetched; the workflow read back from the PNG's "prompt" chunk runs again."""
    pytest.importorskip("comfy_commander", reason="pip install comfy-commander")
    from comfy_commander import ComfyUIServer, Workflow

    path = tmp_path / "wf.json"
    path.write_text(json.dumps(workflow(seed=15)))
    server = ComfyUIServer(comfy.url, timeout=60)
    assert server.is_available()
    wf = Workflow.from_file(str(path))
    wf.node(title="Save Image").param("filename_prefix").set("commander")
    r = server.execute(wf, poll_interval=0.2, timeout=120)
    assert r.status == "success", r.error_message
    out = r.media.find_by_title("Save Image")
    assert out.filename.startswith("commander_") and out.is_image
    out.save(str(tmp_path / "out.png"))
    again = server.execute(Workflow.from_image(str(tmp_path / "out.png")), poll_interval=0.2, timeout=120)
    assert again.status == "success" and len(again.media) == 1, again.error_message


def test_comfyflow(comfy, tmp_path):
    """comfyflow: /models/{folder} and /object_info build typed node factories (defaults, combos, ranges checked
    client side); a local file for LoadImage's image_upload input goes through /upload/image into
    input/comfyflow/; `executed` outputs fetched through /view while the prompt runs."""
    pytest.importorskip("comfyflow", reason="pip install comfyflow")
    from comfyflow import AsyncComfyClient, Workflow

    source = png_file(tmp_path / "flow.png", (250, 5, 5))

    async def run():
        c = await AsyncComfyClient.create(comfy.host)
        wf = Workflow(c)
        ckpt = wf.CheckpointLoaderSimple(ckpt_name=c.checkpoints[0])
        pos = wf.CLIPTextEncode(text="a cat", clip=ckpt.CLIP)
        neg = wf.CLIPTextEncode(text="", clip=ckpt.CLIP)
        latent = wf.EmptySD3LatentImage(width=64, height=64)
        sampled = wf.KSampler(model=ckpt.MODEL, positive=pos.CONDITIONING, negative=neg.CONDITIONING,
                              latent_image=latent.LATENT, steps=2, seed=16, sampler_name="euler", scheduler="simple")
        wf.SaveImage(images=wf.VAEDecode(samples=sampled.LATENT, vae=ckpt.VAE).IMAGE, filename_prefix="flow")
        wf.PreviewImage(images=wf.LoadImage(image=str(source)).IMAGE)
        steps = []
        got = [(node, img.size) async for node, img in c.run(wf, on_progress=lambda *a: steps.append(a))]
        return c, got, steps

    c, got, steps = asyncio.run(run())
    assert c.checkpoints == ["tiny.safetensors"]
    assert sorted(got) == [("7", (64, 64)), ("9", (16, 16))]
    assert ("5", "KSampler", 2, 2, True) in steps
    assert (comfy.root / "input" / "comfyflow" / "flow.png").is_file()


def test_comfy_ui_client(comfy, tmp_path):
    """comfy-ui-client: urllib everywhere (POST /prompt form-encoded, the body JSON), /embeddings, /extensions,
    GET /prompt, /object_info/{class}, /view_metadata; outputs after executing None, found again in /history by
    the graph when the prompt already left the queue; uploads with original_ref; POST /history delete and clear."""
    pytest.importorskip("comfy_ui_client", reason='pip install --no-deps comfy-ui-client (it requires the '
                                                  'Python 2 "uuid" package)')
    from comfy_ui_client.client import ComfyUIClient
    from comfy_ui_client.type import ImageRef

    c = ComfyUIClient(comfy.host)
    assert c.get_embeddings() == [] and c.get_prompt() == {"exec_info": {"queue_remaining": 0}}
    assert isinstance(c.get_extensions(), list) and list(c.get_object_info("KSampler")) == ["KSampler"]
    assert "modelspec.title" in c.view_metadata("checkpoints", "tiny.safetensors")
    executed = []
    out = c.get_outputs(workflow(seed=17, prefix="uiclient"), handle_executed_event=lambda d: executed.append(d))
    ((name, data),) = out["images"]["7"]["output"][""].items()
    assert name.startswith("uiclient_") and png(data).size == (64, 64)
    source = png_file(tmp_path / "src.png", (0, 0, 0, 255), mode="RGBA")
    ref = ImageRef("example.png", "", "input")
    assert c.upload_image(ref, str(source), overwrite=True)["name"] == "example.png"
    assert c.upload_mask(ref, str(source), overwrite=True)["type"] == "input"
    pid = next(iter(c.get_history(None)))
    c.delete_history([pid])
    assert pid not in c.get_history(None)
    c.clear_history()
    assert c.get_history(None) == {}


def test_comfyui_skill_cli(comfy):
    """comfyui-skill-cli: POST /prompt with a priority `number` and extra_data.api_key_comfy_org, /ws events
    until executing None, /api/jobs and /api/jobs/{id} (outputs, no api key), /view; workflows listed by
    /v2/userdata (absent here, as in older ComfyUI) then /userdata?dir=workflows (bare names) and read back;
    its partial targets [[id]] select nothing in ComfyUI either."""
    pytest.importorskip("comfyui_skills_cli", reason="pip install comfyui-skill-cli")
    pytest.importorskip("websocket", reason="pip install websocket-client")
    from comfyui_skills_cli.client import ComfyUIClient

    c = ComfyUIClient(comfy.url, comfy_api_key="sk-skill-secret")
    assert c.check_health()["status"] == "online"
    sent = c.queue_prompt(workflow(seed=20, prefix="skill"), priority=5)
    assert sent["number"] == 5
    events = [e["type"] for e in c.ws_events(sent["client_id"], sent["prompt_id"])]
    assert events[-1] == "executing" and "execution_success" in events and "progress" in events
    jobs = c.get_jobs(limit=1)
    assert jobs["pagination"]["limit"] == 1 and jobs["jobs"][0]["id"] == sent["prompt_id"]
    job = c.get_job(sent["prompt_id"])
    assert job["status"] == "completed" and "sk-skill-secret" not in json.dumps(job)
    (img,) = job["outputs"]["7"]["images"]
    assert png(c.download_output(img["filename"], img["subfolder"], img["type"])).size == (64, 64)
    assert c.get_job(str(uuid.uuid4())) is None
    requests.post(f"{comfy.url}/userdata/workflows%2Fskill.json", data=b'{"nodes": []}', timeout=10).raise_for_status()
    assert c.list_userdata_workflows() == ["workflows/skill.json"]
    assert c.read_userdata_workflow("workflows/skill.json") == {"nodes": []}
    with pytest.raises(requests.HTTPError) as refused:
        c.queue_prompt(workflow(seed=21), targets=["7"])
    assert refused.value.response.json()["error"]["type"] == "prompt_no_outputs"


def test_comfyui_cli(comfy, tmp_path):
    """comfyui-cli (its urllib client): GET /prompt, /models, /models/{folder}, /view_metadata/{folder},
    /internal/folder_paths and /internal/files/{type}, POST /prompt polled through /history, /view, a hand-built
    multipart upload, POST /interrupt and /free without a body or with one, settings, a refused graph's error."""
    pytest.importorskip("comfyui.core.client", reason="pip install comfyui-cli")
    from comfyui.core.client import ComfyUIAPIError, ComfyUIClient

    c = ComfyUIClient(port=int(comfy.host.rsplit(":", 1)[1]))
    assert c.is_server_running() and c.get_queue_status() == {"exec_info": {"queue_remaining": 0}}
    assert "checkpoints" in c.get_model_types() and c.get_models("checkpoints") == ["tiny.safetensors"]
    assert "modelspec.title" in c.get_model_metadata("checkpoints", "tiny.safetensors")
    assert "checkpoints" in c.get_folder_paths() and isinstance(c.list_files("output"), list)
    entry = c.execute_and_wait(workflow(seed=22, prefix="cli"), poll_interval=0.2, timeout=120)
    assert entry["status"]["status_str"] == "success"
    (img,) = entry["outputs"]["7"]["images"]
    assert png(c.view_image(img["filename"])).size == (64, 64)
    assert c.upload_image(str(png_file(tmp_path / "cli.png")), overwrite=True) == {
        "name": "cli.png", "subfolder": "", "type": "input"}
    assert c.interrupt() is None and c.free_memory() is None
    c.set_setting("Cli.Test", 3)
    assert c.get_setting("Cli.Test") == {"value": 3}
    with pytest.raises(ComfyUIAPIError) as refused:
        c.queue_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert refused.value.status_code == 400 and refused.value.data["error"]["type"] == "missing_node_type"


# ---- clients reproduced by their calls ----------------------------------------------------------------------------
def wait_history(comfy: Comfy, prompt_id: str, timeout: float = 120.0) -> dict:
    import time

    end = time.time() + timeout
    while time.time() < end:
        entry = requests.get(f"{comfy.url}/history/{prompt_id}", timeout=10).json().get(prompt_id)
        if entry is not None:
            return entry
        time.sleep(0.1)
    raise AssertionError(f"prompt {prompt_id} did not finish")


def test_comfy_catapult_calls(comfy):
    """comfy-catapult 3.0.0 (ComfyAPIClient): POST /prompt with a raw bytes body (aiohttp's
    application/octet-stream), its own prompt_id and number; every JSON answer must say application/json (it
    refuses another content type); /queue entries are 5-tuples; /upload/image with its extra `filename` field."""
    pid = str(uuid.uuid4())
    r = requests.post(f"{comfy.url}/prompt", headers={"Content-Type": "application/octet-stream"},
                      data=json.dumps({"prompt": workflow(seed=18, prefix="catapult"), "number": 7,
                                       "client_id": "catapult", "prompt_id": pid}).encode())
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"prompt_id": pid, "number": 7.0, "node_errors": {}}  # ComfyUI: float(number)
    for route in ("/queue", "/prompt", "/system_stats", "/object_info", "/history", f"/history/{pid}"):
        assert requests.get(comfy.url + route, timeout=30).headers["content-type"] == "application/json", route
    entry = wait_history(comfy, pid)
    number, prompt_id, graph, extra_data, outputs = entry["prompt"]
    assert (number, prompt_id, outputs) == (7, pid, ["7"]) and extra_data["client_id"] == "catapult"
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    form = {"overwrite": (None, "true"), "subfolder": (None, ""), "type": (None, "input"),
            "filename": (None, "catapult.png"), "image": ("catapult.png", png_file_bytes(), "application/octet-stream")}
    up = requests.post(f"{comfy.url}/upload/image", files=form, timeout=10)
    assert up.json() == {"name": "catapult.png", "subfolder": "", "type": "input"}


def test_comfy_api_client_calls(comfy):
    """comfy-api-client 0.1.0: httpx upload sending `overwrite` both as a form field and as a file part; /view's
    Content-Disposition read as split("=")[1][1:-1] and its Content-Type as the format; POST /queue {"cancel":
    [...]} (a key ComfyUI ignores); /history entries' prompt a (int, str, dict, dict, list) tuple."""
    import httpx

    files = {"image": ("api_client.png", png_file_bytes(), "image/png"), "overwrite": (None, "true")}
    with httpx.Client(base_url=comfy.url, timeout=30) as h:
        up = h.post("/upload/image", data={"overwrite": True, "type": "input"}, files=files).json()
        assert up == {"name": "api_client.png", "subfolder": "", "type": "input"}
        view = h.get("/view", params={"filename": up["name"], "type": "input"})
        assert view.headers["Content-Disposition"].split("=")[1][1:-1] == "api_client.png"
        assert view.headers["Content-Type"].split("/")[1] == "png"
        assert h.post("/queue", json={"cancel": [str(uuid.uuid4())]}).status_code == 200
        pid = h.post("/prompt", json={"prompt": workflow(seed=19, prefix="api_client"),
                                      "client_id": uuid.uuid4().hex}).json()["prompt_id"]
    number, prompt_id, graph, extra, outputs = wait_history(comfy, pid)["prompt"]
    assert isinstance(number, int) and prompt_id == pid and isinstance(graph, dict) and outputs == ["7"]


def test_comfyui_api_client_calls(comfy):
    """comfyui-api-client 0.1.0: requests_toolbelt's MultipartEncoder streamed by urllib (chunked, no
    Content-Length) with an extra client_id field; POST /prompt by urllib with an explicit JSON type."""
    boundary = uuid.uuid4().hex
    fields = [(n, v) for n, v in (("type", "input"), ("overwrite", "false"), ("client_id", "abc"))]
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode()
                    for n, v in fields)
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="streamed.png"\r\n'
             "Content-Type: image/png\r\n\r\n").encode() + png_file_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"{comfy.url}/upload/image", data=io.BytesIO(body),  # a file: sent chunked
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.loads(resp.read()) == {"name": "streamed.png", "subfolder": "", "type": "input"}
