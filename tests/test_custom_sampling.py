"""ComfyUI's custom-sampling nodes on the shipped model: SamplerCustomAdvanced(RandomNoise, CFGGuider,
KSamplerSelect, BasicScheduler) and SamplerCustom give KSampler's pixels; the sigma nodes' arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfy_models import tiny_checkpoint_folder
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow.executor import PromptExecutor
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.nodes_sampling import SetFirstSigma, SplitSigmas

pytestmark = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")


def _base(tmp) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
    }


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    root = tiny_checkpoint_folder(tmp_path_factory.mktemp("cs"))
    return PromptExecutor(ModelFolders(root), device="cpu", dtype=torch.float32), root


def _image(root, result) -> np.ndarray:
    from PIL import Image

    (img,) = [i for ui in result.outputs.values() for i in ui["images"]]
    return np.asarray(Image.open(root / "temp" / img["subfolder"] / img["filename"]).convert("RGB"))


def _run(ex, root, prompt, out) -> np.ndarray:
    prompt = {**prompt, "9": {"class_type": "VAEDecode", "inputs": {"samples": [out, 0], "vae": ["1", 2]}},
              "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}}
    result = ex.execute(prompt, prompt_id="p", extra_data={}, execute_outputs=["10"])
    assert result.success, result.error
    return _image(root, result)


def test_custom_sampling_equals_ksampler(executor):
    ex, root = executor
    base = _base(root)
    ks = {**base, "5": {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 7, "steps": 4, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}}
    adv = {**base,
           "5": {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}},
           "6": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                       "negative": ["3", 0], "cfg": 4.0}},
           "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
           "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 4,
                                                            "denoise": 1.0}},
           "11": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["5", 0], "guider": ["6", 0],
                                                                    "sampler": ["7", 0], "sigmas": ["8", 0],
                                                                    "latent_image": ["4", 0]}}}
    custom = {**base,
              "7": adv["7"], "8": adv["8"],
              "11": {"class_type": "SamplerCustom", "inputs": {
                  "model": ["1", 0], "add_noise": True, "noise_seed": 7, "cfg": 4.0, "positive": ["2", 0],
                  "negative": ["3", 0], "sampler": ["7", 0], "sigmas": ["8", 0], "latent_image": ["4", 0]}}}
    a = _run(ex, root, ks, "5")
    b = _run(ex, root, adv, "11")
    c = _run(ex, root, custom, "11")
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_sigma_nodes():
    s = torch.tensor([1.0, 0.5, 0.25, 0.0])
    (first,) = SetFirstSigma(None).set_first_sigma(s, 136.0)
    assert first[0] == 136.0 and s[0] == 1.0
    high, low = SplitSigmas(None).get_sigmas(s, 2)
    assert high.tolist() == [1.0, 0.5, 0.25] and low.tolist() == [0.25, 0.0]
