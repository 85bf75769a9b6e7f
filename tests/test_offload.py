"""Offload: SequentialOffload / ModelOffload give the plain model's outputs; packing keeps every tensor."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from sd35fp8.checkpoints.fp8_load import _patch_t5_ff
from sd35fp8.fp8 import FP8Linear, Policy, quantize_model
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_
from sd35fp8.offload import (
    ModelOffload,
    PackedWeights,
    SequentialOffload,
    StreamedBlock,
    peak_memory_report,
    stream_t5_blocks,
    use_tiled_decode,
    vae_decode_bytes,
)
from sd35fp8.pipeline import StageStats

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="block streaming needs CUDA")


def _mmdit(seed: int = 0) -> MMDiT:
    model = MMDiT(MMDiTConfig.tiny()).eval()
    init_random_(model, torch.Generator().manual_seed(seed))
    return model


def _inputs(cfg: MMDiTConfig, device="cpu", seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=g)  # [B, 16, h, w]
    sigma = torch.tensor([0.9, 0.3])
    ctx = torch.randn(2, 7, cfg.context_dim, generator=g)  # [B, L, C]
    pooled = torch.randn(2, cfg.pooled_dim, generator=g)
    return [t.to(device) for t in (x, sigma, ctx, pooled)]


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("skip", [(), (1,)])
def test_sequential_matches_plain_model(fp8, skip):
    model = _mmdit()
    if fp8:
        report = quantize_model(model, "weight_only")
        assert report.converted
    ref_model = copy.deepcopy(model)
    x, sigma, ctx, pooled = _inputs(model.config)
    with torch.inference_mode():
        ref = ref_model(x, sigma, ctx, pooled, skip_layers=skip)
        wrapped = SequentialOffload(model, "cpu")
        out = wrapped(x, sigma, ctx, pooled, skip_layers=skip)
        again = wrapped(x, sigma, ctx, pooled, skip_layers=skip)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert wrapped.config is model.config
    if fp8:
        assert any(isinstance(m, FP8Linear) for m in wrapped.modules())  # pipeline.fp8_mode still sees them


def test_streamed_blocks_ignore_module_moves():
    wrapped = SequentialOffload(_mmdit(), "cpu")
    wrapped.double()
    block = wrapped.model.joint_blocks[0]
    assert isinstance(block, StreamedBlock)
    assert block.block.x_block.attn.qkv.weight.dtype == torch.float32  # stays in its pinned home
    assert wrapped.model.x_embedder.proj.weight.dtype == torch.float64  # resident parts follow .to()


def test_packed_weights_round_trip_and_tied_tensors():
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(0)
    t5 = T5EncoderModel(cfg).eval()
    quantize_model(t5, "weight_only", policy=Policy(keep=()))
    _patch_t5_ff(t5)  # T5's FF would cast activations to wo's fp8 dtype otherwise
    ids = torch.randint(0, 64, (2, 9))
    with torch.inference_mode():
        ref = t5(input_ids=ids).last_hidden_state
    before = {k: v.clone() for k, v in t5.state_dict().items()}
    pack = PackedWeights(t5, "t5")
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # still tied
    assert all(torch.equal(before[k], v) for k, v in t5.state_dict().items())
    flat = pack.cpu.clone()  # a "device copy" on the CPU
    pack.swap_in(flat)
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.untyped_storage().data_ptr() == flat.data_ptr()
    with torch.inference_mode():
        assert torch.equal(t5(input_ids=ids).last_hidden_state, ref)
    pack.swap_out()
    assert t5.shared.weight.untyped_storage().data_ptr() == pack.cpu.data_ptr()


def test_t5_blocks_stream_and_model_offload_on_cpu():
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    torch.manual_seed(0)
    t5 = T5EncoderModel(cfg).eval()
    ids = torch.randint(0, 64, (1, 5))
    with torch.inference_mode():
        ref = t5(input_ids=ids).last_hidden_state
        stream_t5_blocks(t5, "cpu")
        offload = ModelOffload("cpu")
        with offload.on_device(t5) as m:
            out = m(input_ids=ids).last_hidden_state
    assert torch.equal(out, ref)


def test_peak_memory_report_and_tiled_decode_rule():
    stats = StageStats(seconds={"encode": 0.1, "sampling": 1.5, "vae_decode": 0.2},
                       peak_bytes={"encode": 2 << 30, "sampling": 9 << 30, "vae_decode": 3 << 30})
    text = peak_memory_report(stats)
    assert "sampling" in text and "9.00" in text and text.splitlines()[-1].split()[1:] == ["1.800", "9.00"]
    assert not use_tiled_decode(1024, 1024)
    assert use_tiled_decode(1536, 1536) and use_tiled_decode(2048, 2048)
    assert 11 < vae_decode_bytes(1536, 1536) / 2**30 < 13  # measured 11.88 GiB on H100
    assert use_tiled_decode(1024, 1024, budget_bytes=1 << 30)


def test_pipeline_decode_policy(monkeypatch):
    """Offload none: full decode while it fits the device's free memory, tiles beyond (CPU: pixel rule);
    offload model/sequential: the 8 GB-card rule."""
    from types import SimpleNamespace

    from sd35fp8 import offload as off
    from sd35fp8.pipeline import TILED_DECODE_PIXELS, SD35Pipeline

    pipe = SimpleNamespace(offload="none", device=torch.device("cpu"), _vae_tiling=False)
    assert off.free_device_bytes(torch.device("cpu")) is None
    side = int(TILED_DECODE_PIXELS ** 0.5)
    assert not SD35Pipeline._tiled_decode(pipe, side, side) and SD35Pipeline._tiled_decode(pipe, side + 16, side)
    monkeypatch.setattr(off, "free_device_bytes", lambda device: 3 << 30)  # a card with 3 GiB free
    assert not SD35Pipeline._tiled_decode(pipe, 1024, 1024)  # ~2.5 GiB fits
    assert SD35Pipeline._tiled_decode(pipe, 1024, 1024, batch=2) and SD35Pipeline._tiled_decode(pipe, 1280, 1280)
    pipe.offload = "sequential"  # resident adaLN/embedders + a full decode within the 8 GB card's budget
    pipe.mmdit = SimpleNamespace(weight_bytes=lambda: {"resident": int(2.6 * (1 << 30))})  # Large FP8, streamed
    assert not SD35Pipeline._tiled_decode(pipe, 768, 768) and SD35Pipeline._tiled_decode(pipe, 1024, 1024)
    pipe.offload = "model"  # the resident MMDiT plus a full decode within the 12 GB card's budget
    pipe.mmdit = SimpleNamespace(weight_bytes=lambda: {"resident": 1 << 30})
    assert not SD35Pipeline._tiled_decode(pipe, 1280, 1280) and SD35Pipeline._tiled_decode(pipe, 2048, 2048)
    pipe.mmdit = SimpleNamespace(weight_bytes=lambda: {"resident": int(7.6 * (1 << 30))})  # Large FP8
    assert SD35Pipeline._tiled_decode(pipe, 1024, 1024) and not SD35Pipeline._tiled_decode(pipe, 512, 512)


@needs_cuda
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_cuda_streaming_matches_resident(prefetch):
    model = _mmdit()
    quantize_model(model, "weight_only")
    ref_model = copy.deepcopy(model).cuda()
    x, sigma, ctx, pooled = _inputs(model.config, "cuda")
    with torch.inference_mode():
        ref = ref_model(x, sigma, ctx, pooled)
        wrapped = SequentialOffload(model, "cuda", prefetch=prefetch)
        outs = [wrapped(x, sigma, ctx, pooled, skip_layers=s) for s in ((), (1,), ())]
        ref_skip = ref_model(x, sigma, ctx, pooled, skip_layers=(1,))
    torch.testing.assert_close(outs[0], ref, rtol=0, atol=0)
    torch.testing.assert_close(outs[1], ref_skip, rtol=0, atol=0)
    torch.testing.assert_close(outs[2], ref, rtol=0, atol=0)
    assert wrapped.streamer.device_bytes() == (prefetch + 1) * wrapped.streamer.block_bytes()
    assert wrapped.streamer.packs[0].cpu.is_pinned()


@needs_cuda
def test_cuda_model_offload_frees_memory():
    model = _mmdit().cuda()
    x, sigma, ctx, pooled = _inputs(model.config, "cuda")
    with torch.inference_mode():
        ref = model(x, sigma, ctx, pooled)
        offload = ModelOffload("cuda")
        offload.register(model)  # moves it to pinned CPU memory
        base = torch.cuda.memory_allocated()
        with offload.on_device(model) as m:
            assert torch.cuda.memory_allocated() > base
            out = m(x, sigma, ctx, pooled)
        assert torch.cuda.memory_allocated() <= base + out.numel() * out.element_size()
    # same values, new addresses: cuDNN may pick another (TF32) conv algorithm for x_embedder (H100: 9e-4)
    torch.testing.assert_close(out, ref, rtol=3e-3, atol=3e-3)


def test_token_embeddings_on_cpu_same_output_and_tied():
    """keep_token_embeddings_on_cpu: T5's tied token table becomes one CPU lookup, outputs unchanged,
    the table stays on the CPU through .to(); small (position) tables are left alone."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd35fp8.offload import CPUTokenEmbedding, keep_token_embeddings_on_cpu

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=12000, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77)).eval()
    ids = torch.randint(0, 11000, (2, 77))
    with torch.no_grad():
        ref_t5, ref_clip = t5(ids).last_hidden_state, clip(ids).last_hidden_state
        assert keep_token_embeddings_on_cpu(t5) == 0 and keep_token_embeddings_on_cpu(clip) == 0  # CPU: nothing freed
        assert isinstance(t5.shared, CPUTokenEmbedding) and t5.encoder.embed_tokens is t5.shared
        assert isinstance(clip.get_input_embeddings(), CPUTokenEmbedding)
        assert type(dict(clip.named_modules())["embeddings.position_embedding"]) is torch.nn.Embedding
        assert torch.equal(t5(ids).last_hidden_state, ref_t5) and torch.equal(clip(ids).last_hidden_state, ref_clip)
        t5.to(torch.float64)
        assert t5.shared.table.dtype == torch.float32 and t5.shared.table.device.type == "cpu"
