"""SD3 ControlNets against diffusers' SD3ControlNetModel + SD3Transformer2DModel (float32, random tiny configs).

Both file layouts: diffusers/InstantX (joint blocks; and single blocks as diffusers converts the
SD3.5 ones) and Stability's SD3.5 Large layout (written here from the same weights, as
`sd3.5_large_controlnet_*.safetensors` name them).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sd35fp8.checkpoints.controlnet import load_controlnet, quantize_controlnet
from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.controlnet import ControlNetConfig, preprocess_image

from test_mmdit import build, diffusers_model, inputs, original_state_dict  # noqa: E402
from test_mmdit import CONFIGS as BASE_CONFIGS

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3ControlNetModel  # noqa: E402

BASE = BASE_CONFIGS["mmdit_qknorm"]  # depth 3, hidden 192, 3 heads, context 64, pooled 32


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (diffusers zero-initialises controlnet_blocks and pos_embed_input)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return module.eval()


def diffusers_controlnet(kind: str, layers: int = 2, qk_norm: bool = False, seed: int = 3) -> SD3ControlNetModel:
    common = dict(sample_size=8, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
                  num_attention_heads=BASE.num_heads, pooled_projection_dim=BASE.pooled_dim,
                  pos_embed_max_size=BASE.pos_embed_max_size, out_channels=16)
    if kind == "joint":  # InstantX SD3 ControlNets
        net = SD3ControlNetModel(joint_attention_dim=BASE.context_dim, caption_projection_dim=BASE.hidden_size,
                                 qk_norm="rms_norm" if qk_norm else None, dual_attention_layers=(0,) if qk_norm else (),
                                 **common)
    else:  # SD3.5 Large ControlNets, as diffusers' convert_sd35_controlnet script builds them
        net = SD3ControlNetModel(joint_attention_dim=None, pos_embed_type=None, use_pos_embed=False,
                                 force_zeros_for_pooled_projection=False, **common)
    return randomize_(net, seed)


def stability_state_dict(net: SD3ControlNetModel, control_type: int) -> dict[str, torch.Tensor]:
    """diffusers single-block ControlNet -> Stability's sd3.5_large_controlnet_* key layout."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    out: dict[str, torch.Tensor] = {"control_type": torch.tensor([control_type], dtype=torch.int32)}
    for i in range(len(net.transformer_blocks)):
        b = f"transformer_blocks.{i}."
        for param in ("weight", "bias"):
            out[f"{b}attn.qkv.{param}"] = torch.cat([sd.pop(f"{b}attn.to_{n}.{param}") for n in "qkv"])
            for theirs, ours in (("norm1.linear", "adaLN_modulation.1"), ("attn.to_out.0", "attn.proj"),
                                 ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2")):
                out[f"{b}{ours}.{param}"] = sd.pop(f"{b}{theirs}.{param}")
    out.update(sd)  # time_text_embed.*, controlnet_blocks.*, pos_embed_input.proj.* keep their names
    out["pos_embed.proj.weight"] = torch.randn(BASE.hidden_size, 16, 2, 2)  # present, unused (base embeds x)
    out["pos_embed.proj.bias"] = torch.zeros(BASE.hidden_size)
    return out


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def reference_samples(net, base_ref, x, sigma, context, pooled, hint) -> list[torch.Tensor]:
    if net.config.joint_attention_dim is not None:
        return net(hidden_states=x, controlnet_cond=hint, encoder_hidden_states=context,
                   pooled_projections=torch.zeros_like(pooled), timestep=sigma * 1000,
                   return_dict=False)[0]
    tokens = base_ref.pos_embed(x)  # the pipeline feeds the transformer's embedding of x
    return net(hidden_states=tokens, controlnet_cond=hint, pooled_projections=pooled, timestep=sigma * 1000,
               return_dict=False)[0]


CASES = {  # name -> (diffusers kind, file layout, qk_norm)
    "instantx_joint": ("joint", "diffusers", False),
    "instantx_joint_qknorm_attn2": ("joint", "diffusers", True),
    "sd35_diffusers": ("single", "diffusers", False),
    "sd35_stability": ("single", "stability", False),
}


@pytest.fixture(scope="module")
def base():
    model = build(BASE)
    return model, diffusers_model(BASE, original_state_dict(model))


@pytest.mark.parametrize("case", list(CASES))
def test_block_residuals_match_diffusers(case: str, base, tmp_path) -> None:
    kind, layout, qk = CASES[case]
    model, base_ref = base
    net = diffusers_controlnet(kind, qk_norm=qk)
    state = stability_state_dict(net, 1) if layout == "stability" else dict(net.state_dict())
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    ours = load_controlnet(path, dtype=torch.float32)
    assert ours.config.kind == ("joint" if kind == "joint" else "sd35")
    assert ours.config.control_type == (1 if layout == "stability" else None)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for h, w in [(8, 8), (6, 8)]:
            x, sigma, context, pooled = inputs(BASE, h, w)
            hint = torch.randn(2, 16, h, w, generator=g)
            expect = reference_samples(net, base_ref, x, sigma, context, pooled, hint)
            got = ours.layer_outputs(x, sigma, context, pooled, hint, model)
            assert len(got) == len(expect) == 2
            for a, b in zip(got, expect):
                assert b.abs().max() > 0.1
                assert rel(a, b) <= 1e-5, (case, h, w, rel(a, b))


def test_mmdit_control_matches_diffusers_transformer(base, tmp_path) -> None:
    """The residuals enter the base model's joint blocks as diffusers adds block_controlnet_hidden_states."""
    model, base_ref = base
    net = diffusers_controlnet("joint", layers=1)  # 1 layer for 3 blocks: blocks 0, 1 get it, 2 (pre-only) not
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "cn.safetensors"))
    ours = load_controlnet(tmp_path / "cn.safetensors", dtype=torch.float32)
    x, sigma, context, pooled = inputs(BASE, 8, 6)
    hint = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        samples = reference_samples(net, base_ref, x, sigma, context, pooled, hint)
        expect = base_ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                          timestep=sigma * 1000, block_controlnet_hidden_states=[s * 0.7 for s in samples],
                          return_dict=False)[0]
        control = ours(x, sigma, context, pooled, hint, model, strength=0.7)
        assert [c is not None for c in control] == [True, True, False]
        out = model(x, sigma, context, pooled, control=control)
        plain = model(x, sigma, context, pooled)
    assert rel(out, expect) <= 1e-4
    assert (out - plain).abs().max() > 1e-2  # the control changed the result
    with pytest.raises(InputError, match="one residual"):
        model(x, sigma, context, pooled, control=control[:2])


def test_block_map() -> None:
    sd35 = ControlNetConfig(kind="sd35", num_layers=19, hidden_size=2432, num_heads=38, pooled_dim=2048)
    assert sd35.block_map(38) == [j // 2 for j in range(38)]  # Large: every block, the last included
    joint = ControlNetConfig(kind="joint", num_layers=12, hidden_size=1536, num_heads=24, pooled_dim=2048,
                             context_dim=4096, pos_embed_max_size=192)
    assert joint.block_map(24) == [j // 2 for j in range(23)] + [None]


def test_preprocess_per_control_type() -> None:
    img = torch.tensor([0.0, 0.25, 1.0]).view(1, 3, 1, 1)
    cfg = dict(kind="sd35", num_layers=1, hidden_size=128, num_heads=2, pooled_dim=32)
    canny = preprocess_image(img, ControlNetConfig(control_type=1, **cfg))
    depth = preprocess_image(img, ControlNetConfig(control_type=2, **cfg))
    blur = preprocess_image(img, ControlNetConfig(control_type=0, **cfg))
    assert torch.allclose(canny.flatten(), img.flatten() * 255)  # ComfyUI: (a*255*0.5+0.5)*2-1
    assert torch.allclose(depth.flatten(), 1 - 2 * img.flatten())  # inverted, then 2a-1
    assert torch.allclose(blur.flatten(), 2 * img.flatten() - 1)


def test_fp8_sqnr(base, tmp_path) -> None:
    model, base_ref = base
    net = diffusers_controlnet("single")
    save_file({k: v.contiguous() for k, v in stability_state_dict(net, 0).items()}, str(tmp_path / "cn.safetensors"))
    ref = load_controlnet(tmp_path / "cn.safetensors", dtype=torch.float32)
    q = load_controlnet(tmp_path / "cn.safetensors", dtype=torch.float32)
    report = quantize_controlnet(q, "weight_only")
    assert report.converted
    assert all(n.startswith(("transformer_blocks.", "controlnet_blocks.")) for n in report.converted)
    x, sigma, context, pooled = inputs(BASE, 8, 8)
    hint = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = ref.layer_outputs(x, sigma, context, pooled, hint, model)
        b = q.layer_outputs(x, sigma, context, pooled, hint, model)
    db = [float(sqnr(r, o)) for r, o in zip(a, b)]
    print(f"ControlNet FP8 weight_only SQNR per layer (dB): {[round(d, 1) for d in db]}")
    assert min(db) > 20


def test_not_a_controlnet(tmp_path) -> None:
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not an SD3 ControlNet"):
        load_controlnet(tmp_path / "x.safetensors")
