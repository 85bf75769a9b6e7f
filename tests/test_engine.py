"""build_engine (fast/engine.py): the one way the MMDiT runs, against the plain MMDiT forward.

CPU: the engine's eager fused path (torch ops) in float32 equals MMDiT.forward tightly; over FP8
weights it runs the FP8Linear math (SQNR bars as in test_fast.py / test_fp8_engine.py); sequential
and model offload give the same outputs. GPU (skips without CUDA): the fused path's stated
tolerance (fast/engine.py docstring) and CUDA-graph replay equal to the eager fused step.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from torch import nn

from sd35fp8.errors import InputError
from sd35fp8.fast import MMDiTEngine, build_engine, default_compile, fp8_mode_of
from sd35fp8.fp8 import FP8Linear, Policy, quantize_model
from sd35fp8.fp8 import device as fp8_device
from sd35fp8.fp8.quantize import apply_static_scales, collect_activation_amax
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

CUDA = torch.cuda.is_available()
TINY_X = MMDiTConfig.tiny()  # MMDiT-X (attn2 in block 0)
TINY = dataclasses.replace(TINY_X, depth=3, x_block_self_attn_layers=())


def _model(cfg: MMDiTConfig = TINY_X, seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    return init_random_(MMDiT(cfg), torch.Generator().manual_seed(seed)).eval().requires_grad_(False)


def _inputs(cfg: MMDiTConfig = TINY_X, seed: int = 1, batch: int = 2, ctx_len: int = 21, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    args = (torch.randn(batch, cfg.in_channels, 16, 12, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, ctx_len, cfg.context_dim, generator=g), torch.randn(batch, cfg.pooled_dim, generator=g))
    return tuple(a.to(device) for a in args)


@pytest.mark.parametrize("cfg", [TINY_X, TINY], ids=["mmdit-x", "mmdit"])
@pytest.mark.parametrize("offload", ["none", "model", "sequential"])
def test_float32_engine_equals_mmdit_forward(cfg, offload):
    model = _model(cfg)
    args = _inputs(cfg)
    with torch.no_grad():
        ref = model(*args)
        ref_skip = model(*args, skip_layers=(1,))
        engine = build_engine(model, "cpu", offload=offload)
        assert isinstance(engine, MMDiTEngine) and engine.model is model and engine.config is model.config
        assert engine.fp8_mode is None and engine.graphs is None and engine.offload == offload
        out, out_skip = engine(*args), engine(*args, skip_layers=(1,))
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (out - ref).abs().max()
    assert torch.allclose(out_skip, ref_skip, rtol=1e-4, atol=1e-5)
    assert ("offload=sequential" in engine.describe()) == (offload == "sequential")


@pytest.mark.parametrize("mode", ["weight_only", "dynamic"])
def test_fp8_mode_is_read_from_the_weights(mode):
    model = _model()
    args = _inputs()
    with torch.no_grad():
        ref32 = model(*args)
        quantize_model(model, mode)
        ref8 = model(*args)
        engine = build_engine(model, "cpu")
        out = engine(*args)
    assert engine.fp8_mode == mode == fp8_mode_of(model)
    assert sqnr(ref8, out) > 40  # the FP8Linear math, fused
    assert sqnr(ref32, out) > 25


def test_static_weights_run_static():
    model = _model()
    args = _inputs()
    with torch.no_grad():
        ref32 = model(*args)
        quantize_model(model, "dynamic")
        amax = collect_activation_amax(model, lambda m: m(*args))
        apply_static_scales(model, amax)
        ref8 = model(*args)
        engine = build_engine(model, "cpu")
        out = engine(*args)
    assert engine.fp8_mode == "static"
    assert sqnr(ref8, out) > 30 and sqnr(ref32, out) > 18


@pytest.mark.parametrize("keep_ada", [False, True])
def test_policy_kept_layers_stay_high_precision(keep_ada):
    """A joint-block linear a policy kept 16-bit runs 16-bit in the engine (no wrap-time quantising).
    A mixed adaLN group (some kept) runs 16-bit as a whole: more precise than the reference there."""
    model = _model(TINY)
    args = _inputs(TINY)
    keep = ("joint_blocks.1.x_block.mlp.*",) + (("joint_blocks.*.context_block.adaLN_modulation.*",) if keep_ada else ())
    with torch.no_grad():
        ref32 = model(*args)
        quantize_model(model, "dynamic", policy=Policy(keep=keep))
        ref = model(*args)
        engine = build_engine(model, "cpu")
        out = engine(*args)
    assert engine.fp8_mode == "dynamic"
    assert engine.blocks[1]["x.fc1.mode"] == "bf16" and "x.fc1.mode" not in engine.blocks[0]
    assert engine.ada_mode == (None if keep_ada else "dynamic")
    # The FP8Linear modules and the engine run the same fp8 GEMM with the same per-token / per-channel
    # scales: rowwise _scaled_mm (CPU torch >= 2.13), or without it (CPU torch 2.11/2.12) both the scale-1
    # GEMM of fp8.device.fp8_gemm_fp32 with the scales applied after. Measured on torch 2.11 and 2.13:
    # bit-equal (keep_ada=False), 35 dB (keep_ada=True: a 16-bit adaLN group, more precise in the engine).
    assert sqnr(ref, out) > (30 if keep_ada else 40)
    assert sqnr(ref32, out) > sqnr(ref32, ref) - 0.5


def test_matmul_mode_without_fp8_matmul_falls_back_with_warning(monkeypatch, caplog):
    model = _model()
    with torch.no_grad():
        quantize_model(model, "dynamic")
    fp8_device.clear_support_cache()
    monkeypatch.setattr(fp8_device, "fp8_support",
                        lambda dev: fp8_device.FP8Support(str(dev), False, False, "test: no fp8 matmul"))
    with caplog.at_level(logging.WARNING):
        engine = build_engine(model, "cpu")
    assert engine.fp8_mode == "weight_only" and "weight_only" in caplog.text
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, FP8Linear):
            m.set_mode("weight_only")
    args = _inputs()
    with torch.no_grad():
        assert sqnr(ref(*args), engine(*args)) > 40


def test_offload_modes_give_the_same_outputs_on_cpu():
    base = _model()
    with torch.no_grad():
        quantize_model(base, "dynamic")
    args = _inputs()
    outs = {}
    with torch.no_grad():
        for offload in ("none", "model", "sequential"):
            engine = build_engine(copy.deepcopy(base), "cpu", offload=offload)
            outs[offload] = engine(*args)
    assert torch.equal(outs["none"], outs["model"]) and torch.equal(outs["none"], outs["sequential"])
    assert engine.streamer is not None and len(engine.packs) == TINY_X.depth
    wb = engine.weight_bytes()
    assert wb["blocks"] > 0 and wb["resident"] == wb["adaln"] + wb["other"] < wb["total"]


def test_sequential_packs_hold_the_model_weights_once():
    model = _model(TINY)
    with torch.no_grad():
        quantize_model(model, "dynamic")
    engine = build_engine(model, "cpu", offload="sequential")
    qkv = model.joint_blocks[0].x_block.attn.qkv.weight
    pack = engine.packs[0]
    assert qkv.untyped_storage().data_ptr() == pack.cpu.untyped_storage().data_ptr()
    assert engine.blocks[0]["x.qkv.w"].data_ptr() == qkv.data_ptr()


def test_warmup_and_defaults_on_cpu():
    engine = build_engine(_model(), "cpu")
    assert engine.warmup([(64, 48, 1)]) == 0.0  # nothing to compile or capture on the CPU
    x, sigma, ctx, pooled = engine.warmup_inputs(64, 48, 2)
    assert x.shape == (2, 16, 6, 8) and ctx.shape[1] == 154 and sigma.dtype == torch.float32
    with pytest.raises(InputError):
        engine.warmup_inputs(60, 48, 1)
    assert not default_compile("cpu", serving=True)
    assert not default_compile("cpu")
    with pytest.raises(InputError):
        build_engine(engine, "cpu")
    with pytest.raises(InputError):
        build_engine(_model(), "cpu", offload="disk")


def test_not_an_mmdit():
    with pytest.raises(InputError):
        fp8_mode_of(nn.Linear(4, 4))


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.skipif(not CUDA, reason="the fused GPU path needs CUDA")
@pytest.mark.parametrize("mode", [None, "weight_only", "dynamic"])
def test_gpu_fused_path_tolerance(mode):
    """The stated tolerance (fast/engine.py): fused FP8 step vs float32 MMDiT forward over the same
    weights >= 25 dB (dynamic/static), >= 35 dB (weight_only, 16-bit); graph replay == eager fused."""
    model = _model(TINY_X)
    args = _inputs(TINY_X, device="cuda")
    with torch.no_grad():
        ref32 = model.to("cuda")(*args)
        m = copy.deepcopy(model).to(torch.bfloat16)
        if mode is not None:
            quantize_model(m, mode)
        eager = build_engine(copy.deepcopy(m), "cuda", cuda_graphs=False)(*args)
        engine = build_engine(m, "cuda")
        assert engine.graphs is not None
        out = engine(*args)
        again = engine(*args)
    assert sqnr(ref32, out.float()) > (25 if mode == "dynamic" else 35)
    assert torch.equal(out, again) and torch.equal(out, eager)
    assert engine.warmup([(96, 128, 1)]) > 0


def test_executor_warmup_loads_once_and_runs_the_workflow(tiny_random_checkpoint, tmp_path):
    """PromptExecutor.warmup (server start-up): loads the workflow's models into the cache, warms the engine,
    encoders and VAE; the queued prompt then reuses the loaded checkpoint and gives the same image."""
    import json
    import shutil
    from pathlib import Path

    from sd35fp8.workflow.executor import PromptExecutor
    from sd35fp8.workflow.folders import ModelFolders

    path, _ = tiny_random_checkpoint
    ckpts = tmp_path / "models" / "checkpoints"
    ckpts.mkdir(parents=True)
    prompt = json.loads((Path(__file__).parent / "data" / "seed-fp8-allinone.json").read_text())
    shutil.copyfile(path, ckpts / prompt["4"]["inputs"]["ckpt_name"])
    shutil.copyfile(path.parent / "spiece.model", ckpts / "spiece.model")
    prompt["5"]["inputs"].update(width=32, height=32)
    prompt["3"]["inputs"]["steps"] = 2
    folders = ModelFolders(tmp_path / "models", output_dir=tmp_path / "out")
    ex = PromptExecutor(folders, device="cpu", compile=None, offload="none")
    assert ex.compile is False and ex.engine_options.offload == "none"
    assert ex.warmup(prompt) > 0
    result = ex.execute(prompt, prompt_id="p1")
    assert result.success and "4" in result.cached  # the checkpoint loaded at warm-up
    cold = PromptExecutor(folders, device="cpu").execute(prompt, prompt_id="p2")
    a, b = (sorted((tmp_path / "out").glob("*.png")))[:2]
    from PIL import Image

    assert cold.success and np_equal(Image.open(a), Image.open(b))
    with pytest.raises(InputError):
        PromptExecutor(folders, device="cpu", offload="disk")


def np_equal(a, b) -> bool:
    import numpy as np

    return bool((np.asarray(a) == np.asarray(b)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", [None, "weight_only", "dynamic"])
def test_rows_alone_equal_rows_batched_on_cpu(mode, dtype):
    """Cross-prompt batching (workflow/batch.py): a batch of 3 different rows gives, row for row, bit for bit
    what each row gives alone (batch 1) and as its own CFG pair (batch 2), through the engine and the plain
    MMDiT: conditioning row by row (per_row), patch embedding image by image (per_image)."""
    model = _model(TINY_X).to(dtype)
    if mode is not None:
        quantize_model(model, mode)
    x, sigma, context, pooled = (a.to(dtype) if a.is_floating_point() and a.ndim > 1 else a
                                 for a in _inputs(TINY_X, batch=3))
    with torch.no_grad():
        engine = build_engine(model, "cpu")
        for name, run in (("engine", engine), ("plain", model)):
            batched = run(x, sigma, context, pooled)
            for i in range(3):
                alone = run(x[i:i + 1], sigma[i:i + 1], context[i:i + 1], pooled[i:i + 1])
                assert torch.equal(batched[i:i + 1], alone), (name, i, (batched[i:i + 1] - alone).abs().max())
                pair = [i, (i + 1) % 3]
                assert torch.equal(run(x[pair], sigma[pair], context[pair], pooled[pair])[:1], alone), (name, i)
