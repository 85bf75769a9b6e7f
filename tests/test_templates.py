"""Every SD3.5 template of the installed `comfyui-workflow-templates` package runs unchanged (UI format,
subgraphs included) through `sd35fp8 run` and the server, with the shipped model and the shipped ControlNet
placed under the file names the template uses, or stops with the clear error of a node whose model
cannot exist here (the depth template's Lotus estimator).

Sizes and step counts are overridden (--set) for the CPU: the shipped model covers at most 256 px.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
from PIL import Image

from sd35fp8.errors import InputError
from sd35fp8.tiny import SHIPPED_CHECKPOINT, SHIPPED_CONTROLNET, SHIPPED_T5_TOKENIZER
from sd35fp8.workflow import run_workflow
from sd35fp8.workflow.nodes_control import UNAVAILABLE_NODES
from sd35fp8.workflow.ui_convert import ui_to_api

templates = pytest.importorskip("comfyui_workflow_templates")
pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
SIZE, STEPS = 128, 3


def sd35_templates() -> list[str]:
    return sorted(e.template_id for e in templates.iter_templates() if e.template_id.lower().startswith("sd3"))


def template(tid: str) -> dict:
    return json.loads(open(templates.get_asset_path(tid, f"{tid}.json"), encoding="utf-8").read())


def all_nodes(wf: dict) -> list[dict]:
    nodes = list(wf["nodes"])
    for sg in (wf.get("definitions") or {}).get("subgraphs") or []:
        nodes += sg["nodes"]
    return nodes


def place_controlnet(path) -> None:
    """The shipped ControlNet (tiny/train_controlnet.py: Canny edges -> image, Stability's key layout) under
    the template's file name: every SD3.5 ControlNet template runs it (blur/depth maps go through it too)."""
    assert SHIPPED_CONTROLNET.exists(), f"the shipped ControlNet {SHIPPED_CONTROLNET} is missing"
    shutil.copy(SHIPPED_CONTROLNET, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """models/ with every file the SD3.5 templates name, input/ with their images."""
    root = tmp_path_factory.mktemp("tmpl")
    folders = {k: root / "models" / k for k in ("checkpoints", "controlnet")}
    for f in folders.values():
        f.mkdir(parents=True)
    shutil.copy(SHIPPED_T5_TOKENIZER, folders["checkpoints"] / "spiece.model")  # the tiny model's own vocabulary
    (root / "input").mkdir()
    for tid in sd35_templates():
        for node in all_nodes(template(tid)):
            values = node.get("widgets_values") or []
            if node["type"] == "CheckpointLoaderSimple" and not (folders["checkpoints"] / values[0]).exists():
                shutil.copy(SHIPPED_CHECKPOINT, folders["checkpoints"] / values[0])
            elif node["type"] == "ControlNetLoader":
                place_controlnet(folders["controlnet"] / values[0])
            elif node["type"] == "LoadImage":
                thumb = templates.get_asset_path(tid, f"{tid}-1.webp")
                Image.open(thumb).convert("RGB").resize((256, 256)).save(root / "input" / values[0])
    return root


def cpu_sets(prompt: dict) -> list[str]:
    sets = []
    for nid, node in prompt.items():
        if node["class_type"] in ("EmptySD3LatentImage", "EmptyLatentImage"):
            sets += [f"{nid}.width={SIZE}", f"{nid}.height={SIZE}"]
        elif node["class_type"] == "KSampler":
            sets.append(f"{nid}.steps={STEPS}")
        elif node["class_type"] in ("ImageScale",):
            sets += [f"{nid}.width={SIZE}", f"{nid}.height={SIZE}"]
        elif node["class_type"] == "ImageScaleToTotalPixels":
            sets.append(f"{nid}.megapixels=0.02")
    return sets


def test_templates_found():
    found = sd35_templates()
    assert "sd3.5_simple_example" in found and len(found) >= 4, found


@pytest.mark.parametrize("tid", sd35_templates())
def test_template_runs(tid, models, tmp_path):
    wf = template(tid)
    path = tmp_path / f"{tid}.json"
    path.write_text(json.dumps(wf))
    blocked = sorted({n["type"] for n in all_nodes(wf) if n["type"] in UNAVAILABLE_NODES and n.get("mode", 0) == 0})
    if blocked:  # the clear error: names the node, says to feed a depth image from LoadImage
        with pytest.raises(InputError, match=blocked[0]) as e:
            run_workflow(path, models / "models", output_dir=tmp_path / "out")
        assert "LoadImage" in str(e.value)
        return
    prompt = ui_to_api(wf)
    result = run_workflow(path, models / "models", output_dir=tmp_path / "out", sets=cpu_sets(prompt),
                          extra_model_paths=None)
    assert result.success, result.error
    saved = [i for ui in result.outputs.values() for i in ui.get("images", [])]
    assert saved, result.outputs
    png = Image.open(tmp_path / "out" / saved[0]["subfolder"] / saved[0]["filename"]) if saved[0]["type"] == "output" \
        else None
    if png is not None:
        assert png.size == (SIZE, SIZE)
        assert "workflow" in png.text  # the UI workflow travels in the PNG


def test_template_through_server(models, tmp_path):
    """The canny template as the web UI sends it (API prompt) through POST /prompt."""
    from fastapi.testclient import TestClient

    from sd35fp8.server import create_app, stop_app
    from sd35fp8.workflow.run import apply_sets

    tid = next(t for t in sd35_templates() if "canny" in t)
    prompt = ui_to_api(template(tid))
    apply_sets(prompt, cpu_sets(prompt))
    (models / "input").mkdir(exist_ok=True)
    app = create_app(models / "models", output_dir=tmp_path / "out", input_dir=models / "input", device="cpu",
                     serve_frontend=False, allow_hosts=("testserver",))  # TestClient's Host
    try:
        with TestClient(app) as client:
            r = client.post("/prompt", json={"prompt": prompt, "client_id": "t"})
            assert r.status_code == 200, r.text
            pid = r.json()["prompt_id"]
            for _ in range(1200):
                hist = client.get(f"/history/{pid}").json()
                if pid in hist:
                    break
                time.sleep(0.1)
            assert hist[pid]["status"]["completed"], hist[pid]["status"]
    finally:
        stop_app(app)


def test_png_drop_back_reproduces(models, tmp_path):
    """`sd35fp8 run out.png`: the prompt embedded by SaveImage runs again to the same pixels."""
    import numpy as np

    tid = "sd3.5_simple_example"
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(template(tid)))
    first = run_workflow(path, models / "models", output_dir=tmp_path / "a", sets=cpu_sets(ui_to_api(template(tid))))
    assert first.success, first.error
    (img,) = [i for ui in first.outputs.values() for i in ui["images"]]
    png = tmp_path / "a" / img["subfolder"] / img["filename"]
    again = run_workflow(png, models / "models", output_dir=tmp_path / "b")
    assert again.success, again.error
    (img2,) = [i for ui in again.outputs.values() for i in ui["images"]]
    a = np.asarray(Image.open(png).convert("RGB"))
    b = np.asarray(Image.open(tmp_path / "b" / img2["subfolder"] / img2["filename"]).convert("RGB"))
    assert np.array_equal(a, b)
    assert "workflow" in Image.open(tmp_path / "b" / img2["subfolder"] / img2["filename"]).text
    with pytest.raises(InputError, match="no ComfyUI workflow"):
        Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
        run_workflow(tmp_path / "plain.png", models / "models", output_dir=tmp_path / "c")
