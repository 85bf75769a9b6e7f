"""ComfyUI's scheduler, sampler and sigma nodes (nodes_sigmas.py, nodes_sampling.py) and SaveImageWebsocket.

The schedules are checked against k-diffusion's formulas written out here in float64 numpy (an independent
reference); the sampler nodes and SamplerCustomAdvanced's road through the generation core (LoRA, inpainting
mask, SkipLayerGuidanceSD3) against KSampler on the shipped model; SaveImageWebsocket against ComfyUI's frame
layout (websockets_api_example_ws_images.py reads m[8:] as the PNG).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from sd35fp8.errors import InputError
from sd35fp8.server.validation import prompt_work
from comfy_models import tiny_base_prompt, tiny_checkpoint_folder
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.tiny.train_lora import LORA_NAME
from sd35fp8.workflow.executor import PromptExecutor
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, NodeContext
from sd35fp8.workflow.nodes_sigmas import MAX_SIGMAS

shipped = pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")


def node(name: str, ctx: NodeContext | None = None):
    cls = NODE_CLASS_MAPPINGS[name]
    return getattr(cls(ctx), cls.FUNCTION)


class _Model:  # what the schedulers read of a MODEL
    shift = 3.0


def _flow_sigma(t: np.ndarray, shift: float = 3.0) -> np.ndarray:
    return shift * t / (1 + (shift - 1) * t)


def test_schedules_match_k_diffusion():
    n, lo, hi = 9, 0.0291675, 14.614642
    z = [0.0]
    ramp = np.linspace(0, 1, n)
    karras = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    (got,) = node("KarrasScheduler")(n, hi, lo, 7.0)
    np.testing.assert_allclose(got.numpy(), np.r_[karras, z], rtol=2e-6)
    (got,) = node("ExponentialScheduler")(n, hi, lo)
    np.testing.assert_allclose(got.numpy(), np.r_[np.exp(np.linspace(math.log(hi), math.log(lo), n)), z], rtol=2e-6)
    poly = np.exp(np.linspace(1, 0, n) ** 2.0 * (math.log(hi) - math.log(lo)) + math.log(lo))
    (got,) = node("PolyexponentialScheduler")(n, hi, lo, 2.0)
    np.testing.assert_allclose(got.numpy(), np.r_[poly, z], rtol=2e-6)
    t = np.linspace(1, 1e-3, n)
    (got,) = node("VPScheduler")(n, 19.9, 0.1, 1e-3)
    np.testing.assert_allclose(got.numpy(), np.r_[np.sqrt(np.expm1(19.9 * t ** 2 / 2 + 0.1 * t)), z], rtol=2e-6)
    x = np.linspace(0, 1, n)
    lap = np.clip(np.exp(0.0 - 0.5 * np.sign(0.5 - x) * np.log(1 - 2 * np.abs(0.5 - x) + 1e-5)), lo, hi)
    (got,) = node("LaplaceScheduler")(n, hi, lo, 0.0, 0.5)
    np.testing.assert_allclose(got.numpy(), lap, rtol=2e-6)  # ComfyUI's: no final 0
    # SDTurbo: the flow sigmas at timesteps 999, 899, ... (denoise 0.5 starts at 499)
    (got,) = node("SDTurboScheduler")(_Model(), 3, 0.5)
    np.testing.assert_allclose(got.numpy(), np.r_[_flow_sigma(np.array([499, 399, 299]) / 1000), z], rtol=1e-6)
    (got,) = node("BetaSamplingScheduler")(_Model(), 6, 0.6, 0.6)
    assert got[0] == pytest.approx(1.0) and got[-1] == 0 and bool((got[:-1] > got[1:]).all())
    for bad in (lambda: node("ExponentialScheduler")(4, 1.0, 0.0), lambda: node("KarrasScheduler")(4, 1.0, 0.1, 0.0),
                lambda: node("ManualSigmas")("1..5, 0")):
        with pytest.raises(InputError):
            bad()


def test_sigma_tools():
    s = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    high, low = node("SplitSigmasDenoise")(s, 0.5)
    assert high.tolist() == pytest.approx([1.0, 0.8, 0.5]) and low.tolist() == pytest.approx([0.5, 0.2, 0.0])
    (flipped,) = node("FlipSigmas")(s)
    assert flipped.tolist() == pytest.approx([1e-4, 0.2, 0.5, 0.8, 1.0])
    (ext,) = node("ExtendIntermediateSigmas")(s, 2, -1.0, 0.5, "linear")  # one midpoint where sigma >= 0.5
    assert ext.tolist() == pytest.approx([1.0, 0.9, 0.8, 0.65, 0.5, 0.35, 0.2, 0.0])
    (manual,) = node("ManualSigmas")("1, 0.75 0.5,0")
    assert manual.tolist() == [1.0, 0.75, 0.5, 0.0]
    with pytest.raises(InputError, match="at most"):
        node("ManualSigmas")(", ".join(["0.5"] * (MAX_SIGMAS + 5)))
    (sig,) = node("SamplingPercentToSigma")(_Model(), 0.25, False)
    assert sig == pytest.approx(_flow_sigma(0.75))
    assert node("SamplingPercentToSigma")(_Model(), 0.0, False) == (1.0,)
    assert node("SamplingPercentToSigma")(_Model(), 1.0, True)[0] == pytest.approx(_flow_sigma(1 / 1000))


def test_server_budget_counts_manual_and_extended_sigmas():
    latent = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    manual = {"class_type": "ManualSigmas", "inputs": {"sigmas": "1, 0.9 0.8, 0.5, 0"}}
    assert prompt_work({"1": latent, "2": manual}) == 64 * 64 * 5
    sched = {"class_type": "BasicScheduler", "inputs": {"steps": 10}}
    extend = {"class_type": "ExtendIntermediateSigmas", "inputs": {"steps": 4}}
    assert prompt_work({"1": latent, "2": sched, "3": extend}) == 64 * 64 * 40


def test_sampler_nodes_carry_their_options():
    (s,) = node("SamplerEulerAncestral")(0.5, 0.8)
    assert s.name == "euler_ancestral" and dict(s.options) == {"eta": 0.5, "s_noise": 0.8}
    (s,) = node("SamplerDPMPP_2M_SDE")("heun", 1.0, 1.0, "cpu")
    assert s.name == "dpmpp_2m_sde" and dict(s.options)["solver_type"] == "heun"
    (s,) = node("SamplerDPMPP_SDE")(1.0, 1.0, 0.5, "gpu")
    assert s.name == "dpmpp_sde_gpu" and dict(s.options)["r"] == 0.5
    assert node("SamplerLMS")(3)[0].options == (("order", 3),)
    assert node("SamplerDPMPP_3M_SDE")(0.0, 1.0, "cpu")[0].name == "dpmpp_3m_sde"
    (s,) = node("SamplerDPMAdaptative")(2, 0.1, 0.01, 0.05, 0.0, 1.0, 0.0, 0.81, 0.0, 1.0)
    assert s.name == "dpm_adaptive" and dict(s.options)["order"] == 2 and dict(s.options)["rtol"] == 0.1


# ---- on the shipped model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    if not SHIPPED_CHECKPOINT.exists():
        pytest.skip("shipped model weights not built")
    root = tiny_checkpoint_folder(tmp_path_factory.mktemp("csn"))
    (root / "models" / "loras").mkdir(parents=True)
    lora = SHIPPED_CHECKPOINT.parent / LORA_NAME
    if lora.exists():
        shutil.copy(lora, root / "models" / "loras" / "brown.safetensors")
    return PromptExecutor(ModelFolders(root), device="cpu", dtype=torch.float32), root


_base = tiny_base_prompt


def _ksampler(model, sampler="euler", latent=("4", 0), seed=5) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": list(model), "seed": seed, "steps": 4, "cfg": 4.0, "sampler_name": sampler, "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": list(latent), "denoise": 1.0}}


def _custom(model, sampler_node: dict, latent=("4", 0), seed=5) -> dict:
    return {
        "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "21": {"class_type": "CFGGuider", "inputs": {"model": list(model), "positive": ["2", 0],
                                                     "negative": ["3", 0], "cfg": 4.0}},
        "22": sampler_node,
        "23": {"class_type": "BasicScheduler", "inputs": {"model": list(model), "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}},
        "24": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["20", 0], "guider": ["21", 0],
                                                                 "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                 "latent_image": list(latent)}},
    }


def _pixels(ex, root, prompt, out) -> np.ndarray:
    prompt = {**prompt, "90": {"class_type": "VAEDecode", "inputs": {"samples": [out, 0], "vae": ["1", 2]}},
              "91": {"class_type": "PreviewImage", "inputs": {"images": ["90", 0]}}}
    result = ex.execute(prompt, prompt_id="p", extra_data={}, execute_outputs=["91"])
    assert result.success, result.error
    (img,) = result.outputs["91"]["images"]
    return np.asarray(Image.open(root / "temp" / img["subfolder"] / img["filename"]).convert("RGB"))


def test_sampler_nodes_equal_ksampler(executor):
    ex, root = executor
    m = ("1", 0)
    euler = _pixels(ex, root, {**_base(), "5": _ksampler(m)}, "5")
    ancestral = _pixels(ex, root, {**_base(), "5": _ksampler(m, "euler_ancestral")}, "5")
    sel = {"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 1.0}}
    assert np.array_equal(_pixels(ex, root, {**_base(), **_custom(m, sel)}, "24"), ancestral)
    sel0 = {"class_type": "SamplerEulerAncestral", "inputs": {"eta": 0.0, "s_noise": 1.0}}  # no noise: euler's
    no_noise = _pixels(ex, root, {**_base(), **_custom(m, sel0)}, "24")  # step, in other float32 arithmetic
    assert np.abs(no_noise.astype(int) - euler).max() <= 2 < np.abs(ancestral.astype(int) - euler).max()
    lms = _pixels(ex, root, {**_base(), "5": _ksampler(m, "lms")}, "5")
    sel_lms = {"class_type": "SamplerLMS", "inputs": {"order": 4}}
    assert np.array_equal(_pixels(ex, root, {**_base(), **_custom(m, sel_lms)}, "24"), lms)
    sde = {"class_type": "SamplerDPMPP_2M_SDE", "inputs": {"solver_type": "midpoint", "eta": 0.5, "s_noise": 1.0,
                                                           "noise_device": "cpu"}}
    sde_full = {**sde, "inputs": {**sde["inputs"], "eta": 1.0}}
    a = _pixels(ex, root, {**_base(), **_custom(m, sde)}, "24")
    assert np.array_equal(_pixels(ex, root, {**_base(), **_custom(m, sde_full)}, "24"),
                          _pixels(ex, root, {**_base(), "5": _ksampler(m, "dpmpp_2m_sde")}, "5"))
    assert not np.array_equal(a, _pixels(ex, root, {**_base(), **_custom(m, sde_full)}, "24"))  # eta is used


def test_custom_sampling_keeps_lora_mask_and_slg(executor):
    """SamplerCustomAdvanced runs through the generation core: the MODEL's LoRA, SkipLayerGuidanceSD3 and the
    latent's noise mask act there as under KSampler (they were dropped before)."""
    ex, root = executor
    euler = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    plain = _pixels(ex, root, {**_base(), **_custom(("1", 0), euler)}, "24")
    if (root / "models" / "loras" / "brown.safetensors").exists():
        lora = {"30": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "brown.safetensors",
                                                                       "strength_model": 1.0}}}
        via_k = _pixels(ex, root, {**_base(), **lora, "5": _ksampler(("30", 0))}, "5")
        via_c = _pixels(ex, root, {**_base(), **lora, **_custom(("30", 0), euler)}, "24")
        assert np.array_equal(via_k, via_c) and not np.array_equal(via_c, plain)
    slg = {"30": {"class_type": "SkipLayerGuidanceSD3", "inputs": {"model": ["1", 0], "layers": "1", "scale": 3.0,
                                                                   "start_percent": 0.0, "end_percent": 1.0}}}
    via_k = _pixels(ex, root, {**_base(), **slg, "5": _ksampler(("30", 0))}, "5")
    via_c = _pixels(ex, root, {**_base(), **slg, **_custom(("30", 0), euler)}, "24")
    assert np.array_equal(via_k, via_c) and not np.array_equal(via_c, plain)
    # inpainting: an image's latent with a noise mask over its right half
    masked = {"40": {"class_type": "KSampler", "inputs": {**_ksampler(("1", 0), seed=9)["inputs"]}},
              "41": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
              "42": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}},
              "43": {"class_type": "MaskComposite", "inputs": {"destination": ["41", 0], "source": ["42", 0], "x": 32,
                                                               "y": 0, "operation": "add"}},
              "44": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["40", 0], "mask": ["43", 0]}}}
    via_k = _pixels(ex, root, {**_base(), **masked, "5": _ksampler(("1", 0), latent=("44", 0))}, "5")
    via_c = _pixels(ex, root, {**_base(), **masked, **_custom(("1", 0), euler, latent=("44", 0))}, "24")
    source = _pixels(ex, root, {**_base(), **masked}, "40")
    assert np.array_equal(via_k, via_c)
    left = np.abs(via_c[:, :24].astype(int) - source[:, :24]).mean()
    right = np.abs(via_c[:, 40:].astype(int) - source[:, 40:]).mean()
    assert left < right  # the kept half stays the source's


def test_add_noise_node(executor):
    ex, root = executor
    prompt = {**_base(), "5": _ksampler(("1", 0)),
              "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
              "23": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 4,
                                                                "denoise": 0.5}},
              "25": {"class_type": "AddNoise", "inputs": {"model": ["1", 0], "noise": ["20", 0], "sigmas": ["23", 0],
                                                          "latent_image": ["5", 0]}}}
    result = ex.execute(prompt, prompt_id="n", extra_data={}, execute_outputs=["25"])
    assert result.success, result.error


def test_save_image_websocket_frames(executor):
    """Each image as ComfyUI's PREVIEW_IMAGE frame (event 1, PNG 2) after its progress; never cached."""
    ex, root = executor
    prompt = {**_base(), "5": _ksampler(("1", 0)),
              "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
              "save_image_websocket_node": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["6", 0]}}}
    for run in range(2):
        events: list = []
        result = ex.execute(prompt, prompt_id=f"w{run}", extra_data={},
                            execute_outputs=["save_image_websocket_node"],
                            hooks=lambda e, d: events.append((e, d)))
        assert result.success, result.error
        assert "save_image_websocket_node" in result.executed and "save_image_websocket_node" not in result.outputs
        frames = [d for e, d in events if e == "preview_image"]
        assert len(frames) == 1 and frames[0]["format"] == "PNG" and frames[0]["node"] == "save_image_websocket_node"
        image = Image.open(io.BytesIO(frames[0]["image"]))
        assert image.format == "PNG" and image.size == (64, 64)
        progress = [d for e, d in events if e == "progress" and d["node"] == "save_image_websocket_node"]
        assert progress == [{"value": 0, "max": 1, "prompt_id": f"w{run}", "node": "save_image_websocket_node"}]


@shipped
def test_save_image_websocket_over_ws(tmp_path):
    """ComfyUI's script_examples/websockets_api_example_ws_images.py's loop, over the server's /ws."""
    from fastapi.testclient import TestClient

    from comfy_models import build_models_folder
    from sd35fp8.server import create_app

    models = build_models_folder(tmp_path / "m")
    ckpt = "stable-diffusion-3.5-fp8.safetensors"  # comfy_models' all-in-one file
    prompt = {
        "3": {"class_type": "KSampler", "inputs": {"cfg": 4, "denoise": 1, "latent_image": ["5", 0], "model": ["4", 0],
                                                   "negative": ["7", 0], "positive": ["6", 0], "sampler_name": "euler",
                                                   "scheduler": "normal", "seed": 5, "steps": 2}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"batch_size": 2, "height": 64, "width": 64}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": "a red circle"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "save_image_websocket_node": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}},
    }
    app = create_app(models, tmp_path / "output", device="cpu", serve_frontend=False, allow_hosts=("testserver",))
    with TestClient(app) as client, client.websocket_connect("/ws?clientId=ex") as ws:
        ws.receive_json()
        pid = client.post("/prompt", json={"prompt": prompt, "client_id": "ex"}).json()["prompt_id"]
        images, current = [], ""
        while True:
            m = ws.receive()
            if m.get("text") is not None:
                msg = json.loads(m["text"])
                if msg["type"] == "executing" and msg["data"]["prompt_id"] == pid:
                    if msg["data"]["node"] is None:
                        break
                    current = msg["data"]["node"]
            elif current == "save_image_websocket_node":
                assert struct.unpack(">II", m["bytes"][:8]) == (1, 2)
                images.append(Image.open(io.BytesIO(m["bytes"][8:])))
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert not list((tmp_path / "output").rglob("*.png"))  # nothing saved


def test_primitive_ints_count_in_the_budget():
    """A width or steps linked from a PrimitiveInt (the frontend's Int node) counts as the literal would."""
    prompt = {"1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": ["9", 0], "height": 64, "batch_size": 1}},
              "2": {"class_type": "BasicScheduler", "inputs": {"steps": ["8", 0]}},
              "8": {"class_type": "PrimitiveInt", "inputs": {"value": 30}},
              "9": {"class_type": "PrimitiveInt", "inputs": {"value": 4096}}}
    assert prompt_work(prompt) == 4096 * 64 * 30
    for name, value in (("PrimitiveInt", 7), ("PrimitiveFloat", 0.25), ("PrimitiveBoolean", True)):
        assert node(name)(value) == (value,)


def test_cfg_zero_star_through_ksampler_and_custom(executor):
    """CFGZeroStar's patched MODEL changes the image, the same way through KSampler and SamplerCustomAdvanced."""
    ex, root = executor
    plain = _pixels(ex, root, {**_base(), "5": _ksampler(("1", 0))}, "5")
    patch = {"30": {"class_type": "CFGZeroStar", "inputs": {"model": ["1", 0]}}}
    via_k = _pixels(ex, root, {**_base(), **patch, "5": _ksampler(("30", 0))}, "5")
    euler = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    via_c = _pixels(ex, root, {**_base(), **patch, **_custom(("30", 0), euler)}, "24")
    assert np.array_equal(via_k, via_c) and not np.array_equal(via_k, plain)


def test_dual_cfg_guider_workflow(executor):
    """DualCFGGuider with cond2 = cond1 (regular): neg + (cond - neg) * cfg_cond2_negative, CFGGuider's image at
    that cfg (three passes instead of one batched pair: a level of rounding apart at most); a different cond2
    changes it."""
    ex, root = executor
    m = ("1", 0)
    euler = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    cfg = _custom(m, euler)
    plain = _pixels(ex, root, {**_base(), **cfg}, "24")  # CFGGuider at cfg 4
    dual = {**cfg, "21": {"class_type": "DualCFGGuider", "inputs": {
        "model": ["1", 0], "cond1": ["2", 0], "cond2": ["2", 0], "negative": ["3", 0], "cfg_conds": 7.0,
        "cfg_cond2_negative": 4.0, "style": "regular"}}}
    same = _pixels(ex, root, {**_base(), **dual}, "24")
    assert np.abs(same.astype(int) - plain).max() <= 2
    other = {**_base(), "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a blue square"}},
             **dual}
    other["21"] = {**dual["21"], "inputs": {**dual["21"]["inputs"], "cond2": ["6", 0], "style": "nested"}}
    assert np.abs(_pixels(ex, root, other, "24").astype(int) - plain).max() > 2


def test_sampler_custom_without_noise_seeds_the_sampler(executor):
    """SamplerCustom with add_noise off still hands noise_seed to the sampler (ComfyUI's sample_custom(...,
    seed=noise_seed)): euler_ancestral's per-step noise equals KSamplerAdvanced's with add_noise "disable" and the
    same seed, and another noise_seed changes it."""
    ex, root = executor
    m = ("1", 0)

    def custom(seed: int) -> dict:
        return {
            "30": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}},
            "31": {"class_type": "BasicScheduler", "inputs": {"model": list(m), "scheduler": "normal", "steps": 4,
                                                              "denoise": 1.0}},
            "32": {"class_type": "SamplerCustom", "inputs": {
                "model": list(m), "add_noise": False, "noise_seed": seed, "cfg": 4.0, "positive": ["2", 0],
                "negative": ["3", 0], "sampler": ["30", 0], "sigmas": ["31", 0], "latent_image": ["4", 0]}},
        }

    advanced = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": list(m), "add_noise": "disable", "noise_seed": 11, "steps": 4, "cfg": 4.0,
        "sampler_name": "euler_ancestral", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
        "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    seeded = _pixels(ex, root, {**_base(), **custom(11)}, "32")
    assert np.array_equal(seeded, _pixels(ex, root, {**_base(), "5": advanced}, "5"))
    assert not np.array_equal(seeded, _pixels(ex, root, {**_base(), **custom(12)}, "32"))
