"""LoRA through ComfyUI workflows and the server: LoraLoader / LoraLoaderModelOnly on the shipped model,
models/loras listing, and prompts with different LoRA sets queued together (each gets its own LoRA's
image, the same pixels as run alone; prompts with the same LoRA set share one sampling batch)."""

from __future__ import annotations

import copy
import io
import json
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from comfy_models import WORKFLOWS, build_models_folder
from live_server import LiveServer
from sd35fp8.server import create_app
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow import ModelFolders, PromptExecutor
from sd35fp8.workflow.batch import batch_key
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, object_info

pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")

SIZE, STEPS = 64, 4
HIDDEN, DEPTH = 192, 3  # the shipped MMDiT


def random_lora(seed: int) -> dict[str, torch.Tensor]:
    """kohya-layout rank-4 LoRA on every joint-block qkv and fc1 of the shipped MMDiT, plus CLIP-L q_proj."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(DEPTH):
        for stream in ("x_block", "context_block"):
            for leaf, n_out in (("attn_qkv", 3 * HIDDEN), ("mlp_fc1", 4 * HIDDEN)):
                if stream == "context_block" and i == DEPTH - 1 and leaf == "mlp_fc1":
                    continue  # the last context block has no MLP
                stem = f"lora_unet_joint_blocks_{i}_{stream}_{leaf}"
                sd[stem + ".lora_down.weight"] = torch.randn(4, HIDDEN, generator=g) * 0.3
                sd[stem + ".lora_up.weight"] = torch.randn(n_out, 4, generator=g) * 0.3
                sd[stem + ".alpha"] = torch.tensor(4.0)
    stem = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sd[stem + ".lora_down.weight"] = torch.randn(2, 32, generator=g) * 0.3
    sd[stem + ".lora_up.weight"] = torch.randn(32, 2, generator=g) * 0.3
    return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = build_models_folder(tmp_path_factory.mktemp("comfy"))
    (root / "loras").mkdir()
    save_file(random_lora(1), str(root / "loras" / "a.safetensors"))
    save_file(random_lora(2), str(root / "loras" / "b.safetensors"))
    return root


def make_prompt(seed: int, lora: str | None, model_only: bool = False) -> dict:
    p = json.loads((WORKFLOWS / "seed-fp8-allinone.json").read_text())
    p["5"]["inputs"].update(width=SIZE, height=SIZE)
    p["3"]["inputs"].update(seed=seed, steps=STEPS, sampler_name="euler")
    p["6"]["inputs"]["text"] = "a red circle"
    p["9"]["inputs"]["filename_prefix"] = "lora"
    if lora is not None:
        if model_only:
            p["20"] = {"class_type": "LoraLoaderModelOnly",
                       "inputs": {"model": ["4", 0], "lora_name": lora, "strength_model": 1.0}}
        else:
            p["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": lora,
                                                              "strength_model": 1.0, "strength_clip": 1.0}}
            for nid in ("6", "7"):
                p[nid]["inputs"]["clip"] = ["20", 1]
        p["3"]["inputs"]["model"] = ["20", 0]
    return p


def image_of(folders: ModelFolders, outputs: dict) -> np.ndarray:
    (ui,) = outputs.values()
    (img,) = ui["images"]
    return np.asarray(Image.open(folders.output_dir / img["subfolder"] / img["filename"]).convert("RGB")).astype(int)


def test_nodes_and_listing(models):
    info = object_info(ModelFolders(models))
    assert info["LoraLoader"]["input"]["required"]["lora_name"][0] == ["a.safetensors", "b.safetensors"]
    assert info["LoraLoader"]["output"] == ["MODEL", "CLIP"]
    assert info["LoraLoaderModelOnly"]["output"] == ["MODEL"]
    assert list(info["LoraLoaderModelOnly"]["input"]["required"]) == ["model", "lora_name", "strength_model"]
    assert "LoraLoader" in NODE_CLASS_MAPPINGS
    # different LoRA sets never share a batch key; equal ones do (texts and seeds may differ)
    assert batch_key(make_prompt(1, "a.safetensors")) != batch_key(make_prompt(1, "b.safetensors"))
    assert batch_key(make_prompt(1, "a.safetensors")) == batch_key(make_prompt(2, "a.safetensors"))
    assert batch_key(make_prompt(1, None)) != batch_key(make_prompt(1, "a.safetensors"))


def test_lora_changes_image_and_strength_zero_is_base(models, tmp_path):
    ex = PromptExecutor(ModelFolders(models, output_dir=tmp_path / "out"), device="cpu")
    images = {}
    for name, prompt in (("base", make_prompt(7, None)), ("a", make_prompt(7, "a.safetensors")),
                         ("a_model_only", make_prompt(7, "a.safetensors", model_only=True)),
                         ("base_again", make_prompt(7, None))):
        r = ex.execute(copy.deepcopy(prompt), name)
        assert r.success, r.error
        images[name] = image_of(ex.folders, r.outputs)
    zero = make_prompt(7, "a.safetensors")
    zero["20"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    r = ex.execute(zero, "zero")
    assert r.success, r.error
    assert np.array_equal(image_of(ex.folders, r.outputs), images["base"])
    assert np.abs(images["a"] - images["base"]).max() > 20  # the LoRA does something
    assert np.abs(images["a"] - images["a_model_only"]).max() > 0  # its CLIP part too
    assert np.array_equal(images["base_again"], images["base"])  # nothing left behind


def test_server_different_loras_queued_together(models, tmp_path):
    folders = ModelFolders(models, output_dir=tmp_path / "out", input_dir=tmp_path / "in", temp_dir=tmp_path / "t")
    ex = PromptExecutor(folders, device="cpu")
    prompts = {"a1": make_prompt(3, "a.safetensors"), "b1": make_prompt(3, "b.safetensors"),
               "a2": make_prompt(4, "a.safetensors"), "n1": make_prompt(3, None)}
    app = create_app(models, executor=ex, max_batch=8, batch_wait_ms=300, serve_frontend=False)
    got = {}
    with LiveServer(app, timeout=20) as srv:
        ids = {}
        for name, p in prompts.items():
            r = requests.post(f"{srv.url}/prompt", json={"prompt": p, "client_id": "t"}, timeout=30)
            assert r.status_code == 200, r.text
            ids[name] = r.json()["prompt_id"]
        assert requests.get(f"{srv.url}/models/loras", timeout=30).json() == ["a.safetensors", "b.safetensors"]
        deadline = time.time() + 300
        while time.time() < deadline:
            hist = requests.get(f"{srv.url}/history", timeout=30).json()
            if all(pid in hist for pid in ids.values()):
                break
            time.sleep(0.5)
        for name, pid in ids.items():
            entry = hist[pid]
            assert entry["status"]["status_str"] == "success", entry["status"]
            (img,) = [i for ui in entry["outputs"].values() for i in ui["images"]]
            r = requests.get(f"{srv.url}/view", params=img, timeout=30)
            got[name] = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
        stats = requests.get(f"{srv.url}/sd35fp8/worker", timeout=30).json()
    alone_ex = PromptExecutor(ModelFolders(models, output_dir=tmp_path / "alone"), device="cpu")
    for name, p in prompts.items():
        r = alone_ex.execute(copy.deepcopy(p), name)
        assert r.success, r.error
        assert np.array_equal(got[name], image_of(alone_ex.folders, r.outputs)), name
    assert np.abs(got["a1"] - got["b1"]).max() > 20 and np.abs(got["a1"] - got["n1"]).max() > 20
    assert stats["prompts"] == 4, stats
