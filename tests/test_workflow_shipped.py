"""The seed's two ComfyUI workflows on the shipped model: `sd35fp8 run`, the server and
`sd35fp8 generate` with the same parameters give the same pixels."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_models import WORKFLOWS, build_models_folder
from sd35fp8.pipeline import SD35Pipeline
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow import run_workflow

pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
SIZE = 128  # the shipped model's native size (its position grid covers at most 256 px)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models_folder(tmp_path_factory.mktemp("comfy"))


def _prompt(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def _latent_node(prompt: dict) -> str:
    return next(i for i, n in prompt.items() if n["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"))


def _run_image(models, tmp_path, graph: dict, name: str, sets: list[str]) -> np.ndarray:
    """Run `graph` (saved as tmp_path/name) with --set overrides; its one saved image."""
    (tmp_path / name).write_text(json.dumps(graph))
    out = tmp_path / name.removesuffix(".json")
    result = run_workflow(tmp_path / name, models, output_dir=out, sets=sets)
    assert result.success, result.error
    (ui,) = result.outputs.values()
    img = ui["images"][0]
    return np.asarray(Image.open(out / img["subfolder"] / img["filename"]))


def _generate(models, prompt: dict) -> np.ndarray:
    """`sd35fp8 generate` with the workflow's parameters (Python API, same code path as the CLI)."""
    nodes = {n["class_type"]: n["inputs"] for n in prompt.values()}
    ks = nodes["KSampler"]
    ckpt = models / "checkpoints" / nodes["CheckpointLoaderSimple"]["ckpt_name"]
    extra = {}
    if "TripleCLIPLoader" in nodes:
        t = nodes["TripleCLIPLoader"]
        extra = {k: models / "text_encoders" / t[f"clip_name{i}"] for i, k in enumerate(("clip_l", "clip_g", "t5xxl"), 1)}
    texts = [prompt[ks[k][0]]["inputs"]["text"] for k in ("positive", "negative")]
    pipe = SD35Pipeline.from_pretrained(ckpt, device="cpu", dtype=torch.float32, **extra)
    out = pipe(texts[0], negative_prompt=texts[1], num_inference_steps=ks["steps"], guidance_scale=ks["cfg"],
               sampler=ks["sampler_name"], scheduler=ks["scheduler"], seed=ks["seed"], width=SIZE, height=SIZE,
               denoise=ks["denoise"], progress=False)
    return np.asarray(out.images[0])


@pytest.mark.parametrize("name", ["seed-fp8-allinone.json", "seed-separate-encoders.json"])
def test_run_equals_generate(models, tmp_path, name):
    prompt = _prompt(name)
    lat = _latent_node(prompt)
    path = tmp_path / name
    path.write_text(json.dumps(prompt))
    result = run_workflow(path, models, output_dir=tmp_path / "out", sets=[f"{lat}.width={SIZE}", f"{lat}.height={SIZE}"])
    assert result.success, result.error
    assert result.output_dir == (tmp_path / "out").resolve()  # what `sd35fp8 run` prints the paths under
    (images,) = [ui["images"] for ui in result.outputs.values()]
    png = Image.open(tmp_path / "out" / images[0]["subfolder"] / images[0]["filename"])
    assert json.loads(png.text["prompt"])[lat]["inputs"]["width"] == SIZE
    assert np.array_equal(np.asarray(png.convert("RGB")), _generate(models, prompt))


def test_native_1024_fails_naming_the_limit(models, tmp_path):
    result = run_workflow(WORKFLOWS / "seed-fp8-allinone.json", models, output_dir=tmp_path / "out")
    assert not result.success
    assert "256" in result.error["exception_message"] and "1024" in result.error["exception_message"]


def test_server_equals_generate(models, tmp_path):
    from fastapi.testclient import TestClient

    from sd35fp8.server import create_app, stop_app

    prompt = _prompt("seed-fp8-allinone.json")
    lat = _latent_node(prompt)
    prompt[lat]["inputs"].update(width=SIZE, height=SIZE)
    app = create_app(models, output_dir=tmp_path / "out", device="cpu", serve_frontend=False,
                     allow_hosts=("testserver",))  # TestClient's Host
    try:
        with TestClient(app) as client:
            r = client.post("/prompt", json={"prompt": prompt, "client_id": "t"})
            assert r.status_code == 200, r.text
            pid = r.json()["prompt_id"]
            for _ in range(600):
                hist = client.get(f"/history/{pid}").json()
                if pid in hist:
                    break
                time.sleep(0.1)
            entry = hist[pid]
            assert entry["status"]["completed"], entry["status"]
            (img,) = [i for ui in entry["outputs"].values() for i in ui["images"]]
            r = client.get("/view", params=img)
            assert r.status_code == 200
            import io

            served = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    finally:
        stop_app(app)
    assert np.array_equal(served, _generate(models, prompt))


def test_server_warmup_workflow_loads_before_ready(models, tmp_path):
    """`sd35fp8 serve --warmup WORKFLOW --warmup-shapes 128x128` (create_app(warmup_workflow=...)): /ready is
    503 until the executor's warm-up returns; the warm-up loaded the workflow's models into the cache, so the
    first prompt with the same loader finds them cached instead of loading again."""
    import threading

    from fastapi.testclient import TestClient

    from sd35fp8.server import create_app, stop_app
    from sd35fp8.workflow import ModelFolders, PromptExecutor

    prompt = _prompt("seed-fp8-allinone.json")
    lat = _latent_node(prompt)
    prompt[lat]["inputs"].update(width=SIZE, height=SIZE)
    prompt["3"]["inputs"]["steps"] = 2
    path = tmp_path / "warmup.json"
    path.write_text(json.dumps(prompt))
    ex = PromptExecutor(ModelFolders(models, output_dir=tmp_path / "out"), device="cpu")
    gate, calls, real = threading.Event(), [], ex.warmup

    def gated(p, shapes=None):
        gate.wait(60)
        calls.append((p, shapes))
        return real(p, shapes)

    ex.warmup = gated
    app = create_app(models, executor=ex, serve_frontend=False, allow_hosts=("testserver",),
                     warmup_workflow=path, warmup_shapes=[(SIZE, SIZE, 1)])
    try:
        with TestClient(app) as client:
            r = client.get("/ready")
            assert r.status_code == 503 and r.json()["checks"]["warmed_up"] is False
            gate.set()
            for _ in range(1200):
                r = client.get("/ready")
                if r.status_code == 200:
                    break
                time.sleep(0.1)
            assert r.status_code == 200, r.json()
            assert r.json()["checks"]["warmup_error"] is None
            (got, shapes), = calls
            assert shapes == [(SIZE, SIZE, 1)] and got["4"]["class_type"] == "CheckpointLoaderSimple"
            pid = client.post("/prompt", json={"prompt": prompt}).json()["prompt_id"]
            for _ in range(1200):
                hist = client.get(f"/history/{pid}").json()
                if pid in hist:
                    break
                time.sleep(0.1)
            status = hist[pid]["status"]
            assert status["completed"], status
            cached = [d["nodes"] for e, d in status["messages"] if e == "execution_cached"]
            assert cached and "4" in cached[0]  # the checkpoint loader ran at warm-up, not again
    finally:
        stop_app(app)


def test_warmup_shapes_need_a_workflow(models, tmp_path):
    from sd35fp8.errors import InputError
    from sd35fp8.server import create_app

    with pytest.raises(InputError, match="warm-up workflow"):
        create_app(models, output_dir=tmp_path / "out", device="cpu", warmup_shapes=[(SIZE, SIZE, 1)])
    with pytest.raises(InputError, match="warmup.json"):
        create_app(models, output_dir=tmp_path / "out", device="cpu", warmup_workflow=tmp_path / "warmup.json")


def test_clip_set_last_layer_node(models, tmp_path):
    """A workflow with ComfyUI's CLIPSetLastLayer between the loader and the text encoders runs; -1 changes the
    conditioning (so the image), and the node's CLIP leaves the loader's own CLIP as it was."""
    prompt = _prompt("seed-fp8-allinone.json")
    lat = _latent_node(prompt)
    loader = next(i for i, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple")
    sets = [f"{lat}.width=64", f"{lat}.height=64", *(f"{k}.steps=3" for k, n in prompt.items()
                                                     if n["class_type"] == "KSampler")]

    def image(graph: dict, name: str) -> np.ndarray:
        return _run_image(models, tmp_path, graph, name, sets)

    base = image(prompt, "base.json")
    layered = json.loads(json.dumps(prompt))
    layered["99"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": [loader, 1], "stop_at_clip_layer": -1}}
    for node in layered.values():
        if node["class_type"] == "CLIPTextEncode":
            node["inputs"]["clip"] = ["99", 0]
    assert not np.array_equal(image(layered, "layered.json"), base)
    assert np.array_equal(image(prompt, "again.json"), base)


def test_combined_and_timestep_ranged_conditioning(models, tmp_path):
    """The SD3 example workflows' negative: ConditioningCombine of the negative (ConditioningSetTimestepRange 0 -> 0.1)
    and its ConditioningZeroOut (0.1 -> 1). A combination whose second entry is never active gives the plain
    image bit for bit; the SD3 split differs from it; ConditioningAverage at strength 1 changes nothing;
    ConditioningConcat runs."""
    prompt = _prompt("seed-fp8-allinone.json")
    lat = _latent_node(prompt)
    ks = next(k for k, n in prompt.items() if n["class_type"] == "KSampler")
    sets = [f"{lat}.width=64", f"{lat}.height=64", f"{ks}.steps=4"]

    def image(graph: dict, name: str) -> np.ndarray:
        return _run_image(models, tmp_path, graph, name, sets)

    def with_negative(first: tuple, second: tuple) -> dict:
        g = json.loads(json.dumps(prompt))
        neg = g[ks]["inputs"]["negative"]
        g["90"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": neg}}
        g["91"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": neg, "start": first[0],
                                                                             "end": first[1]}}
        g["92"] = {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["90", 0],
                                                                             "start": second[0], "end": second[1]}}
        g["93"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["91", 0],
                                                                    "conditioning_2": ["92", 0]}}
        g[ks]["inputs"]["negative"] = ["93", 0]
        return g

    base = image(prompt, "base.json")
    assert np.array_equal(image(with_negative((0.0, 1.0), (1.0, 1.0)), "never.json"), base)
    assert not np.array_equal(image(with_negative((0.0, 0.1), (0.1, 1.0)), "sd3split.json"), base)
    g = json.loads(json.dumps(prompt))
    pos = g[ks]["inputs"]["positive"]
    g["94"] = {"class_type": "ConditioningAverage", "inputs": {"conditioning_to": pos, "conditioning_from":
                                                               g[ks]["inputs"]["negative"], "conditioning_to_strength": 1.0}}
    g[ks]["inputs"]["positive"] = ["94", 0]
    assert np.array_equal(image(g, "average.json"), base)
    g["95"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["94", 0], "conditioning_from": pos}}
    g[ks]["inputs"]["positive"] = ["95", 0]
    assert image(g, "concat.json").shape == base.shape


def test_tiled_vae_nodes(models, tmp_path):
    """VAEDecodeTiled / VAEEncodeTiled (ComfyUI's pixel tile size and overlap): one tile is the plain decode /
    encode bit for bit; smaller tiles stay close to it."""
    from sd35fp8.workflow import engine

    prompt = _prompt("seed-fp8-allinone.json")
    lat = _latent_node(prompt)
    ks = next(k for k, n in prompt.items() if n["class_type"] == "KSampler")
    dec = next(k for k, n in prompt.items() if n["class_type"] == "VAEDecode")
    sets = [f"{lat}.width=128", f"{lat}.height=128", f"{ks}.steps=3"]

    def image(graph: dict, name: str) -> np.ndarray:
        return _run_image(models, tmp_path, graph, name, sets)

    base = image(prompt, "base.json")
    for tile, same in ((512, True), (64, False)):
        g = json.loads(json.dumps(prompt))
        g[dec] = {"class_type": "VAEDecodeTiled", "inputs": {**g[dec]["inputs"], "tile_size": tile, "overlap": 64,
                                                             "temporal_size": 64, "temporal_overlap": 8}}
        got = image(g, f"tiled{tile}.json")
        if same:
            assert np.array_equal(got, base)
        else:  # the tiny VAE's GroupNorm sees only its tile: close, not equal (SD3VAE.decode_tiled)
            corr = np.corrcoef(got.astype(float).ravel(), base.astype(float).ravel())[0, 1]
            assert corr > 0.8
    vae = SD35Pipeline.from_pretrained(models / "checkpoints" / prompt[next(
        k for k, n in prompt.items() if n["class_type"] == "CheckpointLoaderSimple")]["inputs"]["ckpt_name"],
        device="cpu", dtype=torch.float32).vae
    pixels = torch.from_numpy(base[None].astype(np.float32) / 255.0)  # IMAGE [1, 128, 128, 3]
    whole = engine.vae_encode(vae, pixels)["samples"]
    torch.testing.assert_close(engine.vae_encode(vae, pixels, tiles=(1024, 64))["samples"], whole)
    tiled = engine.vae_encode(vae, pixels, tiles=(64, 16))["samples"]
    assert tiled.shape == whole.shape and np.corrcoef(tiled.ravel().numpy(), whole.ravel().numpy())[0, 1] > 0.8


def test_conditioning_chains_are_bounded():
    """A chain of ConditioningCombine / ConditioningConcat doubles at each link: both stop at a clear bound."""
    from sd35fp8.errors import InputError
    from sd35fp8.workflow import engine

    c = [[torch.zeros(1, 154, 8), {"pooled_output": torch.zeros(1, 4)}]]
    with pytest.raises(InputError, match="conditioning entries"):
        for _ in range(10):
            c = engine.combine_conditioning(c, c)
    c = [[torch.zeros(1, 154, 8), {"pooled_output": torch.zeros(1, 4)}]]
    with pytest.raises(InputError, match="tokens"):
        for _ in range(10):
            c = engine.concat_conditioning(c, c)


def test_latent_from_batch_keeps_each_items_noise(models, tmp_path):
    """LatentFromBatch picks items of a batch with their batch_index; the KSampler then draws each item's noise
    as in the whole batch (ComfyUI's prepare_noise with batch_inds): item 2 alone is item 2 of the batch."""
    prompt = _prompt("seed-fp8-allinone.json")
    lat = _latent_node(prompt)
    ks = next(k for k, n in prompt.items() if n["class_type"] == "KSampler")
    save = next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
    sets = [f"{lat}.width=64", f"{lat}.height=64", f"{ks}.steps=3", f"{lat}.batch_size=3"]
    (tmp_path / "batch.json").write_text(json.dumps(prompt))
    result = run_workflow(tmp_path / "batch.json", models, output_dir=tmp_path / "b", sets=sets)
    assert result.success, result.error
    third = result.outputs[save]["images"][2]
    whole = np.asarray(Image.open(tmp_path / "b" / third["subfolder"] / third["filename"]))
    g = json.loads(json.dumps(prompt))
    g["97"] = {"class_type": "LatentFromBatch", "inputs": {"samples": [lat, 0], "batch_index": 2, "length": 1}}
    g[ks]["inputs"]["latent_image"] = ["97", 0]
    alone = _run_image(models, tmp_path, g, "alone.json", sets)
    assert np.abs(alone.astype(int) - whole.astype(int)).max() <= 1  # batch-size rounding at most (issue 22)
    first = _run_image(models, tmp_path, prompt, "first.json", sets[:3])  # batch 1: item 0's noise
    assert np.abs(alone.astype(int) - first.astype(int)).mean() > 5


def test_timestep_ranged_conditioning_is_not_batched_across_prompts():
    """Cross-prompt batching takes plain conditionings only: a lone entry with a timestep range samples alone
    (batched, its range would be lost)."""
    from sd35fp8.workflow.batch import NotBatchable, _conds
    from sd35fp8.workflow.engine import set_timestep_range

    c = [[torch.zeros(1, 154, 8), {"pooled_output": torch.zeros(1, 4)}]]
    assert len(_conds({"positive": c, "negative": c})) == 4
    with pytest.raises(NotBatchable, match="timestep-ranged"):
        _conds({"positive": set_timestep_range(c, 0.0, 0.5), "negative": c})


def test_batch_spanning_patches_are_not_batched_across_prompts():
    """Mahiro's similarity mean and SkipLayerGuidanceDiT's rescaling std read every row of the batch: prompts
    batched together would change each other's images, so they run alone."""
    from types import SimpleNamespace

    from sd35fp8.sampling.guidance import SLGConfig
    from sd35fp8.workflow.batch import NotBatchable, _batch_coupled

    assert _batch_coupled(SimpleNamespace(post_cfg=(("cfg_zero_star",), ("slg", SLGConfig())))) is None
    assert _batch_coupled(SimpleNamespace(post_cfg=(("mahiro",),))) == "Mahiro"
    assert "rescaling" in _batch_coupled(SimpleNamespace(post_cfg=(("slg", SLGConfig(rescale=0.5)),)))
    from sd35fp8.workflow.batch import check_batchable

    model = SimpleNamespace(post_cfg=(("mahiro",),))
    call = {"sampler_name": "euler", "latent": {"samples": torch.zeros(1, 16, 8, 8)}, "positive": [], "negative": [],
            "model": model}
    with pytest.raises(NotBatchable, match="Mahiro"):
        check_batchable([call, dict(call)])
