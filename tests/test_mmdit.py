"""MMDiT / MMDiT-X against diffusers' SD3Transformer2DModel (float32, random weights, tiny configs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd35fp8.checkpoints.diffusers_mmdit import apply_op, mmdit_plan_from_diffusers
from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig

from mmdit_cases import CONFIGS, build, inputs  # noqa: F401 (re-exported for older imports)

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402


def original_state_dict(model: MMDiT) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def diffusers_model(cfg: MMDiTConfig, sd: dict[str, torch.Tensor]) -> SD3Transformer2DModel:
    ref = SD3Transformer2DModel(
        sample_size=cfg.pos_embed_max_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
        num_layers=cfg.depth, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.pooled_dim,
        out_channels=cfg.out_channels, pos_embed_max_size=cfg.pos_embed_max_size,
        dual_attention_layers=cfg.x_block_self_attn_layers, qk_norm="rms_norm" if cfg.qk_norm else None,
    )
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(sd))  # it pops from its argument
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def rel_max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    model = build(cfg)
    ref = diffusers_model(cfg, original_state_dict(model))
    with torch.no_grad():
        for h, w in [(8, 8), (8, 12), (12, 6)]:  # 64x64, 96x64, 48x96 px; crops off-centre on an 8x8 table
            x, sigma, context, pooled = inputs(cfg, h, w)
            out = model(x, sigma, context, pooled)
            expect = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                         timestep=sigma * 1000, return_dict=False)[0]  # diffusers takes t = sigma*1000
            assert out.shape == x.shape and out.dtype == x.dtype
            assert expect.abs().max() > 0.1  # the random net gives O(1) outputs
            assert rel_max_err(out, expect) <= 1e-4, (name, h, w)
        # skip-layer guidance: both skip the whole joint block
        x, sigma, context, pooled = inputs(cfg, 8, 12)
        out = model(x, sigma, context, pooled, skip_layers=[1])
        expect = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                     timestep=sigma * 1000, skip_layers=[1], return_dict=False)[0]
        assert rel_max_err(out, expect) <= 1e-4


def test_skip_layers_change_output_only_when_given() -> None:
    cfg = CONFIGS["mmditx"]
    model = build(cfg)
    x, sigma, context, pooled = inputs(cfg, 8, 8)
    with torch.no_grad():
        base = model(x, sigma, context, pooled)
        assert torch.equal(base, model(x, sigma, context, pooled, skip_layers=()))
        for layers in ([0], [1], [2], [0, 2]):
            assert (model(x, sigma, context, pooled, skip_layers=layers) - base).abs().max() > 1e-3, layers
    with pytest.raises(InputError, match="skip_layers"):
        model(x, sigma, context, pooled, skip_layers=[3])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_from_state_dict(name: str) -> None:
    cfg = CONFIGS[name]
    sd = original_state_dict(build(cfg))
    assert MMDiTConfig.from_state_dict({k: v.shape for k, v in sd.items()}) == cfg


def test_config_errors_and_presets() -> None:
    sd = original_state_dict(build(CONFIGS["mmdit"]))
    shapes = {k: v.shape for k, v in sd.items() if k != "context_embedder.weight"}
    with pytest.raises(CheckpointError, match="context_embedder.weight"):
        MMDiTConfig.from_state_dict(shapes)
    shapes = {k: v.shape for k, v in sd.items() if not k.startswith("joint_blocks.1.")}
    with pytest.raises(CheckpointError, match="joint blocks"):
        MMDiTConfig.from_state_dict(shapes)
    large, medium = MMDiTConfig.large(), MMDiTConfig.medium()
    assert "8.06 B" in large.describe() and "2.24 B" in medium.describe()
    assert medium.x_block_self_attn_layers == tuple(range(13)) and large.x_block_self_attn_layers == ()
    for cfg in (large, medium, MMDiTConfig.tiny()):
        with torch.device("meta"):
            m = MMDiT(cfg)
        assert sum(p.numel() for p in m.state_dict().values()) == cfg.num_params()


@pytest.mark.parametrize("name", ["mmdit", "mmditx"])
def test_meta_build_and_keys(name: str) -> None:
    cfg = CONFIGS[name]
    sd = original_state_dict(build(cfg))
    with torch.device("meta"):
        model = MMDiT(cfg)
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict(sd, strict=True, assign=True)
    assert all(not t.is_meta for t in model.state_dict().values())
    # every weight matrix lives in a plain nn.Linear (the FP8 pass swaps them); only the patchify is a conv
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if type(m) is nn.Linear}
    matrices = {k for k, v in sd.items() if v.ndim == 2 and k != "pos_embed"}
    assert linear_weights == matrices
    assert f"joint_blocks.{cfg.depth - 1}.context_block.attn.proj.weight" not in sd  # pre-only
    assert sd[f"joint_blocks.{cfg.depth - 1}.context_block.adaLN_modulation.1.weight"].shape[0] == 2 * cfg.hidden_size


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_plan_round_trip(name: str) -> None:
    sd = original_state_dict(build(CONFIGS[name]))
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(sd))
    plan = mmdit_plan_from_diffusers(converted.keys())
    assert set(plan) == set(sd)
    assert sorted(src for sources, _ in plan.values() for src in sources) == sorted(converted)
    for key, (sources, op) in plan.items():
        rebuilt = apply_op(op, [converted[s] for s in sources])
        assert torch.equal(rebuilt, sd[key]), key
    ops = {key: op for key, (_, op) in plan.items()}
    assert ops["final_layer.adaLN_modulation.1.weight"] == "swap_halves"
    last = CONFIGS[name].depth - 1
    assert ops[f"joint_blocks.{last}.context_block.adaLN_modulation.1.bias"] == "swap_halves"
    assert ops["joint_blocks.0.context_block.adaLN_modulation.1.bias"] == "copy"


def test_diffusers_plan_errors() -> None:
    converted = convert_sd3_transformer_checkpoint_to_diffusers(original_state_dict(build(CONFIGS["mmditx"])))
    with pytest.raises(CheckpointError, match="transformer_blocks.0.attn.lora_A.weight") as info:
        mmdit_plan_from_diffusers([*converted, "transformer_blocks.0.attn.lora_A.weight", "foo"])
    assert info.value.keys == ["foo", "transformer_blocks.0.attn.lora_A.weight"]
    with pytest.raises(CheckpointError, match="joint_blocks.1.x_block.attn.qkv.weight"):
        mmdit_plan_from_diffusers([k for k in converted if k != "transformer_blocks.1.attn.to_k.weight"])
    with pytest.raises(ValueError, match="unknown op"):
        apply_op("transpose", [torch.zeros(2)])


def test_input_errors() -> None:
    cfg = CONFIGS["mmdit"]
    model = build(cfg)
    x, sigma, context, pooled = inputs(cfg, 18, 8)  # 9 patches tall > pos max 8
    with pytest.raises(InputError, match="128x128 px"):
        model(x, sigma, context, pooled)
    x, sigma, context, pooled = inputs(cfg, 8, 7)
    with pytest.raises(InputError, match="multiple of 16 px"):
        model(x, sigma, context, pooled)
    x, sigma, context, pooled = inputs(cfg, 8, 8)
    with pytest.raises(InputError, match="context"):
        model(x, sigma, context[..., :10], pooled)


def test_dtype_and_scalar_sigma() -> None:
    cfg = CONFIGS["mmditx"]
    model = build(cfg)
    x, sigma, context, pooled = inputs(cfg, 8, 8)
    with torch.no_grad():
        full = model(x, sigma[:1].expand(2), context, pooled)
        assert torch.equal(model(x, sigma[0], context, pooled), full)  # a 0-d sigma broadcasts over the batch
        out16 = model.to(torch.bfloat16)(x, sigma, context, pooled)
        ref32 = model.to(torch.float32)(x, sigma, context, pooled)
    assert out16.dtype == torch.float32  # computed in bf16, returned in x's dtype
    assert ((out16 - ref32).norm() / ref32.norm()).item() < 3e-2
