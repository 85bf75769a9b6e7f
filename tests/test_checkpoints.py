"""Checkpoint files and layouts: every layout resolves, loads equal tensors, and every error names its file."""

from __future__ import annotations

import json

import pytest
import torch
from ckpt_fixtures import (T5_LINEARS, ckpt_all_in_one, ckpt_clip, ckpt_diffusers_folder, ckpt_mmdit,
                           ckpt_plain_fp8, ckpt_save, ckpt_scaled_fp8, ckpt_t5, ckpt_text_encoders_folder, ckpt_vae)

from sd35fp8.checkpoints.info import describe_file, format_info
from sd35fp8.checkpoints.load import load_into, load_mmdit, load_text_encoders, load_vae
from sd35fp8.checkpoints.safetensors_file import SafetensorsFile
from sd35fp8.checkpoints.sources import open_components, resolve
from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.models.mmdit import MMDiT

F32 = torch.float32


def assert_loaded(module: torch.nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    got = module.state_dict()
    for k, v in expected.items():
        if k in skip:
            continue
        assert k in got, k
        assert got[k].dtype == F32, k
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=0, msg=k)


def assert_fp8_loaded(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """fp8 T5 files load straight into FP8Linear layers: the dequantised weights equal the file's."""
    from sd35fp8.fp8.linear import FP8Linear

    layers = {n: m for n, m in module.named_modules() if isinstance(m, FP8Linear)}
    assert layers, "no FP8 layers"
    for k, v in expected.items():
        name = k.removesuffix(".weight")
        if name in layers:
            assert layers[name].weight.dtype == torch.float8_e4m3fn, k
            torch.testing.assert_close(layers[name].dequantized_weight(F32), v.float(), rtol=0, atol=0, msg=k)
        elif k in module.state_dict():
            torch.testing.assert_close(module.state_dict()[k].float(), v.float(), rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def aio(tmp_path_factory):
    path = tmp_path_factory.mktemp("aio") / "sd35_all_in_one.safetensors"
    return path, ckpt_all_in_one(path)


# ---- layouts ---------------------------------------------------------------------------------------------
def test_original_single_file(tmp_path):
    path = tmp_path / "sd3.5_tiny.safetensors"
    parts = ckpt_all_in_one(path, text=False)
    comps = resolve(path)
    assert comps.present() == ["mmdit", "vae"]
    assert comps.mmdit.layout == "original single file"
    assert_loaded(load_mmdit(path, dtype=F32), parts["mmdit"])
    assert_loaded(load_vae(path, dtype=F32), parts["vae"])
    model = load_mmdit(path)  # default bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_all_in_one_with_text_encoders(aio):
    path, parts = aio
    comps = resolve(path)
    assert comps.present() == ["mmdit", "vae", "clip_l", "clip_g", "t5xxl"]
    assert comps.clip_l.layout == "ComfyUI all-in-one"
    assert "text_encoders.clip_g." in comps.origins["clip_g"]
    enc = load_text_encoders(comps, dtype=F32)
    assert_loaded(enc.clip_l, parts["clip_l"])
    assert_loaded(enc.clip_g, parts["clip_g"])
    assert_loaded(enc.t5xxl, parts["t5xxl"])
    assert enc.t5xxl.shared.weight is enc.t5xxl.encoder.embed_tokens.weight  # tie kept
    pos = enc.clip_l.text_model.embeddings.position_ids
    assert not pos.is_meta and pos[0, 5] == 5


def test_mmdit_only_and_vae_only_files(tmp_path):
    mm, vae = ckpt_mmdit(), ckpt_vae()
    bare = ckpt_save(mm, tmp_path / "diffusion_models" / "bare.safetensors")
    prefixed = ckpt_save(mm, tmp_path / "diffusion_models" / "prefixed.safetensors", "model.diffusion_model.")
    vae_file = ckpt_save(vae, tmp_path / "vae" / "vae.safetensors")
    for path in (bare, prefixed):
        assert resolve(path).present() == ["mmdit"]
        assert_loaded(load_mmdit(path, dtype=F32), mm)
    assert_loaded(load_vae(vae_file, dtype=F32), vae)


def test_separate_text_encoders_fp16_plain_and_scaled_fp8(aio, tmp_path):
    path, _ = aio
    l_sd, g_sd, t5 = ckpt_clip(32, 1, 7), ckpt_clip(48, 2, 8), ckpt_t5(9)
    clip_l = ckpt_save({k: v.half() for k, v in l_sd.items()}, tmp_path / "clip_l.safetensors")
    clip_g = ckpt_save({k: v.half() for k, v in g_sd.items()}, tmp_path / "clip_g.safetensors")
    plain, plain_expected = ckpt_plain_fp8(t5)
    scaled, scaled_expected = ckpt_scaled_fp8(t5)
    t5_plain = ckpt_save(plain, tmp_path / "t5xxl_fp8_e4m3fn.safetensors")
    t5_scaled = ckpt_save(scaled, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")

    enc = load_text_encoders(path, dtype=F32, clip_l=clip_l, clip_g=clip_g, t5xxl=t5_scaled)
    assert_loaded(enc.clip_l, {k: v.half() for k, v in l_sd.items()})
    assert_loaded(enc.clip_g, {k: v.half() for k, v in g_sd.items()})
    assert_fp8_loaded(enc.t5xxl, scaled_expected)  # fp8 stays fp8; W_fp8 * scale_weight = W
    enc = load_text_encoders(path, dtype=F32, t5xxl=t5_plain)
    assert_fp8_loaded(enc.t5xxl, plain_expected)

    info = describe_file(t5_scaled)
    fp8 = info["components"]["t5xxl"]["fp8"]
    assert fp8 == {"scaling": "scaled", "fp8_tensors": 14, "scale_weight": 14, "scale_input": 14,
                   "marker": "fp8_e4m3fn"}
    assert describe_file(t5_plain)["components"]["t5xxl"]["fp8"]["scaling"] == "plain"
    assert "scaled (14 scale_weight, 14 scale_input" in format_info(info)


def test_scaled_fp8_mmdit(tmp_path):
    mm = ckpt_mmdit()
    linears = tuple(k for k in mm if k.endswith(".weight") and mm[k].ndim == 2)
    scaled, expected = ckpt_scaled_fp8(mm, linears)
    path = ckpt_save(scaled, tmp_path / "sd35_fp8_scaled.safetensors", "model.diffusion_model.")
    assert_loaded(load_mmdit(path, dtype=F32, fp8="none"), expected)  # fp8="none": dequantised
    info = describe_file(path)
    assert info["components"]["mmdit"]["fp8"]["scaling"] == "scaled"
    assert "MMDiT-X" in info["kinds"][0]


def test_diffusers_folder(tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_sd3_transformer_checkpoint_to_diffusers

    ref = ckpt_diffusers_folder(tmp_path)
    comps = resolve(tmp_path)
    assert comps.present() == ["mmdit", "vae", "clip_l", "clip_g", "t5xxl"]
    assert comps.t5xxl.files[0].name.startswith("model-0000")  # sharded set
    assert set(comps.tokenizers) == {"t5xxl"}
    # diffusers' own converter maps our original-key tensors back onto the saved diffusers ones
    mm = load_mmdit(tmp_path, dtype=F32).state_dict()
    back = convert_sd3_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v for k, v in mm.items()})
    for k, v in ref["transformer"].state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)
    vae = load_vae(tmp_path, dtype=F32).state_dict()
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in vae.items()}, dict(ref["vae"].config))
    for k, v in ref["vae"].state_dict().items():
        torch.testing.assert_close(back[k].reshape(v.shape), v, rtol=0, atol=0, msg=k)
    enc = load_text_encoders(tmp_path, dtype=F32)
    assert_loaded(enc.clip_g, ref["clip_g"].state_dict(), skip=("text_model.embeddings.position_ids",))
    assert_loaded(enc.t5xxl, ref["t5xxl"].state_dict())


def test_hf_cache_repo_id(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--stabilityai--stable-diffusion-3.5-tiny" / "snapshots" / "abc123"
    parts = ckpt_all_in_one(snap / "sd3.5_tiny.safetensors", text=False)
    text = ckpt_text_encoders_folder(snap / "text_encoders")
    (snap / "tokenizer_3").mkdir()
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    comps = resolve("stabilityai/stable-diffusion-3.5-tiny")
    assert comps.present() == ["mmdit", "vae", "clip_l", "clip_g", "t5xxl"]
    assert comps.t5xxl.files[0].name == "t5xxl_fp16.safetensors"  # 16-bit preferred over fp8, noted
    assert any("t5xxl_fp8_e4m3fn" in n for n in comps.notes)
    assert comps.tokenizers["t5xxl"] == snap / "tokenizer_3"
    assert_loaded(load_mmdit("stabilityai/stable-diffusion-3.5-tiny", dtype=F32), parts["mmdit"])
    enc = load_text_encoders(comps, dtype=F32)
    assert_loaded(enc.clip_g, {k: v.half() for k, v in text["clip_g"].items()})

    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*models--org--missing"):
        resolve("org/missing")


def test_sharded_index(tmp_path):
    mm = ckpt_mmdit()
    keys = sorted(mm)
    half = len(keys) // 2
    ckpt_save({k: mm[k] for k in keys[:half]}, tmp_path / "m-1.safetensors")
    ckpt_save({k: mm[k] for k in keys[half:]}, tmp_path / "m-2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: "m-1.safetensors" if i < half else "m-2.safetensors"
                                                for i, k in enumerate(keys)}}))
    sf = SafetensorsFile(index)
    assert len(sf) == len(mm) and sf.shape("pos_embed") == tuple(mm["pos_embed"].shape)
    assert_loaded(load_mmdit(index, dtype=F32), mm)


# ---- streaming -------------------------------------------------------------------------------------------------
def test_streams_one_tensor_at_a_time(tmp_path):
    mm = ckpt_mmdit()
    path = ckpt_save(mm, tmp_path / "m.safetensors")
    source = open_components(path).mmdit
    from sd35fp8.models.mmdit import MMDiTConfig

    with torch.device("meta"):
        model = MMDiT(MMDiTConfig.from_state_dict(source.shapes()))
    reads: list[str] = []
    real_get = source.get

    def counting_get(key, device="cpu"):
        if reads:  # the previous tensor is already in the module before the next read
            prev = model.get_parameter(reads[-1]) if reads[-1] != "pos_embed" else model.pos_embed
            assert not prev.is_meta, reads[-1]
        reads.append(key)
        return real_get(key, device)

    source.get = counting_get
    load_into(model, source, dtype=F32)
    assert sorted(reads) == sorted(mm)  # each key read exactly once


# ---- errors -------------------------------------------------------------------------------------------------
def test_key_errors_name_keys(tmp_path):
    mm = ckpt_mmdit()
    missing = dict(mm)
    del missing["joint_blocks.1.x_block.mlp.fc2.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: joint_blocks\.1\.x_block\.mlp\.fc2\.weight") as e:
        load_mmdit(ckpt_save(missing, tmp_path / "missing.safetensors"))
    assert "missing.safetensors" in str(e.value)
    extra = dict(mm, **{"joint_blocks.0.x_block.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: joint_blocks\.0\.x_block\.extra\.weight"):
        load_mmdit(ckpt_save(extra, tmp_path / "extra.safetensors"))
    wrong = dict(mm, **{"joint_blocks.0.x_block.mlp.fc1.bias": torch.zeros(7)})
    with pytest.raises(CheckpointError, match=r"fc1\.bias: file \(7,\) vs model \(512,\)"):
        load_mmdit(ckpt_save(wrong, tmp_path / "wrong.safetensors"))


def test_file_errors(tmp_path):
    path = ckpt_save(ckpt_vae(), tmp_path / "vae.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=f"file is truncated: expected {len(data)} bytes, found {len(data) - 100}"):
        SafetensorsFile(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="junk.safetensors is not a safetensors file"):
        resolve(junk)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(3)}}, ckpt)
    with pytest.raises(CheckpointError, match="pickle"):
        load_mmdit(ckpt)
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nowhere.safetensors"):
        resolve(tmp_path / "nowhere.safetensors")
    with pytest.raises(CheckpointError, match="missing key nope in .*vae.safetensors"):
        SafetensorsFile(path).get("nope")


def test_wrong_kind(aio, tmp_path):
    path, parts = aio
    vae_file = ckpt_save(ckpt_vae(), tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"no MMDiT \(diffusion model\) found in .*vae.safetensors.*holds: VAE"):
        load_mmdit(vae_file)
    clip_l = ckpt_save(parts["clip_l"], tmp_path / "clip_l.safetensors")
    with pytest.raises(CheckpointError, match="given as t5xxl but holds a CLIP text encoder"):
        resolve(path, t5xxl=clip_l)
    big_g = ckpt_save(ckpt_clip(1280, 1, 1), tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError, match=r"holds CLIP-G text encoder \(hidden 1280\), given as clip_l"):
        resolve(path, clip_l=big_g)
    assert resolve(big_g).present() == ["clip_g"]  # standard width decides alone
    with pytest.raises(CheckpointError, match="cannot tell whether .* is CLIP-L or CLIP-G"):
        resolve(clip_l)  # a lone tiny CLIP: width 32 is neither
    with pytest.raises(InputError, match="unknown fp8 mode|fp8"):
        load_mmdit(path, fp8="e5m2")


def test_info_all_in_one(aio):
    path, _ = aio
    info = describe_file(path)
    assert info["layout"] == "ComfyUI all-in-one"
    assert set(info["components"]) == {"mmdit", "vae", "clip_l", "clip_g", "t5xxl"}
    assert info["components"]["clip_g"]["kind"] == "CLIP-G"
    assert info["components"]["mmdit"]["dtypes"] == {"fp32": len(ckpt_mmdit())}
    assert info["file_size"] == path.stat().st_size
    text = format_info(info)
    assert "MMDiT-X: depth 2" in text and "fp8 scaling: none" in text


# ---- files as people have them: loader edge cases (session 7) --------------------------------
def _text_files(tmp_path, clip_g=None, t5=None) -> dict:
    """An MMDiT-only file and separate clip_l / clip_g / t5xxl files (overrides for the last two)."""
    base = ckpt_save(ckpt_mmdit(), tmp_path / "mmdit.safetensors")
    return dict(path=base, clip_l=ckpt_save(ckpt_clip(32, 1, 3), tmp_path / "clip_l.safetensors"),
                clip_g=ckpt_save(clip_g if clip_g is not None else ckpt_clip(48, 2, 4), tmp_path / "clip_g.safetensors"),
                t5xxl=ckpt_save(t5 if t5 is not None else ckpt_t5(), tmp_path / "t5xxl.safetensors"))


def test_scale_input_of_one_is_a_placeholder(tmp_path):
    """ComfyUI convert_old_quants drops a scale_input of 1.0: such files are not static FP8 (an MMDiT
    runs its device's best mode; T5 runs weight_only, as ComfyUI never applies a text encoder's
    scale_input)."""
    from sd35fp8.checkpoints.fp8_load import load_mmdit_fp8, load_t5_fp8

    t5_file = ckpt_save(ckpt_scaled_fp8(ckpt_t5())[0], tmp_path / "t5.safetensors")
    assert load_t5_fp8(t5_file, "cpu", torch.float32, None).fp8_report.mode == "weight_only"
    mm = ckpt_mmdit()
    linears = tuple(k for k, v in mm.items() if k.startswith("joint_blocks.") and k.endswith(".weight") and v.ndim == 2)
    scaled, _ = ckpt_scaled_fp8(mm, linears)
    model = load_mmdit_fp8(ckpt_save(scaled, tmp_path / "mm.safetensors"), "cpu", torch.float32)
    assert model.fp8_report.mode != "static"
    assert all(getattr(m, "input_scale", None) is None for m in model.modules())


def test_float8_e5m2_weights_are_dequantised(tmp_path):
    sd = ckpt_t5()
    e5 = {k: v.to(torch.float8_e5m2) if k.endswith(T5_LINEARS) else v for k, v in sd.items()}
    files = _text_files(tmp_path, t5=e5)
    enc = load_text_encoders(files.pop("path"), dtype=F32, **files).t5xxl
    want = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].to(torch.float8_e5m2).float()
    got = enc.get_submodule("encoder.block.0.layer.0.SelfAttention.q")
    w = got.dequantized_weight(torch.float32) if hasattr(got, "dequantized_weight") else got.weight
    torch.testing.assert_close(w.float(), want, rtol=0.07, atol=1e-3)
    mm = {k: (v.to(torch.float8_e5m2) if k.endswith("qkv.weight") else v) for k, v in ckpt_mmdit().items()}
    load_mmdit(ckpt_save(mm, tmp_path / "mm_e5m2.safetensors"), dtype=F32)  # no error: dequantised


def test_clip_g_without_text_projection_is_identity(tmp_path, caplog):
    """ComfyUI clip_model.py: a missing text_projection is eye(embed_dim)."""
    g = {k: v for k, v in ckpt_clip(48, 2, 4).items() if "text_projection" not in k}
    files = _text_files(tmp_path, clip_g=g)
    with caplog.at_level("WARNING"):
        enc = load_text_encoders(files.pop("path"), dtype=F32, **files).clip_g
    torch.testing.assert_close(enc.text_projection.weight, torch.eye(48))
    assert "identity projection" in caplog.text


def test_diffusers_variant_shards(tmp_path):
    """`save_pretrained(variant="fp16")` shards: model.safetensors.index.fp16.json + model.fp16-0000N-of-0000M."""
    from ckpt_fixtures import ckpt_t5_config
    from transformers import T5EncoderModel

    from sd35fp8.checkpoints.sources import _component_file

    folder = tmp_path / "text_encoder_3"
    T5EncoderModel(ckpt_t5_config()).save_pretrained(folder, max_shard_size="20KB", variant="fp16")
    index = _component_file(folder)
    assert index.name == "model.safetensors.index.fp16.json"
    assert len(SafetensorsFile(index).keys()) > 10


def test_diffusers_loader_node(tmp_path):
    """DiffusersLoader: the folders with a model_index.json under models/diffusers, loaded as CheckpointLoaderSimple
    would load them (the same MMDiT and VAE weights as the loaders read from the folder)."""
    from sd35fp8.workflow.folders import ModelFolders
    from sd35fp8.workflow.node_base import NodeContext
    from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS

    folder = tmp_path / "models" / "diffusers" / "sd35-tiny"
    folder.mkdir(parents=True)
    ckpt_diffusers_folder(folder)
    folders = ModelFolders(tmp_path)
    cls = NODE_CLASS_MAPPINGS["DiffusersLoader"]
    assert cls.INPUT_TYPES(folders)["required"]["model_path"][0] == ["sd35-tiny"]
    node = cls(NodeContext(folders=folders, dtype=F32))
    model, clip, vae = node.load_checkpoint("sd35-tiny", output_clip=False)  # the fixture's encoders are loose
    assert clip is None                                                            # parts, no working CLIP
    want = load_mmdit(folder, dtype=F32).state_dict()
    got = model.mmdit.model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    for k, v in load_vae(folder, dtype=F32).state_dict().items():
        torch.testing.assert_close(vae.state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(InputError, match="not found"):
        node.load_checkpoint("other")
    with pytest.raises(InputError):
        node.load_checkpoint("../escape")
