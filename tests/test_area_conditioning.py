"""Area and mask conditioning (ConditioningSetArea / SetAreaPercentage / SetAreaStrength / SetMask; sampling/regions.py
in CFGDenoiser) against ComfyUI's comfy/samplers.py arithmetic, transcribed below on plain dicts as ComfyUI keeps
its conds (resolve_areas_and_cond_masks_multidim, create_cond_with_same_area_if_none, get_area_and_mult,
calc_cond_batch, cfg_function), with a toy velocity model whose output depends on where it is cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfy_models import tiny_checkpoint_folder
from sd35fp8.sampling import CFGDenoiser, FlowMatching
from sd35fp8.workflow.engine import conditioning_of
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS


def toy_model(x, sigma, context, pooled, skip_layers=(), **_):
    """v depends on the text and on the columns it sees (a crop changes it): x's running sum along the width."""
    return x.cumsum(-1) * context.mean(dim=(1, 2))[:, None, None, None] * 0.1 + pooled.mean(1)[:, None, None, None]


def text(value: float, pooled: float = 0.0) -> list:
    return [[torch.full((1, 4, 8), value), {"pooled_output": torch.full((1, 6), pooled)}]]


def node(name, *args):
    cls = NODE_CLASS_MAPPINGS[name]
    return getattr(cls(None), cls.FUNCTION)(*args)[0]


# ---- ComfyUI, transcribed ------------------------------------------------------------------------------------
def comfy_resolve(c: dict, h: int, w: int) -> dict:
    c = dict(c)
    if "area" in c and c["area"][0] == "percentage":
        a = c["area"][1:]
        c["area"] = (max(1, round(a[0] * h)), max(1, round(a[1] * w)), round(a[2] * h), round(a[3] * w))
    if "mask" in c:
        m = c["mask"]
        if tuple(m.shape[1:]) != (h, w):
            m = F.interpolate(m.unsqueeze(1), size=(h, w), mode="bilinear", align_corners=False).squeeze(1)
        if c.get("set_area_to_bounds", False):
            b = torch.max(torch.abs(m), dim=0).values
            ys, xs = torch.where(b != 0)
            if len(ys) == 0:
                c["area"] = (8, 8, 0, 0)
            else:
                c["area"] = (max(8, int(ys.max() - ys.min() + 1)), max(8, int(xs.max() - xs.min() + 1)),
                             int(ys.min()), int(xs.min()))
        c["mask"] = m
    return c


def comfy_same_area(conds: list, c: dict) -> None:
    if "area" not in c:
        return
    ca = c["area"]
    smallest = None
    for x in conds:
        if "area" in x:
            a = x["area"]
            if ca[2] >= a[2] and ca[3] >= a[3] and a[0] + a[2] >= ca[0] + ca[2] and a[1] + a[3] >= ca[1] + ca[3]:
                if smallest is None or "area" not in smallest or smallest["area"][0] * smallest["area"][1] > a[0] * a[1]:
                    smallest = x
        elif smallest is None:
            smallest = x
    if smallest is None or ("area" in smallest and smallest["area"] == ca):
        return
    out = dict(c)
    out["text"] = smallest["text"]
    conds.append(out)


def comfy_area_and_mult(c: dict, x: torch.Tensor):
    B, C, H, W = x.shape
    area = None if "area" not in c else list(c["area"])
    inp = x
    if area is not None:
        for i, full in enumerate((H, W)):
            area[i] = min(full - area[2 + i], area[i])
            inp = inp.narrow(i + 2, area[2 + i], area[i])
    if "mask" in c:
        m = c["mask"][:B]
        if area is not None:
            for i in range(2):
                m = m.narrow(i + 1, area[2 + i], area[i])
        m = m * c.get("mask_strength", 1.0)
        mask = m.unsqueeze(1).repeat(B // m.shape[0], C, 1, 1)
    else:
        mask = torch.ones_like(inp)
    mult = mask * c.get("strength", 1.0)
    if "mask" not in c and area is not None:
        for i, full in enumerate((H, W)):
            rr = min(8, mult.shape[2 + i] // 4)
            if area[2 + i] != 0:
                for t in range(rr):
                    mult.narrow(i + 2, t, 1).mul_((1.0 / rr) * (t + 1))
            if area[i] + area[2 + i] < full:
                for t in range(rr):
                    mult.narrow(i + 2, area[i] - 1 - t, 1).mul_((1.0 / rr) * (t + 1))
    return inp, mult, (area or [H, W, 0, 0])


def comfy_denoised(conds: list, x, sigma, ms) -> torch.Tensor:
    out, count = torch.zeros_like(x), torch.ones_like(x) * 1e-37
    for c in conds:
        inp, mult, (h, w, y, x0) = comfy_area_and_mult(c, x)
        ctx, pooled = c["text"]
        pad = (0, inp.shape[-1] % 2, 0, inp.shape[-2] % 2)
        v = toy_model(F.pad(inp, pad, mode="circular"), sigma, ctx.expand(x.shape[0], -1, -1),
                      pooled.expand(x.shape[0], -1))[..., :inp.shape[-2], :inp.shape[-1]]
        pred = inp - v * sigma.reshape(-1, 1, 1, 1)
        out[:, :, y:y + h, x0:x0 + w] += pred * mult
        count[:, :, y:y + h, x0:x0 + w] += mult
    return out / count


def comfy_cfg(pos: list, neg: list, x, sigma, cfg) -> torch.Tensor:
    h, w = x.shape[-2:]
    dicts = []
    for conditioning in (pos, neg):
        side = []
        for cond, extra in conditioning:
            d = {k: v for k, v in extra.items() if k in ("area", "mask", "mask_strength", "strength",
                                                          "set_area_to_bounds")}
            d["text"] = (cond, extra["pooled_output"])
            side.append(comfy_resolve(d, h, w))
        dicts.append(side)
    for k in range(2):
        for c in list(dicts[k]):
            comfy_same_area(dicts[1 - k], c)
    ms = FlowMatching(3.0)
    c, u = comfy_denoised(dicts[0], x, sigma, ms), comfy_denoised(dicts[1], x, sigma, ms)
    return u + (c - u) * cfg


CASES = {
    "two areas": lambda: (node("ConditioningCombine", node("ConditioningSetArea", text(1.0, 0.5), 64, 128, 0, 0, 1.0),
                                node("ConditioningSetArea", text(-1.0, 0.2), 88, 128, 40, 0, 0.7)), text(0.3)),
    "percentage + base": lambda: (node("ConditioningCombine", text(0.5),
                                       node("ConditioningSetAreaPercentage", text(2.0), 0.5, 0.75, 0.5, 0.25, 1.0)),
                                  text(0.1)),
    "mask": lambda: (node("ConditioningCombine", text(0.2),
                          node("ConditioningSetMask", text(1.5), torch.linspace(0, 1, 32 * 40).reshape(32, 40), 0.8,
                               "default")), text(0.0)),
    "mask bounds": lambda: (node("ConditioningSetMask", text(1.5), torch.zeros(1, 64, 64).index_fill_(2, torch.arange(
        8, 40), 1.0), 1.0, "mask bounds"), node("ConditioningSetAreaStrength", text(0.4), 0.5)),
    "area on the negative": lambda: (text(1.0), node("ConditioningSetArea", text(-0.5), 64, 64, 64, 64, 1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_area_conditioning_matches_comfyui(case):
    pos, neg = CASES[case]()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)  # a 128 x 128 px latent, batch 2
    sigma = torch.full((2,), 0.7)
    d = CFGDenoiser(toy_model, conditioning_of(pos, "positive"), conditioning_of(neg, "negative"), cfg=3.0,
                    model_sampling=FlowMatching(3.0))
    got = d(x, sigma)
    want = comfy_cfg(pos, neg, x, sigma, 3.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = CFGDenoiser(toy_model, conditioning_of(text(1.0, 0.5), "p"), conditioning_of(neg[:1], "n"), cfg=3.0)
    assert not torch.allclose(got, plain(x, sigma))


def test_area_outside_the_image_is_refused():
    from sd35fp8.errors import InputError

    pos = node("ConditioningSetArea", text(1.0), 64, 64, 512, 0, 1.0)
    d = CFGDenoiser(toy_model, conditioning_of(pos, "positive"), None, cfg=1.0)
    with pytest.raises(InputError, match="outside"):
        d(torch.zeros(1, 4, 16, 16), torch.full((1,), 0.5))


def test_area_workflow_on_the_shipped_model(tmp_path):
    """Two regional prompts (left / right half) through KSampler on the shipped model; the left half follows its
    own prompt more than the right half does."""
    from sd35fp8.tiny import SHIPPED_CHECKPOINT

    if not SHIPPED_CHECKPOINT.exists():
        pytest.skip("shipped model weights not built")
    from PIL import Image

    from sd35fp8.workflow.executor import PromptExecutor
    from sd35fp8.workflow.folders import ModelFolders

    tiny_checkpoint_folder(tmp_path)
    ex = PromptExecutor(ModelFolders(tmp_path), device="cpu", dtype=torch.float32)

    def run(positive) -> np.ndarray:
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 64, "batch_size": 1}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a blue square"}},
            "7": {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["2", 0], "width": 64, "height": 64,
                                                                  "x": 0, "y": 0, "strength": 1.0}},
            "8": {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["6", 0], "width": 64, "height": 64,
                                                                  "x": 64, "y": 0, "strength": 1.0}},
            "9": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["7", 0], "conditioning_2": ["8", 0]}},
            "5": {"class_type": "KSampler", "inputs": {
                "model": ["1", 0], "seed": 3, "steps": 6, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": positive, "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
            "10": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
        }
        result = ex.execute(prompt, prompt_id="a", extra_data={}, execute_outputs=["11"])
        assert result.success, result.error
        (img,) = result.outputs["11"]["images"]
        return np.asarray(Image.open(tmp_path / "temp" / img["subfolder"] / img["filename"]).convert("RGB")).astype(int)

    regional, red = run(["9", 0]), run(["2", 0])
    assert regional.shape == (64, 128, 3)
    left = np.abs(regional[:, :48] - red[:, :48]).mean()
    right = np.abs(regional[:, 80:] - red[:, 80:]).mean()
    assert left < right


def test_area_with_controlnet_and_odd_crop(tmp_path):
    """An area of odd latent size (72 px = 9 latents: padded to the patch size, as ComfyUI's MMDiT) whose
    conditioning carries the shipped ControlNet: the hint is taken at the crop's size and the step runs."""
    from sd35fp8.tiny import SHIPPED_CHECKPOINT, SHIPPED_CONTROLNET

    if not SHIPPED_CHECKPOINT.exists() or not SHIPPED_CONTROLNET.exists():
        pytest.skip("shipped weights not built")
    import shutil

    from PIL import Image

    from sd35fp8.workflow.executor import PromptExecutor
    from sd35fp8.workflow.folders import ModelFolders

    tiny_checkpoint_folder(tmp_path)
    (tmp_path / "models" / "controlnet").mkdir()
    (tmp_path / "input").mkdir()
    shutil.copy(SHIPPED_CONTROLNET, tmp_path / "models" / "controlnet" / "canny.safetensors")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "input" / "hint.png")
    ex = PromptExecutor(ModelFolders(tmp_path), device="cpu", dtype=torch.float32)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}},
        "7": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "8": {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["9", 0], "negative": ["3", 0], "control_net": ["6", 0], "image": ["7", 0], "strength": 0.8,
            "start_percent": 0.0, "end_percent": 1.0, "vae": ["1", 2]}},
        "9": {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["2", 0], "width": 72, "height": 72,
                                                              "x": 16, "y": 8, "strength": 1.0}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 3, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["8", 0], "negative": ["8", 1], "latent_image": ["4", 0], "denoise": 1.0}},
    }
    result = ex.execute(prompt, prompt_id="c", extra_data={}, execute_outputs=["5"])
    assert result.success, result.error


def test_step_cache_is_off_for_regional_runs():
    """Calls on crops (and on sides) of equal shapes would share one cache stream: the run samples uncached."""
    from sd35fp8 import generation

    pos = node("ConditioningCombine", node("ConditioningSetArea", text(1.0), 64, 128, 0, 0, 1.0),
               node("ConditioningSetArea", text(-1.0), 64, 128, 64, 0, 1.0))
    settings = generation.SampleSettings(steps=4, cfg=3.0, sampler="euler", scheduler="simple", cache_threshold=1.0)
    stats: dict = {}
    latent = torch.zeros(1, 4, 16, 16)
    out = generation.sample(toy_model, conditioning_of(pos, "positive"), conditioning_of(text(0.3), "negative"),
                            latent, settings, seed=1, cache_stats=stats)
    assert out.shape == latent.shape and stats == {}
