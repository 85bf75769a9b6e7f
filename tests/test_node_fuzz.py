"""Every node that needs no model, called with widget values drawn across (and at the ends of) its declared
ranges and with small synthetic IMAGE / MASK / LATENT / SIGMAS / CONDITIONING inputs: it returns its declared
outputs or raises InputError, never another exception (which the server would report as a crash of the node)."""

from __future__ import annotations

import random

import pytest
import torch

from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.node_base import NodeContext
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS
from sd35fp8.workflow.nodes_sampling import Noise, Sampler

NEEDS_MODELS = {"MODEL", "CLIP", "VAE", "CONTROL_NET", "UPSCALE_MODEL", "GUIDER"}
SKIP = {"LoadImage", "LoadImageMask", "SaveImage", "PreviewImage", "SaveImageWebsocket"}  # files: tested elsewhere


def synthetic(kind: str, rng: random.Random):
    if "," in kind:  # a union (ComfyMathExpression's values.*: "FLOAT,INT,BOOLEAN"): one of its types
        return synthetic(rng.choice(kind.split(",")).strip(), rng)
    if kind == "IMAGECOMPARE":  # ImageCompare's slider widget: the frontend's, its value unused
        return None
    h, w = rng.choice([(64, 64), (48, 80), (8, 8)])
    if kind == "IMAGE":
        return torch.rand(rng.choice([1, 2]), h, w, rng.choice([3, 3, 4]))
    if kind == "MASK":
        return torch.rand(rng.choice([1, 2]), h, w)
    if kind == "LATENT":
        lat = {"samples": torch.randn(rng.choice([1, 2]), 16, h // 8, w // 8)}
        if rng.random() < 0.3:
            lat["noise_mask"] = torch.rand(1, 1, h, w)
        if rng.random() < 0.3:
            lat["batch_index"] = [rng.randrange(5) for _ in range(lat["samples"].shape[0])]
        return lat
    if kind == "SIGMAS":
        return rng.choice([torch.linspace(1, 0, rng.randrange(1, 12)), torch.FloatTensor([]), torch.tensor([0.5])])
    if kind == "CONDITIONING":
        return [[torch.randn(1, rng.choice([77, 154]), 32), {"pooled_output": torch.randn(1, 16)}]]
    if kind == "NOISE":
        return Noise(rng.choice([None, 3]))
    if kind == "SAMPLER":
        return Sampler("euler")
    if kind == "FLOAT":
        return rng.uniform(-2, 2)
    if kind == "INT":
        return rng.randrange(-3, 100)
    if kind == "STRING":
        return rng.choice(["", "1, 0.5", "a" * 50])
    if kind == "BOOLEAN":
        return rng.random() < 0.5
    if kind == "LATENT_OPERATION":
        from sd35fp8.workflow.nodes_latent_ops import Sharpen, TonemapReinhard

        return rng.choice([TonemapReinhard(1.0), Sharpen(2, 1.0, 0.1)])
    if kind == "*":  # PreviewAny's source: anything
        return rng.choice([torch.rand(2, 3), {"a": 1}, "x", 3, None])
    raise KeyError(kind)


def widget(spec, rng: random.Random):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return rng.choice(kind) if kind else ""
    if kind in ("INT", "FLOAT"):
        lo, hi = opts.get("min", -1000), opts.get("max", 1000)
        lo, hi = max(lo, -1e4), min(hi, 4096 if kind == "INT" else 1e4)  # the ends of huge ranges: bounded below
        pick = rng.choice([lo, hi, opts.get("default", lo), rng.uniform(lo, hi)])
        return int(pick) if kind == "INT" else float(pick)
    if kind == "BOOLEAN":
        return rng.random() < 0.5
    if kind == "STRING":
        return rng.choice([opts.get("default", ""), "", "1..2, x", "0.9 0.1"])
    return None


CANDIDATES = sorted(
    name for name, cls in NODE_CLASS_MAPPINGS.items()
    if name not in SKIP and not (
        {spec[0] for spec in {**cls.INPUT_TYPES(None).get("required", {}),
                              **cls.INPUT_TYPES(None).get("optional", {})}.values()
         if isinstance(spec[0], str)} & NEEDS_MODELS))


@pytest.mark.parametrize("name", CANDIDATES)
def test_node_raises_only_input_errors(name, tmp_path):
    cls = NODE_CLASS_MAPPINGS[name]
    spec = {**cls.INPUT_TYPES(None).get("required", {}), **cls.INPUT_TYPES(None).get("optional", {})}
    ctx = NodeContext(folders=ModelFolders(tmp_path))
    rng = random.Random(name)
    for _ in range(12):
        kwargs = {}
        for key, s in spec.items():
            kwargs[key] = widget(s, rng) if not isinstance(s[0], str) or s[0] in (
                "INT", "FLOAT", "BOOLEAN", "STRING") else synthetic(s[0], rng)
        try:
            out = getattr(cls(ctx), cls.FUNCTION)(**kwargs)
        except (InputError, CheckpointError):
            continue
        if isinstance(out, dict):
            out = out.get("result", ())
        assert len(out) == len(cls.RETURN_TYPES), (name, kwargs)
