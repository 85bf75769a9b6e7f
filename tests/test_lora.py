"""LoRA: formats and key mapping against diffusers + peft (MMDiT) and transformers + peft (CLIP, T5),
unmerged / merged on float32 and FP8 layers, stacking, strength 0, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sd35fp8.errors import CheckpointError
from sd35fp8.fp8.quantize import quantize_model
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.lora import LoraSet, read_lora
from sd35fp8.lora.apply import fuse, unfuse
from sd35fp8.models.mmdit import MMDiTConfig

peft = pytest.importorskip("peft")
pytest.importorskip("diffusers")
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402

from test_mmdit import build, diffusers_model, inputs, original_state_dict  # noqa: E402

CFG = MMDiTConfig(depth=3, hidden_size=192, num_heads=3, pos_embed_max_size=8, context_dim=64, pooled_dim=32,
                  qk_norm=True, x_block_self_attn_layers=(0,))
MMDIT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                 "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                 "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder", "linear_1", "linear_2"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _peft_mmdit(dora: bool = False, seed: int = 0, up_std: float = 0.2):
    model = build(CFG)
    ref = diffusers_model(CFG, original_state_dict(model))
    torch.manual_seed(seed)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=MMDIT_TARGETS, init_lora_weights=False,
                               use_dora=dora))
    with torch.no_grad():  # peft's init gives up = 0 or tiny updates: make every factor O(1/sqrt(fan))
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, up_std)
            elif "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.2 * torch.randn_like(p))
    sd = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(ref).items()}
    return model, ref, sd


def _ref_out(ref, x, sigma, context, pooled):
    return ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=sigma * 1000,
               return_dict=False)[0]


def to_kohya(sd: dict[str, torch.Tensor], alpha: float, depth: int) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA keys -> kohya `lora_unet_<original>_` keys (q/k/v fused: down stacked, up
    block-diagonal; diffusers' [scale; shift] adaLN rows swapped), written independently of sd35fp8.lora."""
    def fac(k):
        return sd[f"transformer.{k}.lora_A.weight"], sd[f"transformer.{k}.lora_B.weight"]

    out: dict[str, torch.Tensor] = {}

    def put(name, down, up, a):
        stem = "lora_unet_" + name.replace(".", "_")
        out[stem + ".lora_down.weight"], out[stem + ".lora_up.weight"] = down, up
        out[stem + ".alpha"] = torch.tensor(float(a))

    def swap(up):
        a, b = up.chunk(2)
        return torch.cat([b, a])

    for i in range(depth):
        b = f"transformer_blocks.{i}"
        for orig, parts in (("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
                            ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
                            ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"))):
            if f"transformer.{b}.{parts[0]}.lora_A.weight" not in sd:
                continue
            fs = [fac(f"{b}.{p}") for p in parts]
            put(f"joint_blocks.{i}.{orig}", torch.cat([d for d, _ in fs]), torch.block_diag(*[u for _, u in fs]),
                3 * alpha)
        for orig, dname in (("x_block.attn.proj", "attn.to_out.0"), ("context_block.attn.proj", "attn.to_add_out"),
                            ("x_block.attn2.proj", "attn2.to_out.0"), ("x_block.mlp.fc1", "ff.net.0.proj"),
                            ("x_block.mlp.fc2", "ff.net.2"), ("context_block.mlp.fc1", "ff_context.net.0.proj"),
                            ("context_block.mlp.fc2", "ff_context.net.2"), ("x_block.adaLN_modulation.1", "norm1.linear"),
                            ("context_block.adaLN_modulation.1", "norm1_context.linear")):
            if f"transformer.{b}.{dname}.lora_A.weight" not in sd:
                continue
            d, u = fac(f"{b}.{dname}")
            if dname == "norm1_context.linear" and i == depth - 1:
                u = swap(u)
            put(f"joint_blocks.{i}.{orig}", d, u, alpha)
    for orig, dname in (("final_layer.linear", "proj_out"), ("context_embedder", "context_embedder"),
                        ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                        ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                        ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                        ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")):
        d, u = fac(dname)
        put(orig, d, u, alpha)
    d, u = fac("norm_out.linear")
    put("final_layer.adaLN_modulation.1", d, swap(u), alpha)
    return out


def _save(sd, path: Path, metadata: dict | None = None) -> Path:
    save_file(sd, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "stability"])
def test_mmdit_lora_matches_diffusers_peft(tmp_path: Path, layout: str) -> None:
    model, ref, sd = _peft_mmdit()
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})}
    if layout == "kohya":
        sd, meta = to_kohya(sd, 8.0, CFG.depth), None
    elif layout == "stability":
        sd, meta = {_stability_key(k): v for k, v in to_kohya(sd, 8.0, CFG.depth).items()}, None
    path = _save(sd, tmp_path / "l.safetensors", meta)
    lora = read_lora(path, CFG.depth)
    assert not lora.skipped
    loras = LoraSet({"mmdit": model})
    loras.load(lora, "a")
    with torch.no_grad():
        for h, w in [(8, 8), (8, 12)]:
            x, sigma, context, pooled = inputs(CFG, h, w)
            out = model(x, sigma, context, pooled)
            expect = _ref_out(ref, x, sigma, context, pooled)
            assert rel(out, expect) <= 1e-5, (layout, h, w, rel(out, expect))


def _stability_key(k: str) -> str:
    """lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight -> diffusion_model.joint_blocks.0...."""
    from sd35fp8.lora.keys import _mmdit_original  # the underscore -> dotted rule (tested by the kohya case)

    stem, suffix = k.split(".", 1)
    return "diffusion_model." + _mmdit_original(stem.removeprefix("lora_unet_"), True) + "." + suffix


def test_mmdit_dora_matches_peft(tmp_path: Path) -> None:
    model, ref, sd = _peft_mmdit(dora=True)
    assert any("magnitude" in k for k in sd)
    path = _save(sd, tmp_path / "dora.safetensors", {"lora_adapter_metadata": json.dumps({"lora_alpha": 8})})
    loras = LoraSet({"mmdit": model})
    loras.load(path, "d")
    assert loras.adapters["d"].dora
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    with torch.no_grad():
        expect = _ref_out(ref, x, sigma, context, pooled)
        assert rel(model(x, sigma, context, pooled), expect) <= 1e-5
        loras.fuse()  # merged DoRA (float32 weights): same output
        assert rel(model(x, sigma, context, pooled), expect) <= 1e-5
        loras.unfuse()
        loras.unload()
        base = build(CFG)(x, sigma, context, pooled)
        assert torch.equal(model(x, sigma, context, pooled), base)


def test_strength_zero_unload_stack_and_fuse(tmp_path: Path) -> None:
    model, ref, sd = _peft_mmdit(seed=0)
    _, _, sd2 = _peft_mmdit(seed=1)
    meta = {"lora_adapter_metadata": json.dumps({"lora_alpha": 8})}
    p1, p2 = _save(sd, tmp_path / "a.safetensors", meta), _save(sd2, tmp_path / "b.safetensors", meta)
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    with torch.no_grad():
        base = model(x, sigma, context, pooled)
        loras = LoraSet({"mmdit": model})
        loras.load(p1, "a", strength=0.0)
        assert torch.equal(model(x, sigma, context, pooled), base)  # strength 0 = no LoRA, exactly
        loras.set_active({"a": 1.0})
        one = model(x, sigma, context, pooled)
        assert rel(one, _ref_out(ref, x, sigma, context, pooled)) <= 1e-5
        loras.load(p2, "b", strength=0.5)
        both = model(x, sigma, context, pooled)
        # stacking = summing the deltas: W + dA + 0.5 dB, checked against two fused runs
        loras.set_active({})
        assert torch.equal(model(x, sigma, context, pooled), base)
        loras.set_active({"a": 1.0, "b": 0.5})
        loras.fuse()
        assert rel(model(x, sigma, context, pooled), both) <= 1e-5
        assert loras.key() == (("a", 1.0), ("b", 0.5))
        loras.unfuse()
        assert rel(model(x, sigma, context, pooled), both) <= 1e-5
        loras.unload()
        assert torch.equal(model(x, sigma, context, pooled), base)


def test_fp8_unmerged_and_merged_sqnr(tmp_path: Path) -> None:
    """FP8 unmerged LoRA against the float32 merged reference: within 0.5 dB of the FP8 base model's own
    SQNR (against float32); merged-requantised reported (asserted >= 25 dB). The LoRA's update is about
    a quarter of the weights' size (a strong but realistic LoRA)."""
    model, ref, sd = _peft_mmdit(up_std=0.05)
    path = _save(sd, tmp_path / "a.safetensors", {"lora_adapter_metadata": json.dumps({"lora_alpha": 8})})
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    with torch.no_grad():
        base32 = model(x, sigma, context, pooled)
        ref32 = _ref_out(ref, x, sigma, context, pooled)  # float32 merged-equivalent (peft)
        fp8 = build(CFG)
        quantize_model(fp8, mode="dynamic")  # every Linear FP8 x FP8 (per-token activations)
        base8 = fp8(x, sigma, context, pooled)
        loras = LoraSet({"mmdit": fp8})
        loras.load(path, "a")
        un8 = fp8(x, sigma, context, pooled)
        loras.fuse()
        me8 = fp8(x, sigma, context, pooled)
        loras.unfuse()
        assert torch.equal(fp8(x, sigma, context, pooled), un8)
        loras.unload()
        assert torch.equal(fp8(x, sigma, context, pooled), base8)
    s_base, s_un, s_me = sqnr(base32, base8), sqnr(ref32, un8), sqnr(ref32, me8)
    print(f"FP8 base {s_base:.2f} dB, unmerged LoRA {s_un:.2f} dB, merged {s_me:.2f} dB")
    assert s_un >= s_base - 0.5
    assert s_me >= 25.0


def test_text_encoder_lora_matches_transformers_peft(tmp_path: Path) -> None:
    from tiny_random import clip, t5

    sd_all: dict[str, torch.Tensor] = {}
    refs, ours = {}, {}
    for prefix, kind, make, targets in (
            ("text_encoder", "clip_l", lambda: clip(32, "quick_gelu", 3), ["q_proj", "k_proj", "v_proj", "out_proj",
                                                                         "fc1", "fc2"]),
            ("text_encoder_2", "clip_g", lambda: clip(32, "gelu", 4), ["q_proj", "v_proj", "fc2", "text_projection"]),
            ("text_encoder_3", "t5xxl", lambda: t5(120, 5), ["q", "k", "v", "o", "wi_0", "wi_1", "wo"])):
        torch.manual_seed(1)
        our = make().eval()
        base = make().eval()
        if not hasattr(base, "base_model_prefix"):  # peft + transformers 5 read it off the wrapped root
            base.base_model_prefix = ""
        pm = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                                     base)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        for k, v in get_peft_model_state_dict(pm).items():
            sd_all[f"{prefix}.{k.removeprefix('base_model.model.')}"] = v.contiguous()
        refs[kind], ours[kind] = pm, our
    path = _save(sd_all, tmp_path / "te.safetensors", {"lora_adapter_metadata": json.dumps({"lora_alpha": 4})})
    lora = read_lora(path)
    assert set(lora.components()) == {"clip_l", "clip_g", "t5xxl"} and not lora.skipped
    loras = LoraSet(ours)
    loras.load(lora, "te")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for kind in ("clip_l", "clip_g"):
            h, pooled = ours[kind](ids)
            h_ref, pooled_ref = refs[kind](ids)
            assert rel(h, h_ref) <= 1e-5 and rel(pooled, pooled_ref) <= 1e-5
            assert rel(ours[kind].text_projection(pooled), refs[kind].text_projection(pooled_ref)) <= 1e-5
        out = ours["t5xxl"](input_ids=ids).last_hidden_state
        assert rel(out, refs["t5xxl"](input_ids=ids).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("kind", ["loha", "lokr", "lokr_full"])
def test_lycoris_loha_lokr_match_peft(tmp_path: Path, kind: str) -> None:
    """LyCORIS LoHa / LoKr factors (kohya stems + alpha, as LyCORIS saves them) become exact low-rank terms:
    up @ down equals peft's get_delta_weight for the same factors (alpha / r: ComfyUI's alpha / dim). A LoKr with
    both factors whole is ComfyUI's kron(w1, w2) unscaled (peft would scale it; ComfyUI, whose files these are,
    does not), kept as one full-rank term."""
    from collections import OrderedDict

    from peft import LoHaConfig, LoKrConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(q=nn.Linear(256, 384)))
    cfg = {"loha": LoHaConfig(r=4, alpha=8, target_modules=["q"], init_weights=False),
           "lokr": LoKrConfig(r=4, alpha=8, target_modules=["q"], init_weights=False, decompose_both=True),
           "lokr_full": LoKrConfig(r=64, alpha=8, target_modules=["q"], init_weights=False)}[kind]
    pm = get_peft_model(base, cfg)
    sd = {k.rsplit(".", 1)[-1]: v.detach() for k, v in get_peft_model_state_dict(pm).items()}
    stem = "lora_unet_joint_blocks_0_x_block_attn_proj"
    lora = read_lora(_save({**{f"{stem}.{k}": v for k, v in sd.items()}, f"{stem}.alpha": torch.tensor(8.0)},
                           tmp_path / f"{kind}.safetensors"))
    ((key, (term,)),) = lora.terms.items()
    assert key == ("mmdit", "joint_blocks.0.x_block.attn.proj") and "LyCORIS" in lora.format
    got = term.up @ term.down
    if kind == "lokr_full":
        assert set(sd) == {"lokr_w1", "lokr_w2"}
        want = torch.kron(sd["lokr_w1"], sd["lokr_w2"])
        assert term.rank == 256  # the layer's size: one full-rank term
    else:
        want = pm.base_model.model.q.get_delta_weight("default")
        assert term.rank == 16  # r1 * r2
    assert rel(got, want) <= 1e-5


def test_formats_refused_other_models_and_partial(tmp_path: Path, caplog) -> None:
    r = torch.zeros(2, 8)
    loha = {"lora_unet_joint_blocks_0_x_block_attn_qkv.hada_t1": r}
    with pytest.raises(CheckpointError, match="LoHa with a Tucker core"):
        read_lora(_save(loha, tmp_path / "loha.safetensors"))
    lokr = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lokr_w1": r}
    with pytest.raises(CheckpointError, match="lokr_w2"):
        read_lora(_save(lokr, tmp_path / "lokr.safetensors"))
    sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": r, "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": r.T.contiguous()}
    with pytest.raises(CheckpointError, match="UNet"):
        read_lora(_save(sdxl, tmp_path / "sdxl.safetensors"))
    flux = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": r,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": r.T.contiguous()}
    with pytest.raises(CheckpointError, match="FLUX"):
        read_lora(_save(flux, tmp_path / "flux.safetensors"))
    with pytest.raises(CheckpointError, match="no key matches"):
        read_lora(_save({"foo.bar": r}, tmp_path / "none.safetensors"))
    partial = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 192),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(576, 2),
               "lora_unet_joint_blocks_0_x_block_funny.lora_down.weight": r,
               "lora_unet_joint_blocks_0_x_block_funny.lora_up.weight": r.T.contiguous()}
    lora = read_lora(_save(partial, tmp_path / "partial.safetensors"))
    assert lora.skipped == ["lora_unet_joint_blocks_0_x_block_funny"]
    wrong = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 64),
             "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(192, 2)}
    with pytest.raises(CheckpointError, match="do not fit"):
        LoraSet({"mmdit": build(CFG)}).load(_save(wrong, tmp_path / "wrong.safetensors"), "w")


def test_fuse_on_fp8_per_tensor_layer_and_conv() -> None:
    from sd35fp8.fp8.linear import FP8Linear
    from sd35fp8.lora.files import LoraTerm

    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    q = FP8Linear.from_linear(lin, granularity="tensor")
    term = LoraTerm(torch.randn(4, 32) * 0.1, torch.randn(48, 4) * 0.1)
    x = torch.randn(5, 32)
    ref = x @ (lin.weight + term.up @ term.down).T + lin.bias
    before = q.weight.clone()
    fuse(q, [(term, 1.0)])
    assert q.granularity == "tensor" and sqnr(ref, q(x)) > 25
    unfuse(q)
    assert torch.equal(q.weight.view(torch.uint8), before.view(torch.uint8))
    conv = nn.Conv2d(3, 8, 2, stride=2)
    cterm = LoraTerm(torch.randn(2, 3, 2, 2), torch.randn(8, 2, 1, 1))
    from sd35fp8.lora.apply import activate, lora_slot

    img = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        w = conv.weight + (cterm.up.reshape(8, 2) @ cterm.down.reshape(2, -1)).reshape(conv.weight.shape)
        expect = torch.nn.functional.conv2d(img, w, conv.bias, stride=2)
        lora_slot(conv)[:] = activate(conv, [(cterm, 1.0)], torch.float32)
        assert rel(conv(img), expect) <= 1e-5


def test_engine_step_carries_the_lora(tmp_path: Path) -> None:
    """The fused step (MMDiTEngine, float32, eager) reads each layer's LoRA slot: same output as diffusers +
    peft; swapping strengths needs no rebuild; FP8 dynamic step within the base step's own SQNR."""
    from sd35fp8.fast import MMDiTEngine

    model, ref, sd = _peft_mmdit(up_std=0.05)
    path = _save(sd, tmp_path / "a.safetensors", {"lora_adapter_metadata": json.dumps({"lora_alpha": 8})})
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    loras = LoraSet({"mmdit": model})
    with torch.no_grad():
        base = model(x, sigma, context, pooled)
        engine = MMDiTEngine(model, fp8_mode=None, compile=False)
        loras.load(path, "a")  # after the engine was built: it shares the layers' slots
        expect = _ref_out(ref, x, sigma, context, pooled)
        assert rel(engine(x, sigma, context, pooled), expect) <= 1e-5
        loras.set_active({"a": 0.0})
        assert rel(engine(x, sigma, context, pooled), base) <= 1e-6
        fp8 = build(CFG)
        quantize_model(fp8, mode="dynamic")
        eng8 = MMDiTEngine(fp8, fp8_mode="dynamic", compile=False)
        base8 = eng8(x, sigma, context, pooled)
        loras8 = LoraSet({"mmdit": fp8})
        loras8.load(path, "a")
        un8 = eng8(x, sigma, context, pooled)
        loras8.fuse()
        eng8.refresh_weights()  # the engine's concatenated adaLN weights and scale rows re-read
        me8 = eng8(x, sigma, context, pooled)
    assert sqnr(expect, un8) >= sqnr(base, base8) - 0.5
    assert sqnr(expect, me8) >= sqnr(base, base8) - 3.0


def test_info_and_cli_arguments(tmp_path: Path, capsys) -> None:
    from sd35fp8.cli import build_parser, main
    from sd35fp8.cli.lora import parse_lora_arg
    from sd35fp8.lora.commands import describe_lora, is_lora_file

    _, _, sd = _peft_mmdit()
    path = _save(to_kohya(sd, 8.0, CFG.depth), tmp_path / "k.safetensors")
    assert is_lora_file(path)
    info = describe_lora(path)
    assert info["format"] == "kohya / sd-scripts" and info["ranks"] == [4, 12]  # q/k/v fused: 3 x rank 4
    assert info["fits"] == "the shipped tiny model (3 blocks)" and info["targets"] == {"mmdit": 36}
    assert main(["info", str(path)]) == 0
    assert "LoRA, kohya / sd-scripts" in capsys.readouterr().out
    assert parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_lora_arg("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    args = build_parser().parse_args(["generate", "x", "--lora", "a.safetensors:-1", "--lora", "b.safetensors",
                                      "--lora-merge"])
    assert args.lora == [("a.safetensors", -1.0), ("b.safetensors", 1.0)] and args.lora_merge
