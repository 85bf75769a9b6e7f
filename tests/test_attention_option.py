"""The engine's attention option (build_engine(attention=...), --attention): auto / fp8 / bf16 resolve as
documented, "fp8" runs on the CPU through the kernel's torch emulation and stays close to the float32
attention, and the flags reach the pipeline, executor and CLI. The Triton kernel against the same
emulation is checked on the GPU in tests/test_attention_triton.py."""

from __future__ import annotations

import pytest
import torch

from sd35fp8.cli import build_parser
from sd35fp8.errors import InputError
from sd35fp8.fast import build_engine
from sd35fp8.fast.attention import attend
from sd35fp8.fast.attention_triton import fp8_attention_emulated
from sd35fp8.fast.engine import attention_kind
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_
from sd35fp8.pipeline import SD35Pipeline
from sd35fp8.workflow.executor import PromptExecutor


def _mmdit():
    cfg = MMDiTConfig(depth=2, hidden_size=128, num_heads=2, pos_embed_max_size=16, context_dim=32, pooled_dim=48,
                      qk_norm=True)
    return init_random_(MMDiT(cfg).eval(), torch.Generator().manual_seed(0))


def test_choices_on_cpu():
    cpu = torch.device("cpu")
    assert attention_kind("auto", cpu, "dynamic") is None  # torch's SDPA choice on the CPU
    assert attention_kind("bf16", cpu, None) is None
    assert attention_kind("fp8", cpu, None) == "fp8_emulated"
    with pytest.raises(InputError, match="unknown attention"):
        attention_kind("fp4", cpu, None)


def test_emulated_kind_is_the_spec():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 70, 2, 64, generator=g) for _ in range(3))  # [B, L, H, D]
    out = attend(q, k, v, "fp8_emulated")
    assert torch.equal(out, fp8_attention_emulated(q, k, v))
    ref = attend(q.double(), k.double(), v.double(), "sdpa").float()
    assert sqnr(ref, out) > 22.0  # e4m3 q, k, v and P: ~25 dB on randn (attention_triton docstring)


def test_fp8_engine_runs_on_cpu_close_to_bf16_engine():
    """The whole step with emulated FP8 attention vs SDPA, same weights and inputs: close, not equal."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 8, 8, generator=g)
    ctx, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 48, generator=g)
    sigma = torch.full((2,), 0.6)
    ref = build_engine(_mmdit(), "cpu", attention="bf16")
    fp8 = build_engine(_mmdit(), "cpu", attention="fp8")
    assert fp8.attention_backend == "fp8_emulated" and "fp8_emulated" in fp8.describe()
    a, b = ref(x, sigma, ctx, pooled), fp8(x, sigma, ctx, pooled)
    assert not torch.equal(a, b)
    assert sqnr(a, b) > 20.0


def test_flags_reach_pipeline_executor_and_cli(tiny_random_checkpoint, tmp_path):
    path, _ = tiny_random_checkpoint
    pipe = SD35Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32, attention="fp8")
    assert pipe.mmdit.attention_backend == "fp8_emulated"
    out = pipe("a red circle", num_inference_steps=2, width=32, height=32, progress=False)
    assert torch.isfinite(out.latents).all()
    from sd35fp8.workflow.folders import ModelFolders

    ex = PromptExecutor(ModelFolders(tmp_path), device="cpu", attention="bf16", cache_threshold=0.2)
    assert ex.engine_options.attention == "bf16" and ex.engine_options.cache_threshold == 0.2
    with pytest.raises(InputError):
        PromptExecutor(ModelFolders(tmp_path), device="cpu", attention="int4")
    p = build_parser()
    for cmd in (["generate", "x"], ["run", "w.json"], ["serve"]):
        args = p.parse_args(cmd + ["--attention", "fp8", "--cache-threshold", "0.2"])
        assert args.attention == "fp8" and args.cache_threshold == 0.2
        assert p.parse_args(cmd).cache_threshold == 0.0 and p.parse_args(cmd).attention == "auto"
    from sd35fp8.step_cache import DEFAULT_CACHE_THRESHOLD

    assert p.parse_args(["generate", "x", "--cache-threshold"]).cache_threshold == DEFAULT_CACHE_THRESHOLD > 0
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "x", "--cache-threshold", "-1"])
