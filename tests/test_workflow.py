"""Workflow layer: parsing, validation error shapes, object_info, folders, caching, UI conversion."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from sd35fp8.errors import InputError
from sd35fp8.workflow import (
    NODE_CLASS_MAPPINGS, CycleError, ModelFolders, Node, PromptExecutor, execution_order, object_info, parse_prompt,
    ui_to_api, validate_prompt,
)
from sd35fp8.workflow.executor import PromptValidationError
from sd35fp8.workflow.run import apply_sets, run_workflow

SHARED = Path("/work/shared/workflows")
WORKFLOWS = sorted(SHARED.glob("*.json"))
MODEL_FILES = {
    "checkpoints": ["stable-diffusion-3.5-fp8.safetensors", "sd3.5_large.safetensors"],
    "text_encoders": ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp8_e4m3fn.safetensors"],
}


@pytest.fixture
def folders(tmp_path):
    for kind, names in MODEL_FILES.items():
        (tmp_path / "models" / kind).mkdir(parents=True)
        for n in names:
            (tmp_path / "models" / kind / n).write_bytes(b"")
    return ModelFolders(tmp_path)


def _seed_prompt() -> dict:
    return json.loads((SHARED / "seed-fp8-allinone.json").read_text())


# ---- shared workflows -----------------------------------------------------------------------
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_shared_workflows_validate(path, folders):
    prompt = parse_prompt(json.loads(path.read_text()))
    ok, error, outputs, node_errors = validate_prompt(prompt, folders=folders)
    assert ok, (error, node_errors)
    assert error is None and node_errors == {} and outputs == ["9"]
    order = execution_order(prompt, outputs)
    assert order[-1] == "9" and order.index("3") < order.index("8")
    assert set(order) == set(prompt)


def test_missing_model_file_is_value_not_in_list(tmp_path):
    ok, error, outputs, node_errors = validate_prompt(_seed_prompt(), folders=ModelFolders(tmp_path))
    assert not ok and error["type"] == "prompt_outputs_failed_validation"
    assert error["message"] == "Prompt outputs failed validation"
    e = node_errors["4"]["errors"][0]
    assert e["type"] == "value_not_in_list" and e["message"] == "Value not in list"
    assert e["details"] == "ckpt_name: 'stable-diffusion-3.5-fp8.safetensors' not in []"
    assert node_errors["4"]["dependent_outputs"] == ["9"] and node_errors["4"]["class_type"] == "CheckpointLoaderSimple"


# ---- every error type -----------------------------------------------------------------------
def _first_error(prompt, folders, node="3"):
    ok, error, _, node_errors = validate_prompt(prompt, folders=folders)
    assert not ok
    return error, node_errors[node]["errors"][0]


def test_prompt_level_errors(folders):
    p = _seed_prompt()
    del p["9"]
    ok, error, outputs, node_errors = validate_prompt(p, folders=folders)
    assert (ok, outputs, node_errors) == (False, [], {})
    assert error == {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}}
    p = _seed_prompt()
    p["3"]["class_type"] = "NoSuchNode"
    p["3"]["_meta"] = {"title": "My Sampler"}
    ok, error, _, _ = validate_prompt(p, folders=folders)
    assert error == {"type": "missing_node_type",  # ComfyUI execution.validate_prompt (web UI's missing-nodes dialog)
                     "message": "Node 'My Sampler' (#3): node type 'NoSuchNode' not found; it is not a ComfyUI core "
                                "node: the custom node that defines it is not available in sd35fp8.",
                     "details": "Node ID '#3'",
                     "extra_info": {"node_id": "3", "class_type": "NoSuchNode", "node_title": "My Sampler"}}
    p["3"]["class_type"] = "FreeU_V2"  # a ComfyUI core node we do not implement is not called a custom node
    ok, error, _, _ = validate_prompt(p, folders=folders)
    assert "node type 'FreeU_V2' not found; it is a ComfyUI core node that sd35fp8 does not implement" in error["message"]
    del p["3"]["class_type"]
    ok, error, _, _ = validate_prompt(p, folders=folders)
    assert error["type"] == "missing_node_type" and error["extra_info"]["class_type"] is None
    assert error["message"].startswith("Node 'My Sampler' has no class_type")


@pytest.mark.parametrize("edit, etype, message, details", [
    (lambda p: p["3"]["inputs"].pop("steps"), "required_input_missing", "Required input is missing", "steps"),
    (lambda p: p["3"]["inputs"].update(sampler_name="nope"), "value_not_in_list", "Value not in list", None),
    (lambda p: p["3"]["inputs"].update(model=["6", 0]), "return_type_mismatch",
     "Return type mismatch between linked nodes", "model, received_type(CONDITIONING) mismatch input_type(MODEL)"),
    (lambda p: p["3"]["inputs"].update(steps=0), "value_smaller_than_min", "Value 0 smaller than min of 1", "steps"),
    (lambda p: p["3"]["inputs"].update(cfg=101), "value_bigger_than_max", "Value 101.0 bigger than max of 100.0",
     "cfg"),
    (lambda p: p["3"]["inputs"].update(seed="abc"), "invalid_input_type",
     "Failed to convert an input value to a INT value", None),
    (lambda p: p["3"]["inputs"].update(model=["4", 0, 1]), "bad_linked_input",
     "Bad linked input, must be a length-2 list of [node_id, slot_index]", "model"),
])
def test_input_errors(folders, edit, etype, message, details):
    p = _seed_prompt()
    edit(p)
    error, e = _first_error(p, folders)
    assert error["type"] == "prompt_outputs_failed_validation"
    assert (e["type"], e["message"]) == (etype, message)
    assert set(e) == {"type", "message", "details", "extra_info"}
    if details is not None:
        assert e["details"] == details
    assert e["extra_info"]["input_name"] in p["3"]["inputs"] or etype == "required_input_missing"


def test_inner_validation_exception(folders):
    p = _seed_prompt()
    p["6"]["inputs"]["clip"] = ["404", 1]  # node 6 links to a node that does not exist
    _, e = _first_error(p, folders, node="6")
    assert e["type"] == "exception_during_inner_validation"
    assert "404" in e["details"] and e["extra_info"]["linked_node"] == ["6", 0]


def test_validation_coerces_literals(folders):
    p = _seed_prompt()
    p["3"]["inputs"].update(seed="42", cfg="4.5")
    ok, *_ = validate_prompt(p, folders=folders)
    assert ok and p["3"]["inputs"]["seed"] == 42 and p["3"]["inputs"]["cfg"] == 4.5


# ---- graph ----------------------------------------------------------------------------------
def test_only_output_ancestors_run_and_cycles_detected(folders):
    p = _seed_prompt()
    p["99"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    ok, _, outputs, _ = validate_prompt(p, folders=folders)
    assert ok and "99" not in execution_order(p, outputs)
    p["4"]["inputs"]["x"] = ["8", 0]
    with pytest.raises(CycleError, match="cycle"):
        execution_order(p, outputs)


# ---- object_info ----------------------------------------------------------------------------
def test_object_info_ksampler_matches_comfyui():
    info = object_info()["KSampler"]
    assert set(info) >= {"input", "input_order", "output", "output_is_list", "output_name", "name", "display_name",
                         "description", "python_module", "category", "output_node"}
    req = info["input"]["required"]
    assert req["seed"][0] == "INT" and req["seed"][1]["default"] == 0 and req["seed"][1]["min"] == 0
    assert req["seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF and req["seed"][1]["control_after_generate"] is True
    assert {k: req["steps"][1][k] for k in ("default", "min", "max")} == {"default": 20, "min": 1, "max": 10000}
    assert {k: req["cfg"][1][k] for k in ("default", "min", "max", "step", "round")} == {
        "default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}
    assert req["denoise"][1]["default"] == 1.0
    assert "euler" in req["sampler_name"][0] and "normal" in req["scheduler"][0]
    assert info["input_order"]["required"] == ["model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                               "positive", "negative", "latent_image", "denoise"]
    assert (info["output"], info["output_is_list"], info["output_name"]) == (["LATENT"], [False], ["LATENT"])
    assert (info["category"], info["output_node"], info["python_module"]) == ("sampling", False, "nodes")
    save = object_info()["SaveImage"]
    assert save["output_node"] is True and save["input"]["hidden"] == {"prompt": "PROMPT",
                                                                       "extra_pnginfo": "EXTRA_PNGINFO"}
    unet = object_info()["UNETLoader"]["input"]["required"]["weight_dtype"][0]
    assert unet == ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
    json.dumps(object_info())  # JSON-serialisable


# ---- folders --------------------------------------------------------------------------------
def test_folders_listing_legacy_and_traversal(tmp_path, folders):
    base = folders.models_dir
    (base / "clip").mkdir()
    (base / "clip" / "old_t5.safetensors").write_bytes(b"")
    (base / "text_encoders" / "sub").mkdir()
    (base / "text_encoders" / "sub" / "x.sft").write_bytes(b"")
    (base / "text_encoders" / "readme.txt").write_text("no")
    names = folders.get_filename_list("clip")  # legacy name
    assert names == sorted(["clip_g.safetensors", "clip_l.safetensors", "old_t5.safetensors", "sub/x.sft",
                            "t5xxl_fp8_e4m3fn.safetensors"])
    assert folders.get_full_path("text_encoders", "old_t5.safetensors") == base / "clip" / "old_t5.safetensors"
    assert folders.get_full_path("checkpoints", "missing.safetensors") is None
    for bad in ("../checkpoints/sd3.5_large.safetensors", "/etc/passwd", "sub/../../x"):
        with pytest.raises(InputError):
            folders.get_full_path("text_encoders", bad)


def test_extra_model_paths_yaml(tmp_path, folders):
    other = tmp_path / "elsewhere"
    for sub in ("ckpts", "more_ckpts", "te"):
        (other / sub).mkdir(parents=True)
    (other / "ckpts" / "a.safetensors").write_bytes(b"")
    (other / "more_ckpts" / "b.safetensors").write_bytes(b"")
    (other / "te" / "c.safetensors").write_bytes(b"")
    yml = tmp_path / "extra_model_paths.yaml"
    yml.write_text(
        "comfyui:\n"
        "  base_path: elsewhere\n"
        "  is_default: true\n"
        "  checkpoints: |\n    ckpts\n    more_ckpts\n"
        "  clip: te\n"
        "empty:\n")
    folders.load_extra_config(yml)
    ck = folders.folders("checkpoints")
    assert ck[0] == other / "more_ckpts" and ck[1] == other / "ckpts"  # is_default inserts each at the front
    assert "a.safetensors" in folders.get_filename_list("checkpoints")
    assert folders.get_full_path("text_encoders", "c.safetensors") == other / "te" / "c.safetensors"


# ---- executor with a fake node set ----------------------------------------------------------
CALLS: dict[str, int] = {}


class FakeLoader(Node):
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"name": (["m1", "m2"],)}}

    def load(self, name):
        CALLS["load"] = CALLS.get("load", 0) + 1
        return (f"model:{name}",)


class FakeSampler(Node):
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "seed": ("INT", {"default": 0, "min": 0, "max": 10,
                                                                    "control_after_generate": True}),
                             "steps": ("INT", {"default": 2, "min": 1, "max": 10})}}

    def sample(self, model, seed, steps):
        CALLS["sample"] = CALLS.get("sample", 0) + 1
        for i in range(steps):
            self.ctx.check_interrupt()
            self.ctx.progress(i + 1, steps)
        if seed == 7:
            raise ValueError("seed 7 is cursed")
        return ({"samples": torch.full((1,), float(seed)), "model": model},)


class FakeSave(Node):
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"samples": ("LATENT",)}, "hidden": {"prompt": "PROMPT"}}

    def save(self, samples, prompt=None):
        CALLS["save"] = CALLS.get("save", 0) + 1
        return {"ui": {"values": [float(samples["samples"][0])]}}


FAKE = {"FakeLoader": FakeLoader, "FakeSampler": FakeSampler, "FakeSave": FakeSave}
FAKE_PROMPT = {
    "1": {"class_type": "FakeLoader", "inputs": {"name": "m1"}},
    "2": {"class_type": "FakeSampler", "inputs": {"model": ["1", 0], "seed": 3, "steps": 2}},
    "3": {"class_type": "FakeSave", "inputs": {"samples": ["2", 0]}},
    "4": {"class_type": "FakeLoader", "inputs": {"name": "m2"}},  # feeds no output: never runs
}


def test_executor_runs_needed_nodes_and_caches(tmp_path):
    CALLS.clear()
    ex = PromptExecutor(ModelFolders(tmp_path), classes=FAKE)
    events = []
    r = ex.execute(copy.deepcopy(FAKE_PROMPT), "p1", hooks=lambda e, d: events.append((e, d)))
    assert r.success and r.executed == ["1", "2", "3"] and r.outputs == {"3": {"values": [3.0]}}
    assert CALLS == {"load": 1, "sample": 1, "save": 1}
    names = [e for e, _ in events]
    assert names[:2] == ["execution_start", "execution_cached"] and names[-2:] == ["execution_success", "executing"]
    assert events[-1][1]["node"] is None
    assert ("progress", {"value": 2, "max": 2, "prompt_id": "p1", "node": "2"}) in events
    assert ("executed", {"node": "3", "display_node": "3", "output": {"values": [3.0]}, "prompt_id": "p1"}) in events

    p2 = copy.deepcopy(FAKE_PROMPT)
    p2["2"]["inputs"]["seed"] = 5  # only the seed changes: loader stays cached
    events.clear()
    r = ex.execute(p2, "p2", hooks=lambda e, d: events.append((e, d)))
    assert r.executed == ["2", "3"] and r.cached == ["1"] and CALLS == {"load": 1, "sample": 2, "save": 2}
    assert events[1][1]["nodes"] == ["1"]

    r = ex.execute(copy.deepcopy(p2), "p3")  # nothing changed: all cached, the UI output is still reported
    assert r.executed == [] and r.outputs == {"3": {"values": [5.0]}} and CALLS["sample"] == 2


def test_undeclared_link_to_a_missing_node_is_ignored(tmp_path):
    """An input the node does not declare is not validated and not passed to the node (ComfyUI ignores it);
    linking it to an id the prompt lacks used to fail the run with a bare KeyError while building cache keys
    (found by benchmarks/fuzz.py)."""
    CALLS.clear()
    p = copy.deepcopy(FAKE_PROMPT)
    p["2"]["inputs"]["extra"] = ["999", 0]
    r = PromptExecutor(ModelFolders(tmp_path), classes=FAKE).execute(p, "p1")
    assert r.success and r.executed == ["1", "2", "3"] and r.outputs == {"3": {"values": [3.0]}}


def test_executor_error_and_interrupt(tmp_path):
    CALLS.clear()
    ex = PromptExecutor(ModelFolders(tmp_path), classes=FAKE)
    p = copy.deepcopy(FAKE_PROMPT)
    p["2"]["inputs"]["seed"] = 7
    events = []
    r = ex.execute(p, "pe", hooks=lambda e, d: events.append((e, d)))
    assert not r.success and r.error["node_id"] == "2" and r.error["node_type"] == "FakeSampler"
    assert r.error["exception_type"] == "ValueError" and r.error["exception_message"] == "seed 7 is cursed"
    assert r.error["executed"] == ["1"] and r.error["current_inputs"]["seed"] == [7]
    assert {"prompt_id", "traceback", "current_outputs"} <= set(r.error)
    assert [e for e, _ in events][-2:] == ["execution_error", "executing"]

    p["2"]["inputs"]["seed"] = 1
    ex.interrupt()  # a flag set before the run is cleared at its start, as in ComfyUI
    assert ex.execute(copy.deepcopy(p), "pi").success
    p["2"]["inputs"]["seed"] = 2
    r = ex.execute(p, "pi2", hooks=lambda e, d: ex.interrupt() if e == "progress" else None)
    assert r.interrupted and not r.success


def test_executor_validates_and_rejects(tmp_path):
    ex = PromptExecutor(ModelFolders(tmp_path), classes=FAKE)
    p = copy.deepcopy(FAKE_PROMPT)
    p["2"]["inputs"]["seed"] = 11
    with pytest.raises(PromptValidationError, match="bigger than max"):
        ex.execute(p)


# ---- UI format ------------------------------------------------------------------------------
UI_WORKFLOW = {
    "last_node_id": 10, "last_link_id": 9,
    "nodes": [
        {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}, {"name": "CLIP", "type": "CLIP", "links": [3, 5]},
                     {"name": "VAE", "type": "VAE", "links": [8]}],
         "widgets_values": ["stable-diffusion-3.5-fp8.safetensors"]},
        {"id": 6, "type": "CLIPTextEncode", "mode": 0, "title": "Positive",
         "inputs": [{"name": "clip", "type": "CLIP", "link": 3}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}], "widgets_values": ["a cat"]},
        {"id": 7, "type": "CLIPTextEncode", "mode": 0, "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
         "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6]}], "widgets_values": ["blurry"]},
        {"id": 5, "type": "EmptySD3LatentImage", "mode": 0, "inputs": [],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [2]}], "widgets_values": [1024, 768, 1]},
        {"id": 10, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
         "outputs": [{"name": "", "type": "MODEL", "links": [9]}]},
        {"id": 3, "type": "KSampler", "mode": 0,
         "inputs": [{"name": "model", "type": "MODEL", "link": 9}, {"name": "positive", "type": "CONDITIONING", "link": 4},
                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                    {"name": "latent_image", "type": "LATENT", "link": 2}],
         "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}],
         "widgets_values": [42, "randomize", 28, 4.5, "euler", "sgm_uniform", 1.0]},
        {"id": 8, "type": "VAEDecode", "mode": 0,
         "inputs": [{"name": "samples", "type": "LATENT", "link": 7}, {"name": "vae", "type": "VAE", "link": 8}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [10]}], "widgets_values": []},
        {"id": 9, "type": "SaveImage", "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": 10}],
         "outputs": [], "widgets_values": ["sd35"]},
        {"id": 2, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["hello"]},
        {"id": 1, "type": "EmptyLatentImage", "mode": 2, "inputs": [], "outputs": [], "widgets_values": [512, 512, 1]},
    ],
    "links": [[1, 4, 0, 10, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"], [4, 6, 0, 3, 1, "CONDITIONING"],
              [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"],
              [9, 10, 0, 3, 0, "MODEL"], [10, 8, 0, 9, 0, "IMAGE"]],
    "groups": [], "config": {}, "extra": {}, "version": 0.4,
}


def test_ui_to_api(folders):
    api = ui_to_api(UI_WORKFLOW, folders=folders)
    assert sorted(api, key=int) == ["3", "4", "5", "6", "7", "8", "9"]
    assert api["3"]["inputs"] == {"seed": 42, "steps": 28, "cfg": 4.5, "sampler_name": "euler",
                                  "scheduler": "sgm_uniform", "denoise": 1.0, "model": ["4", 0],
                                  "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    assert api["5"]["inputs"] == {"width": 1024, "height": 768, "batch_size": 1}
    assert api["6"] == {"inputs": {"text": "a cat", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
                        "_meta": {"title": "Positive"}}
    assert api["9"]["inputs"] == {"filename_prefix": "sd35", "images": ["8", 0]}
    ok, error, outputs, node_errors = validate_prompt(api, folders=folders)
    assert ok, (error, node_errors)


def test_run_workflow_sets_and_validation(tmp_path, folders):
    p = _seed_prompt()
    apply_sets(p, ["3.seed=123", "6.text=hello world", "3.cfg=2.5"])
    assert p["3"]["inputs"]["seed"] == 123 and p["6"]["inputs"]["text"] == "hello world"
    with pytest.raises(InputError, match="no node"):
        apply_sets(p, ["77.seed=1"])
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(_seed_prompt()))
    with pytest.raises(PromptValidationError, match="smaller than min"):
        run_workflow(wf, folders.base_dir, sets=["3.steps=0"])


# ---- engine pieces and the real nodes on a tiny random model -------------------------------
def test_save_images_counter_metadata_and_latents(tmp_path):
    from PIL import Image

    from sd35fp8.workflow import engine

    lat = engine.empty_latent(64, 48, 2, channels=4)["samples"]
    assert lat.shape == (2, 4, 6, 8)
    assert engine.fix_empty_latent_channels(lat).shape == (2, 16, 6, 8)
    with pytest.raises(InputError, match="channels"):
        engine.fix_empty_latent_channels(torch.ones(1, 4, 2, 2))
    img = torch.rand(1, 16, 24, 3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pre_00041_.png").write_bytes(b"")  # ComfyUI continues after the largest counter
    (tmp_path / "sub" / "prefix_00099_.png").write_bytes(b"")  # another prefix: ignored
    saved = engine.save_images(img, tmp_path, "sub/pre", {"1": {}}, {"workflow": {"a": 1}}, "output", 4)
    assert saved == [{"filename": "pre_00042_.png", "subfolder": "sub", "type": "output"}]
    with Image.open(tmp_path / "sub" / "pre_00042_.png") as im:
        assert json.loads(im.text["workflow"]) == {"a": 1} and json.loads(im.text["prompt"]) == {"1": {}}
    with pytest.raises(InputError, match="outside the output folder"):
        engine.save_images(img, tmp_path, "../evil", None, None, "output", 4)


def test_save_images_from_threads_at_once_keep_every_image(tmp_path):
    """Workers (or replicas) saving into one folder at once: each image gets a name of its own (the counter moves
    past names taken meanwhile), none is replaced, no temporary file is left, and files get the usual mode."""
    import threading

    from sd35fp8.workflow import engine

    imgs, got = torch.rand(2, 8, 8, 3), []

    def save():
        for _ in range(10):
            got.extend(r["filename"] for r in engine.save_images(imgs, tmp_path, "race", None, None, "output", 1))

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(got) == len(set(got)) == 80 and files == sorted(got)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / files[0]).stat().st_mode & 0o777 == 0o666 & ~umask


class TinyModels(Node):
    """MODEL + VAE + two CONDITIONINGs from a tiny random MMDiT/VAE (no files)."""

    RETURN_TYPES = ("MODEL", "VAE", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {}}

    def build(self):
        from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_
        from sd35fp8.models.vae import SD3VAE, VAEConfig
        from sd35fp8.workflow.engine import SD3Model

        CALLS["tiny"] = CALLS.get("tiny", 0) + 1
        g = torch.Generator().manual_seed(0)
        cfg = MMDiTConfig(depth=2, hidden_size=64, num_heads=1, pos_embed_max_size=8, context_dim=32, pooled_dim=16,
                          qk_norm=True)
        mmdit = init_random_(MMDiT(cfg), g).eval()
        vae = SD3VAE(VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)).eval()
        cond = [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g)}]]
        neg = [[torch.randn(1, 5, 32, generator=g), {"pooled_output": torch.randn(1, 16, generator=g)}]]
        return SD3Model(mmdit), vae, cond, neg


TINY_PROMPT = {
    "1": {"class_type": "TinyModels", "inputs": {}},
    "2": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
    "3": {"class_type": "SkipLayerGuidanceSD3", "inputs": {"model": ["2", 0], "layers": "0", "scale": 1.0,
                                                           "start_percent": 0.0, "end_percent": 0.5}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
    "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["1", 3]}},
    "6": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 1, "steps": 3, "cfg": 2.0,
                                               "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                                               "positive": ["1", 2], "negative": ["5", 0], "latent_image": ["4", 0]}},
    "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 1]}},
    "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "tiny/img"}},
}


def test_real_nodes_on_tiny_model(tmp_path):
    from PIL import Image

    CALLS.clear()
    classes = {**NODE_CLASS_MAPPINGS, "TinyModels": TinyModels}
    ex = PromptExecutor(ModelFolders(tmp_path, output_dir=tmp_path / "output"), classes=classes)
    events = []
    r1 = ex.execute(copy.deepcopy(TINY_PROMPT), "a", extra_data={"extra_pnginfo": {"workflow": {"w": 1}}},
                    hooks=lambda e, d: events.append((e, d)))
    assert r1.success, r1.error
    assert r1.outputs["8"]["images"] == [{"filename": "img_00001_.png", "subfolder": "tiny", "type": "output"}]
    assert [d["value"] for e, d in events if e == "progress"] == [1, 2, 3]
    p2 = copy.deepcopy(TINY_PROMPT)
    p2["6"]["inputs"]["seed"] = 2
    r2 = ex.execute(p2, "b")
    assert r2.success and r2.executed == ["6", "7", "8"] and CALLS["tiny"] == 1
    out = tmp_path / "output" / "tiny"
    with Image.open(out / "img_00001_.png") as a, Image.open(out / "img_00002_.png") as b:
        assert a.size == (8, 8)  # 4x4 latent, the tiny VAE upsamples x2
        assert json.loads(a.text["workflow"]) == {"w": 1}
        assert json.loads(a.text["prompt"])["6"]["inputs"]["seed"] == 1
        assert a.tobytes() != b.tobytes()  # another seed, another image
    r3 = ex.execute(copy.deepcopy(TINY_PROMPT), "c")  # back to seed 1: same pixels as the first run
    with Image.open(out / "img_00001_.png") as a, Image.open(out / "img_00003_.png") as c:
        assert a.tobytes() == c.tobytes()
    assert r3.success


class TinyConds(Node):
    """CONDITIONINGs shaped for ckpt_fixtures.TINY_MMDIT (context 64, pooled 32)."""

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {}}

    def build(self):
        g = torch.Generator().manual_seed(1)
        return tuple([[torch.randn(1, 4, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
                     for _ in range(2))


def test_checkpoint_loader_on_tiny_file(tmp_path):
    from ckpt_fixtures import ckpt_all_in_one

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    ckpt_all_in_one(tmp_path / "models" / "checkpoints" / "tiny.safetensors", text=False)
    folders = ModelFolders(tmp_path)
    classes = {**NODE_CLASS_MAPPINGS, "TinyConds": TinyConds}
    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "1": {"class_type": "TinyConds", "inputs": {}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["4", 0], "seed": 5, "steps": 2, "cfg": 3.0,
                                                   "sampler_name": "dpmpp_2m_sde", "scheduler": "normal",
                                                   "denoise": 1.0, "positive": ["1", 0], "negative": ["1", 1],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    ex = PromptExecutor(folders, classes=classes)
    r = ex.execute(copy.deepcopy(prompt), "t")
    assert r.success, r.error
    images = r.outputs["9"]["images"]
    assert len(images) == 2 and all(i["type"] == "temp" for i in images)
    assert images[0]["filename"].startswith("ComfyUI_temp_")  # ComfyUI's "ComfyUI_temp_" + 5 letters, one "_"
    assert len(images[0]["filename"]) == len("ComfyUI_temp_abcde_00001_.png")
    assert (folders.temp_dir / images[0]["filename"]).is_file()
    # this checkpoint has no text encoders: CLIP is None and encoding fails with ComfyUI's words
    prompt["6"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}}
    prompt["3"]["inputs"]["positive"] = ["6", 0]
    r = ex.execute(prompt, "t2")
    assert not r.success and r.error["node_id"] == "6" and "clip input is invalid: None" in r.error["exception_message"]
    assert "4" in r.error["current_outputs"]


# The seed workflows on the real shipped checkpoint: tests/test_workflow_shipped.py.


def test_load_image_accepts_subfolders_and_annotated_names(folders):
    """ComfyUI LoadImage.VALIDATE_INPUTS: any existing file ('pasted/x.png' from the web UI's paste,
    'x.png [output]'), not only the files listed in input/; a missing one fails custom validation."""
    from PIL import Image

    (folders.input_dir / "pasted").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(folders.input_dir / "pasted" / "p.png")
    folders.output_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(folders.output_dir / "o.png")

    def prompt(name):
        return {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}

    for name in ("pasted/p.png", "pasted/p.png [input]", "o.png [output]"):
        ok, error, _, node_errors = validate_prompt(prompt(name), folders=folders)
        assert ok, (name, error, node_errors)
    assert folders.annotated_path("o.png [output]") == folders.output_dir / "o.png"
    ok, error, _, node_errors = validate_prompt(prompt("missing.png"), folders=folders)
    assert not ok
    (err,) = node_errors["1"]["errors"]
    assert err["type"] == "custom_validation_failed" and err["details"] == "image - Invalid image file: missing.png"
    with pytest.raises(InputError):
        folders.annotated_path("../x.png [input]")
