"""FP8 engine: fp8 loading (plain / ComfyUI scaled / native / quantise-on-load), export, calibration.

CPU, tiny random MMDiT and T5, float32 references; SQNR in dB (torchao style thresholds).
Scaled/plain fp8 files are built here by hand from REFERENCE.md's description, not with our writer.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import T5Config, T5EncoderModel

from sd35fp8.checkpoints.export import Entry, export, write_safetensors
from sd35fp8.checkpoints.fp8_load import load_mmdit_fp8, load_t5_fp8
from sd35fp8.checkpoints.info import describe_fp8_layout
from sd35fp8.checkpoints.sources import open_file
from sd35fp8.fp8.calibrate import Recipe, calibrate
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.fp8.policy_sd35 import measure_sensitivity, policy_from_sensitivity
from sd35fp8.fp8.scaling import sqnr
from sd35fp8.models.mmdit import MMDiT, MMDiTConfig, init_random_

CFG = MMDiTConfig.tiny()
DB = {"weight_only": 25.0, "dynamic": 20.0, "static": 18.0}


@pytest.fixture(scope="module")
def mmdit() -> MMDiT:
    model = MMDiT(CFG).eval()
    init_random_(model, torch.Generator().manual_seed(0))
    return model


def _inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 8, generator=g)
    sigma = torch.rand(batch, generator=g) * 0.9 + 0.05
    ctx = torch.randn(batch, 12, CFG.context_dim, generator=g)
    pooled = torch.randn(batch, CFG.pooled_dim, generator=g)
    return x, sigma, ctx, pooled


@pytest.fixture(scope="module")
def calls():
    return [_inputs(s) for s in range(1, 4)]


@pytest.fixture(scope="module")
def f32_file(mmdit, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8e") / "mmdit_f32.safetensors"
    save_file({k: v.contiguous() for k, v in mmdit.state_dict().items()}, str(path))
    return path


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def _comfy_scaled_state(model: nn.Module, prefix: str = "") -> tuple[dict, MMDiT]:
    """ComfyUI scaled fp8 by hand: W_fp8 = W / s, s = amax / 448 (scalar), marker `scaled_fp8`.
    Returns (state dict, float32 model with the dequantised weights = the exact reference)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = MMDiT(CFG).eval()
    for name in _linear_names(model):
        w = sd[f"{name}.weight"]
        s = w.abs().max() / 448.0
        q = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        sd[f"{name}.weight"] = q
        sd[f"{name}.scale_weight"] = s.reshape(()).float()
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    deq = {k: v for k, v in sd.items() if not k.endswith("scale_weight") and k != "scaled_fp8"}
    for name in _linear_names(model):
        deq[f"{name}.weight"] = sd[f"{name}.weight"].float() * sd[f"{name}.scale_weight"]
    ref.load_state_dict(deq)
    return {prefix + k: v for k, v in sd.items()}, ref


def _fp8_layers(model: nn.Module) -> dict[str, FP8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}


@torch.no_grad()
def test_quantise_on_load_every_mode(mmdit, f32_file, calls):
    ref = mmdit(*calls[0])
    recipe = calibrate(mmdit, calls, tune=False)
    for mode in ("weight_only", "dynamic", "static"):
        model = load_mmdit_fp8(f32_file, "cpu", torch.float32, mode, recipe=recipe if mode == "static" else None)
        layers = _fp8_layers(model)
        assert layers and all(m.weight.dtype == torch.float8_e4m3fn for m in layers.values())
        assert model.fp8_report.mode == mode and model.fp8_report.quantized_on_load == len(layers)
        assert "final_layer.linear" not in layers and "y_embedder.mlp.0" not in layers  # measured policy
        db = sqnr(ref, model(*calls[0]))
        assert db >= DB[mode], (mode, db)


@torch.no_grad()
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_load_hand_built_comfy_scaled(mmdit, tmp_path, calls, prefix):
    sd, ref = _comfy_scaled_state(mmdit, prefix)
    path = tmp_path / "scaled.safetensors"
    save_file(sd, str(path))
    model = load_mmdit_fp8(path, "cpu", torch.float32, None)  # file precision: runs FP8
    layers = _fp8_layers(model)
    assert len(layers) == len(_linear_names(mmdit))
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.ndim == 0 for m in layers.values())
    assert model.fp8_report.file_format == "comfy_scaled" and model.fp8_report.mode == "dynamic"
    name = "joint_blocks.0.x_block.attn.qkv"
    assert torch.equal(layers[name].weight.view(torch.uint8), sd[prefix + name + ".weight"].view(torch.uint8))
    want = ref(*calls[0])
    for m in layers.values():
        m.set_mode("weight_only")
    assert sqnr(want, model(*calls[0])) > 60  # exact dequantised weights
    for m in layers.values():
        m.set_mode("dynamic")
    assert sqnr(want, model(*calls[0])) > DB["dynamic"]


@torch.no_grad()
def test_load_hand_built_plain_fp8(mmdit, tmp_path, calls):
    sd = {k: v.clone() for k, v in mmdit.state_dict().items()}
    names = [n for n in _linear_names(mmdit) if n.startswith("joint_blocks.")]
    for n in names:
        sd[f"{n}.weight"] = sd[f"{n}.weight"].to(torch.float8_e4m3fn)  # plain: scale 1
    path = tmp_path / "plain.safetensors"
    save_file(sd, str(path))
    ref = MMDiT(CFG).eval()
    ref.load_state_dict({k: v.float() for k, v in sd.items()})
    model = load_mmdit_fp8(path, "cpu", torch.float32, "weight_only")
    layers = _fp8_layers(model)
    assert sorted(layers) == sorted(names)
    assert all(float(m.weight_scale) == 1.0 for m in layers.values())
    assert sqnr(ref(*calls[0]), model(*calls[0])) > 60
    dense = load_mmdit_fp8(path, "cpu", torch.float32, "none")  # dequantised, no FP8Linear
    assert not _fp8_layers(dense) and sqnr(ref(*calls[0]), dense(*calls[0])) > 60


@torch.no_grad()
def test_export_native_round_trip_with_recipe(mmdit, f32_file, tmp_path, calls):
    recipe = calibrate(mmdit, calls, tune=True)
    out = tmp_path / "native.safetensors"
    export(f32_file, out, "native", recipe)
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["sd35fp8.fp8"])
        assert meta["format"] == "native" and meta["recipe"]["input_scales"]
        w = f.get_tensor("joint_blocks.0.x_block.mlp.fc1.weight")
        s = f.get_tensor("joint_blocks.0.x_block.mlp.fc1.weight_scale")
        assert w.dtype == torch.float8_e4m3fn and s.shape == (w.shape[0], 1) and s.dtype == torch.float32
        assert f.get_tensor("joint_blocks.0.x_block.mlp.fc1.input_scale").shape == ()
        assert f.get_tensor("pos_embed").dtype == torch.float32  # non-Linear copied unchanged
    model = load_mmdit_fp8(out, "cpu", torch.float32, None)
    assert model.fp8_report.mode == "static" and model.fp8_report.granularity == {"channel": len(_fp8_layers(model))}
    assert sqnr(mmdit(*calls[0]), model(*calls[0])) >= DB["static"]
    layout = describe_fp8_layout(open_file(out)["mmdit"])
    assert layout["format"] == "native" and layout["static_input_scales"] == len(_fp8_layers(model))


def _tiny_t5(seed: int = 5) -> T5EncoderModel:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                   dropout_rate=0.0, relative_attention_num_buckets=32)
    return T5EncoderModel(cfg).eval()  # transformers' T5 init (q scaled by (d_model*d_kv)^-0.5, as trained)


def _t5_state(model: T5EncoderModel) -> dict:
    return {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


@torch.no_grad()
def test_export_comfy_all_in_one_keeps_components(mmdit, tmp_path, calls):
    t5 = _tiny_t5()
    vae = {"decoder.conv_in.weight": torch.randn(8, 16, 3, 3), "encoder.conv_in.weight": torch.randn(8, 3, 3, 3)}
    sd = {"model.diffusion_model." + k: v.contiguous() for k, v in mmdit.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.items()})
    sd.update({"text_encoders.t5xxl.transformer." + k: v for k, v in _t5_state(t5).items()})
    src = tmp_path / "aio.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "aio_fp8.safetensors"
    export(src, out, "comfy", t5=True)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.diffusion_model.scaled_fp8").dtype == torch.float8_e4m3fn
        assert f.get_tensor("text_encoders.t5xxl.transformer.scaled_fp8").numel() == 0
        for k, v in vae.items():
            assert torch.equal(f.get_tensor("first_stage_model." + k), v)
        qkv = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv"
        assert f.get_tensor(qkv + ".weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor(qkv + ".scale_weight").shape == ()
        assert "model.diffusion_model.final_layer.linear.scale_weight" not in keys  # policy keeps it
        assert f.get_tensor("text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo.weight"
                            ).dtype == torch.float8_e4m3fn
    model = load_mmdit_fp8(out, "cpu", torch.float32, "weight_only")
    assert sqnr(mmdit(*calls[0]), model(*calls[0])) >= DB["weight_only"] - 3  # tensorwise scales
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = t5(input_ids=ids).last_hidden_state
    for mode in ("weight_only", "dynamic"):
        q = load_t5_fp8(out, "cpu", torch.float32, mode)
        assert q.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float8_e4m3fn
        assert sqnr(ref, q(input_ids=ids).last_hidden_state) >= 20, mode


@torch.no_grad()
def test_t5_quantise_on_load(tmp_path):
    t5 = _tiny_t5(7)
    path = tmp_path / "t5.safetensors"
    save_file(_t5_state(t5), str(path))
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = t5(input_ids=ids).last_hidden_state
    q = load_t5_fp8(path, "cpu", torch.float32, "dynamic")
    assert q.fp8_report.mode == "dynamic" and len(q.fp8_report.fp8_layers) == 2 * 7
    assert q.shared.weight is q.encoder.embed_tokens.weight
    assert sqnr(ref, q(input_ids=ids).last_hidden_state) >= 20


def test_streaming_writer_matches_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(5, 3, generator=g), "a.bias": torch.randn(3, generator=g).bfloat16(),
               "q": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn), "s": torch.tensor(0.5),
               "marker": torch.empty(0, dtype=torch.float8_e4m3fn), "ids": torch.arange(3)}
    ref, ours = tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"
    save_file(tensors, str(ref), metadata={"k": "v"})
    entries = [Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    write_safetensors(ours, entries, tensors.__getitem__, {"k": "v"})
    assert ours.read_bytes() == ref.read_bytes()
    with safe_open(str(ours), "pt") as f:
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k).reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


@torch.no_grad()
def test_calibrate_recipe_and_policy(mmdit, calls, tmp_path):
    recipe = calibrate(mmdit, calls, tune=True, budget_db=55.0)
    fp8 = [n for n in _linear_names(mmdit) if recipe.policy.decide(n) is None]
    base = [n for n in _linear_names(mmdit) if not n.startswith(("x_embedder", "t_embedder", "y_embedder",
                                                                 "final_layer"))]
    assert set(base) <= set(recipe.input_scales) and all(v > 0 for v in recipe.input_scales.values())
    s = recipe.stats
    assert s["static_db"] >= s["dynamic_db"] - 1.0
    assert s["policy_db"] >= s["static_db"] and len(fp8) < len(base)
    recipe.save(tmp_path / "r.json")
    assert Recipe.load(tmp_path / "r.json").input_scales == recipe.input_scales
    sens = measure_sensitivity(mmdit, calls[:1], "dynamic", layers=base[:4])
    pol, info = policy_from_sensitivity(sens, budget_db=1e9, max_keep=2)
    assert len(pol.keep) == 2 and info["kept"] == [n for n, _ in sens[:2]]
    from sd35fp8.fp8.policy_sd35 import write_policy

    out = tmp_path / "new" / "folder" / "policy.json"  # a missing folder is made
    write_policy(out, pol, info, "test")
    assert json.loads(out.read_text())["keep"] == list(pol.keep)


def test_cli_calibrate_then_quantize(tiny_random_checkpoint, tmp_path, capsys):
    from sd35fp8.cli import main

    path, _ = tiny_random_checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball on grass\n")
    recipe = tmp_path / "recipe.json"
    assert main(["calibrate", str(path), "--out", str(recipe), "--prompts", str(prompts), "--steps", "3",
                 "--size", "64", "--calls", "4", "--device", "cpu", "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err  # progress bars: every stage of a long calibration shows on stderr
    assert "calibration trajectories: 100%" in err and "calibration scoring: 100%" in err, err
    rec = Recipe.load(recipe)
    assert rec.input_scales and rec.stats["calls"] >= 2 and rec.stats["prompts"] == 2
    out = tmp_path / "aio_scaled.safetensors"
    assert main(["quantize", str(path), str(out), "--recipe", str(recipe), "--mode", "static", "--t5"]) == 0
    sources = open_file(out)
    assert set(sources) == set(open_file(path))  # all-in-one stays all-in-one
    layout = describe_fp8_layout(sources["mmdit"])
    assert layout["format"] == "comfy_scaled" and layout["static_input_scales"] == len(rec.input_scales)
    model = load_mmdit_fp8(out, "cpu", torch.float32, None)
    assert model.fp8_report.mode == "static"
    # ComfyUI casts x / scale_input to fp8 without a clamp: written scales never go below amax / 448
    for name, m in model.named_modules():
        if getattr(m, "input_scale", None) is not None:
            assert float(m.input_scale) >= rec.input_amax[name] / 448.0 * (1 - 1e-6), name
    every = tmp_path / "all_linears.safetensors"
    assert main(["quantize", str(path), str(every), "--all-linears"]) == 0
    kept = load_mmdit_fp8(every, "cpu", torch.float32, None).fp8_report.kept
    assert kept == [], kept  # for ComfyUI before its mixed-precision loader


def test_quantize_refuses_comfy_quant_inputs(tiny_random_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    from sd35fp8.errors import InputError
    from sd35fp8.checkpoints.export import export

    path, _ = tiny_random_checkpoint
    sd = load_file(str(path))
    sd["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.comfy_quant"] = torch.zeros(4, dtype=torch.uint8)
    bad = tmp_path / "new_format.safetensors"
    save_file(sd, str(bad), metadata={"_quantization_metadata": "{}"})
    with pytest.raises(InputError, match="comfy_quant"):
        export(bad, tmp_path / "o.safetensors")


def test_t5_policy_fits_t5xxl_only_and_fp8_files_default_to_weight_only(tmp_path):
    from sd35fp8.fp8.policy_sd35 import default_t5_policy, load_default_policy_data

    data = load_default_policy_data("t5xxl_default.json")  # measured by benchmarks/fp8_accuracy.py on the GPU
    assert data["num_layers"] == 24 and data["search"][-1]["measured_db"] >= 22
    keep = default_t5_policy(24).keep
    assert keep and all(k.startswith("encoder.block.") for k in keep)
    assert default_t5_policy(2).keep == ()  # another depth: the T5-XXL measurement does not apply
    t5 = _tiny_t5(3)
    src, out = tmp_path / "t5.safetensors", tmp_path / "t5_fp8.safetensors"
    save_file(_t5_state(t5), str(src))
    export(src, out, "comfy", t5=True)
    q = load_t5_fp8(out, "cpu", torch.float32)  # no mode: the file's precision, weight_only for T5
    assert q.fp8_report.mode == "weight_only" and len(q.fp8_report.fp8_layers) == 2 * 7
