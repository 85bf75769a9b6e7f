"""SD3 VAE: LDM-layout module vs diffusers AutoencoderKL (converted with diffusers' own converter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd35fp8.checkpoints.diffusers_vae import apply_op, vae_plan_from_diffusers
from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.models.vae import (LATENT_SCALE, LATENT_SHIFT, SD3VAE, VAEConfig, image_to_uint8, to_model_space,
                                to_vae_space)

TINY = VAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=2, latent_channels=16)


def _random_ldm_state(cfg: VAEConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the ORIGINAL LDM layout; norms and biases randomised so mapping errors show."""
    torch.manual_seed(seed)
    model = SD3VAE(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if ".norm" in k or "norm_out" in k:
            v = (1.0 + 0.2 * torch.randn_like(v)) if k.endswith("weight") else 0.2 * torch.randn_like(v)
        elif k.endswith("bias"):
            v = 0.05 * torch.randn_like(v)
        sd[k] = v.clone()
    return sd


def _diffusers_config(cfg: VAEConfig) -> dict:
    n = len(cfg.ch_mult)
    return dict(in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
                latent_channels=cfg.latent_channels, norm_num_groups=cfg.num_groups,
                use_quant_conv=False, use_post_quant_conv=False)


@pytest.fixture(scope="module")
def pair():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ldm = _random_ldm_state(TINY)
    dcfg = _diffusers_config(TINY)
    converted = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm.items()}, dcfg)
    ref = diffusers.AutoencoderKL(**dcfg).eval()
    ref.load_state_dict(converted, strict=True)

    with torch.device("meta"):
        ours = SD3VAE(VAEConfig.from_state_dict({k: v.shape for k, v in ldm.items()}))
    ours.load_state_dict(ldm, strict=True, assign=True)
    return ours.eval(), ref, ldm, converted


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("hw", [(64, 64), (64, 96)])
def test_encode_decode_match_diffusers(pair, hw):
    ours, ref, _, _ = pair
    torch.manual_seed(1)
    img = torch.rand(2, 3, *hw) * 2 - 1
    with torch.no_grad():
        z_ours = ours.encode(img)
        z_ref = ref.encode(img).latent_dist.mean
        assert z_ours.shape == (2, 16, hw[0] // 8, hw[1] // 8)
        assert _rel_err(z_ours, z_ref) <= 1e-4

        z = torch.randn(2, 16, hw[0] // 8, hw[1] // 8)
        x_ours = ours.decode(z)
        x_ref = ref.decode(z).sample
        assert x_ours.shape == (2, 3, *hw)
        assert _rel_err(x_ours, x_ref) <= 1e-4


def test_config_inference():
    sd_shapes = {k: v.shape for k, v in _random_ldm_state(TINY).items()}
    assert VAEConfig.from_state_dict(sd_shapes) == TINY
    with torch.device("meta"):
        real = SD3VAE(VAEConfig.sd3())
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    cfg = VAEConfig.from_state_dict(shapes)
    assert cfg == VAEConfig.sd3() == VAEConfig(128, (1, 2, 4, 4), 2, 16, 3, 3, 32)
    assert "16 latent" in cfg.describe()
    assert shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert shapes["decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert "decoder.up.3.block.2.conv2.weight" in shapes and "decoder.up.0.upsample.conv.weight" not in shapes
    assert "encoder.down.3.downsample.conv.weight" not in shapes and "quant_conv.weight" not in shapes

    bad = dict(sd_shapes)
    del bad["decoder.up.1.block.2.conv1.weight"], bad["decoder.up.1.block.2.conv1.bias"]
    for k in [k for k in bad if k.startswith("decoder.up.1.block.2.")]:
        del bad[k]
    with pytest.raises(CheckpointError, match="decoder.up.1.block"):
        VAEConfig.from_state_dict(bad)
    with pytest.raises(CheckpointError, match="decoder.conv_in.weight"):
        VAEConfig.from_state_dict({k: v for k, v in sd_shapes.items() if k != "decoder.conv_in.weight"})


def test_plan_round_trip(pair):
    _, _, ldm, converted = pair
    plan = vae_plan_from_diffusers(converted.keys())
    assert set(plan) == set(ldm)
    ops = {op for _, op in plan.values()}
    assert ops == {"copy", "reshape_linear_to_conv"}
    assert plan["decoder.mid.attn_1.proj_out.weight"] == (("decoder.mid_block.attentions.0.to_out.0.weight",),
                                                          "reshape_linear_to_conv")
    assert plan["decoder.up.0.block.0.nin_shortcut.bias"][0] == ("decoder.up_blocks.3.resnets.0.conv_shortcut.bias",)
    for key, (src, op) in plan.items():
        t = apply_op(op, [converted[s] for s in src], key)
        assert t.shape == ldm[key].shape, key
        assert torch.equal(t, ldm[key]), key


def test_plan_unknown_keys_named(pair):
    _, _, _, converted = pair
    keys = list(converted) + ["quant_conv.weight", "decoder.up_blocks.0.attentions.0.to_q.weight"]
    with pytest.raises(CheckpointError, match="quant_conv.weight") as err:
        vae_plan_from_diffusers(keys, source="vae/diffusion_pytorch_model.safetensors")
    assert "vae/diffusion_pytorch_model.safetensors" in str(err.value)
    assert set(err.value.keys) == {"quant_conv.weight", "decoder.up_blocks.0.attentions.0.to_q.weight"}
    with pytest.raises(CheckpointError, match="Linear weight"):
        apply_op("reshape_linear_to_conv", [torch.zeros(4)], "decoder.mid.attn_1.q.weight")


def test_decode_tiled():
    """Tiles see local GroupNorm statistics and local mid-attention, so tiled != full decode exactly.

    Measured on this random model (i.i.d. latents, stationary statistics): feathered tiles of 32 with
    overlap 16 differ from the full decode by ~0.7% mean and ~10% max of max|x|; hard cuts (overlap 0)
    reach ~50% max at the seams. We require mean <= 2%, max <= 20%, and max below half the hard-cut max:
    the blend removes the seams. A latent that fits in one tile must decode exactly as `decode`.
    """
    cfg = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1)  # cheap; same downscale 8
    model = SD3VAE(cfg).eval()
    model.load_state_dict(_random_ldm_state(cfg))
    torch.manual_seed(2)
    z = torch.randn(1, 16, 48, 40)
    calls: list[tuple[int, ...]] = []
    hook = model.decoder.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            full = model.decode(z)
            calls.clear()
            tiled = model.decode_tiled(z, tile_latent=32, overlap=16)
            n_tiled, max_tile = len(calls), max(max(s[2], s[3]) for s in calls)
            hard = model.decode_tiled(z, tile_latent=32, overlap=0)
            calls.clear()
            single = model.decode_tiled(z[:, :, :24, :16], tile_latent=32, overlap=16)
            n_single = len(calls)
            single_ref = model.decode(z[:, :, :24, :16])
    finally:
        hook.remove()
    assert n_tiled == 2 * 2 and max_tile == 32  # rows 0,16 x cols 0,8: memory bounded by the tile
    assert n_single == 1 and torch.equal(single, single_ref)
    assert tiled.shape == full.shape == (1, 3, 384, 320)
    scale = full.abs().max()
    diff = (tiled - full).abs()
    hard_max = (hard - full).abs().max()
    assert diff.mean() / scale <= 0.02, (diff.mean() / scale).item()
    assert diff.max() / scale <= 0.20, (diff.max() / scale).item()
    assert diff.max() < 0.5 * hard_max, (diff.max().item(), hard_max.item())
    with pytest.raises(InputError):
        model.decode_tiled(z, tile_latent=8, overlap=8)


def test_encode_tiled_single_tile_exact(pair):
    ours, _, _, _ = pair
    img = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours.encode_tiled(img, tile_latent=16, overlap=4), ours.encode(img))
        tiled = ours.encode_tiled(img, tile_latent=8, overlap=4)
    assert tiled.shape == (1, 16, 8, 12)


def test_tile_blend_weights_partition():
    from sd35fp8 import tiles

    starts = tiles.tile_starts(40, 16, 8)
    assert starts == [0, 8, 16, 24]
    assert tiles.tile_starts(10, 16, 8) == [0]
    w = tiles.ramp(16, 4, True, True)
    assert (w > 0).all() and w[0] < w[1] < w[4] == 1.0


def test_latent_space_constants():
    assert (LATENT_SCALE, LATENT_SHIFT) == (1.5305, 0.0609)
    z = torch.randn(2, 16, 4, 4)
    assert torch.allclose(to_vae_space(to_model_space(z)), z, atol=1e-6)
    assert torch.allclose(to_model_space(torch.tensor([LATENT_SHIFT, LATENT_SHIFT + 1.0])),
                          torch.tensor([0.0, LATENT_SCALE]))
    assert torch.allclose(to_vae_space(torch.tensor(0.0)), torch.tensor(LATENT_SHIFT))


def test_image_to_uint8_matches_comfyui():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.003, 0.999, 1.0, 3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    out = image_to_uint8(x)
    assert len(out) == 1 and out[0].shape == (1, 7, 3) and out[0].dtype == np.uint8
    # ComfyUI: clamp((x+1)/2, 0, 1) then np.clip(255. * i, 0, 255).astype(uint8): truncation, 0 -> 127.
    assert out[0][0, :, 0].tolist() == [0, 0, 127, 127, 254, 255, 255]
    ref = np.clip(255.0 * torch.clamp((x + 1.0) / 2.0, 0, 1)[0].permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(out[0], ref)


def test_plan_covers_full_size_sd3_diffusers_layout():
    diffusers = pytest.importorskip("diffusers")
    cfg = VAEConfig.sd3()
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**_diffusers_config(cfg))
        ours = SD3VAE(cfg)
    dsd, osd = ref.state_dict(), ours.state_dict()
    plan = vae_plan_from_diffusers(dsd.keys())
    assert set(plan) == set(osd)
    for key, (src, op) in plan.items():
        assert apply_op(op, [dsd[s] for s in src], key).shape == osd[key].shape, key


def test_compile_decoder_is_decodes_road_only(monkeypatch):
    """compile_decoder: `decode` runs the compiled decoder (kept out of the module tree: the state dict is
    unchanged), the tiled decode and `encode` stay eager; the compiled road (workflow EngineOptions with
    compile, resident) compiles a VAE's decoder, offload or eager roads do not."""
    from sd35fp8.workflow.engine import EngineOptions

    compiled = []

    def fake_compile(fn, dynamic=None):
        assert dynamic is False  # one graph per latent shape

        def run(z):
            compiled.append(tuple(z.shape))
            return fn(z)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    vae = SD3VAE(TINY).eval()
    keys = list(vae.state_dict())
    z = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        eager = vae.decode(z)
        vae.compile_decoder()
        assert list(vae.state_dict()) == keys
        assert torch.equal(vae.decode(z), eager) and compiled == [(2, 16, 8, 8)]
        vae.decode_tiled(torch.randn(1, 16, 24, 24), tile_latent=16, overlap=4)
    assert compiled == [(2, 16, 8, 8)]  # tiles went through the eager decoder

    for options, expect in ((EngineOptions(compile=True), True), (EngineOptions(compile=False), False),
                            (EngineOptions(compile=True, offload="model"), False)):
        fresh = SD3VAE(TINY)
        options.vae(fresh)
        assert ("_compiled_decoder" in fresh.__dict__) == expect, options


@pytest.mark.slow
def test_compiled_decoder_matches_eager_on_cpu():
    """The real torch.compile (Inductor, CPU) of a tiny decoder gives the eager decode's values."""
    torch.manual_seed(0)
    vae = SD3VAE(TINY).eval()
    z = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        eager = vae.decode(z)
        vae.compile_decoder()
        out = vae.decode(z)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
