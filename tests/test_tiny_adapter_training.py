"""The shipped adapters' trainers run from the package (python -m sd35fp8.tiny.train_lora / train_controlnet)
and write loadable files: a few steps on toy data, CPU. How well the shipped files work is measured by
benchmarks/tiny_lora.py and `train_controlnet --eval-only` (benchmarks/results/)."""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors import safe_open

from sd35fp8.checkpoints.controlnet import load_controlnet
from sd35fp8.models.vae import to_model_space, to_vae_space
from sd35fp8.pipeline import SD35Pipeline
from sd35fp8.tiny import concept, train_controlnet, train_lora, world


def test_train_lora_writes_a_kohya_file(tmp_path):
    out = tmp_path / "l.safetensors"
    rec = train_lora.main(["--steps", "2", "--batch", "2", "--n-images", "4", "--workers", "1", "--out", str(out)])
    assert rec["steps_done"] == 2 and out.exists()
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["sd35fp8.lora"])
    assert any(k.startswith("lora_unet_joint_blocks_0_") for k in keys)
    assert any(k.startswith("lora_te3_") for k in keys)
    assert meta["steps_done"] == 2 and meta["concept"]["word"] == "brown"


def test_train_controlnet_writes_a_stability_file(tmp_path):
    out = tmp_path / "c.safetensors"
    rec = train_controlnet.main(["--n-train", "4", "--steps", "2", "--batch", "2", "--workers", "1",
                                 "--eval-n", "0", "--out", str(out)])
    assert rec["train"]["steps_done"] == 2
    net = load_controlnet(out, dtype=torch.float32)
    assert net.config.num_layers == train_controlnet.LAYERS and net.config.control_type == 0


def test_mixed_edge_maps_follow_the_levels():
    rng = np.random.default_rng(0)
    images = np.stack([world.render(world.sample_scene(rng), 128) for _ in range(3)])
    maps = train_controlnet.mixed_edge_maps(images, np.random.default_rng(1))  # [3, H, W, 3]
    assert maps.shape == images.shape and set(maps.unique().tolist()) <= {0.0, 1.0}


def test_invert_latents_lowers_the_decoder_error():
    pipe = SD35Pipeline.from_pretrained(None, device="cpu", dtype=torch.float32, fp8="none")
    rng = np.random.default_rng(0)
    img, _ = concept.brown_scene(rng, 64)
    x = torch.from_numpy(img[None]).float().movedim(-1, 1) / 127.5 - 1.0  # [1, 3, 64, 64]
    with torch.no_grad():
        z = to_model_space(pipe.vae.encode(x))
    zi = train_lora.invert_latents(pipe.vae, x, z, steps=3)
    with torch.no_grad():
        before = (pipe.vae.decode(to_vae_space(z)) - x).abs().mean()
        after = (pipe.vae.decode(to_vae_space(zi)) - x).abs().mean()
    assert after < before


def test_controlnet_eval_only_keeps_the_earlier_evaluation(tmp_path):
    """--eval-only rewrites the result's "eval" and moves the one it replaces to "earlier_evals"."""
    result = tmp_path / "eval.json"
    result.write_text(json.dumps({"command": "train", "train": {"steps": 1}, "date": "d0", "device": "gpu",
                                  "eval": {"n": 200}}))
    train_controlnet.main(["--eval-only", "--eval-n", "1", "--eval-steps", "1", "--result", str(result)])
    rec = json.loads(result.read_text())
    assert rec["train"] == {"steps": 1} and rec["eval"]["results"]
    assert rec["earlier_evals"] == [{"date": "d0", "device": "gpu", "eval": {"n": 200}}]


def test_masked_inversion_moves_only_the_object_box():
    """--invert-region object: the latent cells outside the brown object's (dilated) box keep the encoder's values."""
    pipe = SD35Pipeline.from_pretrained(None, device="cpu", dtype=torch.float32, fp8="none")
    img, _, cov = concept.brown_scene(np.random.default_rng(0), 64, coverage=True)
    box = train_lora.latent_box(cov)  # [8, 8]
    assert box.shape == (8, 8) and 0 < box.sum() < box.size
    x = torch.from_numpy(img[None]).float().movedim(-1, 1) / 127.5 - 1.0
    with torch.no_grad():
        z = to_model_space(pipe.vae.encode(x))
    mask = torch.from_numpy(box)[None, None].float()
    zi = train_lora.invert_latents(pipe.vae, x, z, steps=2, mask=mask, reg=1.0)
    moved = (zi - z).abs().amax(dim=1)[0] > 0  # [8, 8]
    assert moved.any() and not (moved & (mask[0, 0] == 0)).any()


def test_fp8_aware_fine_tune_starts_from_its_init_and_records_it(tmp_path):
    from sd35fp8.models import mmdit as mmdit_module
    from sd35fp8.tiny import WEIGHTS_DIR

    SHIPPED_LORA_PATH = WEIGHTS_DIR / train_lora.LORA_NAME

    attention = mmdit_module.attention
    out = tmp_path / "f.safetensors"
    rec = train_lora.main(["--steps", "2", "--batch", "2", "--n-images", "4", "--workers", "1", "--rank", "32",
                           "--init", str(SHIPPED_LORA_PATH), "--fp8-aware", "all", "--lr", "0", "--out", str(out)])
    assert mmdit_module.attention is attention  # the emulation is undone when training ends
    assert rec["init"]["file"] == SHIPPED_LORA_PATH.name and len(rec["init"]["sha256"]) == 64
    with safe_open(str(out), "pt") as f, safe_open(str(SHIPPED_LORA_PATH), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())  # lr 0: the init, unchanged
