"""The shipped LoRA (brown) on the shipped model: it loads in its kohya layout, changes the images, and leaves
the base model's pixels unchanged at strength 0 and after unloading. How well it draws brown is measured by
benchmarks/tiny_lora.py (benchmarks/results/tiny_lora_cpu.json and tiny_lora_<gpu>.json), not asserted here."""

from __future__ import annotations

import numpy as np
import pytest

from sd35fp8.lora.commands import describe_lora
from sd35fp8.pipeline import SD35Pipeline
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.tiny.train_lora import LORA_NAME

LORA = SHIPPED_CHECKPOINT.parent / LORA_NAME
pytestmark = pytest.mark.skipif(not LORA.exists() or not SHIPPED_CHECKPOINT.exists(), reason="shipped LoRA not built")
SHAPES = ("circle", "square")


def images(pipe, prompts, seed=3):
    out = pipe(list(prompts), num_inference_steps=20, seed=seed, progress=False)
    return [np.asarray(im.convert("RGB")) for im in out.images]


def test_shipped_lora() -> None:
    info = describe_lora(LORA)
    assert info["format"] == "kohya / sd-scripts" and info["fits"] == "the shipped tiny model (3 blocks)"
    assert set(info["targets"]) == {"mmdit", "clip_l", "clip_g", "t5xxl"} and not info["skipped"]
    assert LORA.stat().st_size <= 2 * 2**20
    pipe = SD35Pipeline.from_pretrained(device="cpu")
    prompts = [f"a photo of a brown {s}" for s in SHAPES]
    base = images(pipe, prompts)
    pipe.load_lora_weights(LORA, adapter_name="brown", weight=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(images(pipe, prompts), base))
    pipe.set_adapters("brown", 1.0)
    with_lora = images(pipe, prompts)
    assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(with_lora, base)) > 20
    pipe.unload_lora_weights()
    assert all(np.array_equal(a, b) for a, b in zip(images(pipe, prompts), base))


def test_joint_attention_kwargs_scale_is_the_lora_weight() -> None:
    """diffusers' joint_attention_kwargs={"scale": s}: the active adapters' weights times s for that call only."""
    pipe = SD35Pipeline.from_pretrained(device="cpu")
    prompts = ["a photo of a brown circle"]
    pipe.load_lora_weights(LORA, adapter_name="brown", weight=0.8)
    scaled = pipe(prompts, num_inference_steps=6, seed=1, progress=False, joint_attention_kwargs={"scale": 0.5})
    assert pipe.loras.active == {"brown": 0.8}  # restored after the call
    pipe.set_adapters("brown", 0.4)
    direct = pipe(prompts, num_inference_steps=6, seed=1, progress=False)
    assert np.array_equal(np.asarray(scaled.images[0]), np.asarray(direct.images[0]))
    off = pipe(prompts, num_inference_steps=6, seed=1, progress=False, joint_attention_kwargs={"scale": 0.0})
    pipe.unload_lora_weights()
    base = pipe(prompts, num_inference_steps=6, seed=1, progress=False)
    assert np.array_equal(np.asarray(off.images[0]), np.asarray(base.images[0]))
    with pytest.raises(Exception, match="only 'scale'"):
        pipe(prompts, num_inference_steps=1, progress=False, joint_attention_kwargs={"attention_mask": 1})


def test_disable_and_enable_lora() -> None:
    """diffusers' disable_lora / enable_lora: off keeps the adapter loaded with its weight (the base model's pixels),
    on gives the weighted adapter's pixels again; set_adapters while off turns the chosen adapters on."""
    pipe = SD35Pipeline.from_pretrained(device="cpu")
    prompts = ["a photo of a brown circle"]

    def run():
        return np.asarray(pipe(prompts, num_inference_steps=6, seed=1, progress=False).images[0])

    base = run()
    pipe.load_lora_weights(LORA, adapter_name="brown", weight=0.7)
    lora = run()
    assert not np.array_equal(lora, base)
    pipe.disable_lora()
    assert np.array_equal(run(), base) and pipe.get_list_adapters()["mmdit"] == ["brown"]
    pipe.disable_lora()  # twice: still off, the weights still remembered
    pipe.enable_lora()
    assert pipe.loras.active == {"brown": 0.7} and np.array_equal(run(), lora)
    pipe.disable_lora()
    pipe.set_adapters("brown", 0.7)
    pipe.enable_lora()  # nothing left to restore: set_adapters already chose
    assert np.array_equal(run(), lora)
