"""A ComfyUI-style models/ folder holding the shipped model under the seed workflows' file names.

checkpoints/stable-diffusion-3.5-fp8.safetensors  all-in-one, MMDiT as ComfyUI scaled fp8 (our quantizer)
checkpoints/sd3.5_large.safetensors               MMDiT + VAE only (the official single-file layout)
text_encoders/clip_l.safetensors, clip_g.safetensors, t5xxl_fp8_e4m3fn.safetensors (plain fp8 Linears)
spiece.model beside the files that hold a T5.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd35fp8.checkpoints.export import export
from sd35fp8.workflow.executor import PromptExecutor
from sd35fp8.tiny import SHIPPED_CHECKPOINT, SHIPPED_T5_TOKENIZER

WORKFLOWS = Path(__file__).resolve().parent / "data"  # copies of shared/workflows/seed-*.json


def _tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _plain_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's t5xxl_fp8_e4m3fn: Linear weights stored as float8_e4m3fn, used with scale 1."""
    return {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and k.endswith(".weight") and "embed" not in k
                and k != "shared.weight" and "relative_attention_bias" not in k else v) for k, v in sd.items()}


def build_models_folder(root: Path, source: Path = SHIPPED_CHECKPOINT) -> Path:
    models = root / "models"
    ckpt, te = models / "checkpoints", models / "text_encoders"
    ckpt.mkdir(parents=True, exist_ok=True)
    te.mkdir(parents=True, exist_ok=True)
    export(source, ckpt / "stable-diffusion-3.5-fp8.safetensors", fmt="comfy")
    single = {**{f"model.diffusion_model.{k}": v for k, v in _tensors(source, "model.diffusion_model.").items()},
              **{f"first_stage_model.{k}": v for k, v in _tensors(source, "first_stage_model.").items()}}
    save_file(single, str(ckpt / "sd3.5_large.safetensors"))
    save_file(_tensors(source, "text_encoders.clip_l.transformer."), str(te / "clip_l.safetensors"))
    save_file(_tensors(source, "text_encoders.clip_g.transformer."), str(te / "clip_g.safetensors"))
    save_file(_plain_fp8(_tensors(source, "text_encoders.t5xxl.transformer.")), str(te / "t5xxl_fp8_e4m3fn.safetensors"))
    for folder in (ckpt, te):
        shutil.copy(SHIPPED_T5_TOKENIZER, folder / "spiece.model")
    return models


class RecordingExecutor(PromptExecutor):
    """Remembers, per prompt id, how many prompts it was sampled with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled_with: dict[str, int] = {}

    def execute(self, prompt, prompt_id="", *args, **kwargs):
        result = super().execute(prompt, prompt_id, *args, **kwargs)
        self.sampled_with[prompt_id] = result.sampled_with
        return result

    def execute_batch(self, jobs, on_result=None):
        def record(i, result):
            self.sampled_with[result.prompt_id] = result.sampled_with
            if on_result is not None:
                on_result(i, result)

        return super().execute_batch(jobs, record)


def tiny_checkpoint_folder(root: Path) -> Path:
    """root/models/checkpoints holding the shipped model as tiny.safetensors with spiece.model beside it -> root."""
    ckpts = root / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(SHIPPED_CHECKPOINT, ckpts / "tiny.safetensors")
    shutil.copy(SHIPPED_T5_TOKENIZER, ckpts / "spiece.model")
    return root


def tiny_base_prompt() -> dict:
    """Nodes 1-4 of an API prompt on tiny_checkpoint_folder's model: the checkpoint, a positive and an empty
    prompt, a 64x64 SD3 latent."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a brown circle"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
