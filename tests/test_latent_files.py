"""SaveLatent / LoadLatent (workflow/nodes_latent_files.py): ComfyUI's .latent safetensors layout both ways."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd35fp8.workflow.executor import PromptExecutor
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.validate import validate_prompt
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS


def test_save_and_load_latent(tmp_path):
    (tmp_path / "input").mkdir()
    folders = ModelFolders(tmp_path / "models", output_dir=tmp_path / "output", input_dir=tmp_path / "input",
                           temp_dir=tmp_path / "temp")
    ex = PromptExecutor(folders, device="cpu", dtype=torch.float32)
    prompt = {"1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 32, "batch_size": 2}},
              "2": {"class_type": "LatentMultiply", "inputs": {"samples": ["1", 0], "multiplier": 1.0}},
              "3": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latents/t"}}}
    result = ex.execute(prompt, prompt_id="s", extra_data={"extra_pnginfo": {"workflow": {"k": 1}}})
    assert result.success, result.error
    (entry,) = result.outputs["3"]["latents"]
    assert entry == {"filename": "t_00001_.latent", "subfolder": "latents", "type": "output"}
    path = tmp_path / "output" / "latents" / entry["filename"]
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert f.get_tensor("latent_tensor").shape == (2, 16, 4, 8)
        meta = f.metadata()
    assert json.loads(meta["workflow"]) == {"k": 1} and "prompt" in meta
    shutil.copy(path, tmp_path / "input" / "a.latent")
    save_file({"latent_tensor": torch.full((1, 16, 4, 4), 0.18215)}, str(tmp_path / "input" / "old.latent"))
    assert NODE_CLASS_MAPPINGS["LoadLatent"].INPUT_TYPES(folders)["required"]["latent"][0] == ["a.latent",
                                                                                               "old.latent"]
    load = {"1": {"class_type": "LoadLatent", "inputs": {"latent": "old.latent"}},
            "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "back"}}}
    result = ex.execute(load, prompt_id="l", extra_data={})
    assert result.success, result.error
    with safe_open(str(tmp_path / "output" / "back_00001_.latent"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("latent_tensor"), torch.ones(1, 16, 4, 4))  # old files: / 0.18215
    ok, _, _, node_errors = validate_prompt({"1": {"class_type": "LoadLatent", "inputs": {"latent": "../x.latent"}},
                                             "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0],
                                                                                          "filename_prefix": "x"}}},
                                            NODE_CLASS_MAPPINGS, folders)
    assert not ok and "1" in node_errors
    (tmp_path / "input" / "bad.latent").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    result = ex.execute({"1": {"class_type": "LoadLatent", "inputs": {"latent": "bad.latent"}},
                         "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "x"}}},
                        prompt_id="b",
                        extra_data={})
    assert not result.success and "bad.latent" in json.dumps(result.error)
