"""The model merging nodes against ComfyUI's arithmetic written out here (ModelPatcher.add_patches + the "diff"
patch of comfy.lora.calculate_weight: w1 * strength_model + strength_patch * w2 in float32, cast back), on tiny
random MMDiTs in 16-bit and FP8, through the engines the loaders build; ModelSave's file read back by the loader;
a merge inside a workflow on the shipped model."""

from __future__ import annotations

import json
from dataclasses import replace
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd35fp8.checkpoints.load import load_mmdit
from sd35fp8.checkpoints.merge import ModuleSource, base_mmdit
from sd35fp8.fast.engine import fp8_mode_of
from sd35fp8.workflow.engine import EngineOptions, SD3Model
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.node_base import NodeContext
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS

from mmdit_cases import CONFIGS, build, inputs

CFG = CONFIGS["mmdit_qknorm"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    out = []
    for seed in (0, 1):
        sd = {k: v.to(torch.bfloat16).contiguous() for k, v in build(CFG, seed).state_dict().items()}
        save_file(sd, str(root / f"m{seed}.safetensors"))
        out.append(root / f"m{seed}.safetensors")
    return out


def model(path, fp8=None) -> SD3Model:
    return SD3Model(EngineOptions().mmdit(load_mmdit(path, fp8=fp8), "cpu"), name=path.name)


def ctx(tmp_path) -> NodeContext:
    return NodeContext(folders=ModelFolders(tmp_path), device="cpu")


def weights(m: SD3Model) -> dict[str, torch.Tensor]:
    src = ModuleSource(base_mmdit(m.mmdit), "m")
    return {k: src.get(k) for k in src.keys()}


def comfy_merge(w1: dict, w2: dict, strengths) -> dict:
    """ComfyUI: per key, weight (float32) *= strength_model (when != 1), += strength_patch * w2; cast back."""
    out = {}
    for k, a in w1.items():
        sp, sm = strengths(k)
        w = a.float().clone()
        if sm != 1.0:
            w *= sm
        w += sp * w2[k].float()
        out[k] = w.to(a.dtype)
    return out


@pytest.mark.parametrize("node, args, strengths", [
    ("ModelMergeSimple", {"ratio": 0.3}, lambda k: (0.7, 0.3)),
    ("ModelMergeSubtract", {"multiplier": 0.8}, lambda k: (-0.8, 0.8)),
    ("ModelMergeAdd", {}, lambda k: (1.0, 1.0)),
    ("ModelMergeSD3_2B", {"pos_embed.": 0.9, "x_embedder.": 1.0, "context_embedder.": 0.2, "y_embedder.": 1.0,
                          "t_embedder.": 1.0, **{f"joint_blocks.{i}.": 1.0 for i in range(24)},
                          "joint_blocks.1.": 0.25, "joint_blocks.2.": 0.0, "final_layer.": 0.6},
     # the longest matching input name; "pos_embed" (no dot) matches none and takes the first input's ratio (the
     # inputs in the prompt's order, as ComfyUI passes them)
     lambda k: next(((1 - r, r) for p, r in (("joint_blocks.1.", 0.25), ("joint_blocks.2.", 0.0),
                                             ("context_embedder.", 0.2), ("final_layer.", 0.6), ("pos_embed", 0.9))
                     if k.startswith(p)), (0.0, 1.0))),
])
def test_merges_match_comfyui(files, tmp_path, node, args, strengths):
    m1, m2 = model(files[0]), model(files[1])
    (merged,) = NODE_CLASS_MAPPINGS[node](ctx(tmp_path)).merge(m1, m2, **args)
    want = comfy_merge(weights(m1), weights(m2), strengths)
    got = weights(merged)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    x, sigma, context, pooled = inputs(CFG, 8, 8)
    with torch.no_grad():  # the merged engine runs
        assert torch.isfinite(merged.mmdit(x, sigma, context, pooled)).all()


def test_fp8_merge_keeps_model1_mode(files, tmp_path):
    """FP8 weights are dequantised, merged in float32 and quantised again in model1's mode."""
    m1, m2 = model(files[0], "dynamic"), model(files[1], "weight_only")
    (merged,) = NODE_CLASS_MAPPINGS["ModelMergeSimple"](ctx(tmp_path)).merge(m1, m2, 0.5)
    assert fp8_mode_of(base_mmdit(merged.mmdit)) == "dynamic"
    want = comfy_merge(weights(m1), weights(m2), lambda k: (0.5, 0.5))
    got = weights(merged)
    for k in want:
        err = (got[k].float() - want[k].float()).norm() / want[k].float().norm().clamp_min(1e-12)
        assert err < 0.05, (k, float(err))  # one e4m3 rounding of the merged weight


def test_identity_merge_and_refusals(files, tmp_path):
    m1, m2 = model(files[0]), model(files[1])
    node = NODE_CLASS_MAPPINGS["ModelMergeSimple"](ctx(tmp_path))
    assert node.merge(m1, m2, 1.0)[0] is m1  # ratio 1: no weight changes, no rebuild
    m1s = m1.with_shift(5.0)
    assert node.merge(m1s, m2, 0.5)[0].shift == 5.0  # model1's patches kept (ComfyUI clones model1)


def lora_file(path, seed: int = 5):
    """A kohya-style LoRA (rank 4, alpha 2) on joint block 1's x qkv; returns (path, its delta [576, 192])."""
    g = torch.Generator().manual_seed(seed)
    down, up = torch.randn(4, CFG.hidden_size, generator=g) * 0.1, torch.randn(3 * CFG.hidden_size, 4, generator=g)
    stem = "diffusion_model.joint_blocks.1.x_block.attn.qkv"
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)},
              str(path))
    return path, up @ down * (2.0 / 4)


@pytest.mark.parametrize("fp8", [None, "dynamic"])
def test_loras_are_baked_before_the_merge(files, tmp_path, fp8):
    """ComfyUI patches model1 in order: its LoRA, then the merge: (w1 + s * delta) * r + (1 - r) * w2. The merged
    MODEL carries no LoRA any more (it is in the weights)."""
    path, delta = lora_file(tmp_path / "l.safetensors")
    m1, m2 = model(files[0], fp8), model(files[1], fp8)
    base = weights(m1)
    lora_m1 = SD3Model(m1.mmdit, name="a", loras=((str(path), 0.7),))
    (merged,) = NODE_CLASS_MAPPINGS["ModelMergeSimple"](ctx(tmp_path)).merge(lora_m1, m2, 0.25)
    assert merged.loras == ()
    key = "joint_blocks.1.x_block.attn.qkv.weight"
    w1 = {**base, key: (base[key].float() + 0.7 * delta).to(base[key].dtype)}
    want = comfy_merge(w1, weights(m2), lambda k: (0.75, 0.25))
    got = weights(merged)
    for k in want:
        err = (got[k].float() - want[k].float()).norm() / want[k].float().norm().clamp_min(1e-12)
        assert err < (0.05 if fp8 else 0.004), (k, float(err))
    assert weights(m1)[key].equal(base[key])  # model1's own weights untouched


def test_model_save_reads_back(files, tmp_path):
    """ModelSave: ComfyUI's keys and metadata; the loader reads the file back to the same weights (an FP8 model's
    layers dequantised to bfloat16)."""
    m = model(files[0], "dynamic")
    node = NODE_CLASS_MAPPINGS["ModelSave"](ctx(tmp_path))
    node.save(m, "diffusion_models/merged", prompt={"1": {"class_type": "ModelSave"}}, extra_pnginfo={"a": 1})
    out = node.ctx.folders.output_dir / "diffusion_models"
    path = out / "merged_00001_.safetensors"
    assert path.is_file(), sorted(p.name for p in out.parent.rglob("*"))
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("model.diffusion_model.") for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-v3-medium" and json.loads(meta["a"]) == 1
    back = SD3Model(EngineOptions().mmdit(load_mmdit(path), "cpu"))
    got, want = weights(back), weights(m)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].to(got[k].dtype).float(), rtol=0, atol=0, msg=k)
    node.save(m, "diffusion_models/merged")  # the counter moves on
    assert (out / "merged_00002_.safetensors").is_file()


def test_merge_in_a_workflow(tmp_path):
    """The shipped model merged with itself at 0.5 (w * 0.5 + w * 0.5 = w in float32) gives the unmerged image."""
    from sd35fp8.tiny import SHIPPED_CHECKPOINT, SHIPPED_T5_TOKENIZER
    from sd35fp8.workflow import run_workflow

    if not SHIPPED_CHECKPOINT.exists():
        pytest.skip("shipped model weights not built")
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(SHIPPED_CHECKPOINT, tmp_path / "models" / "checkpoints" / "a.safetensors")
    shutil.copy(SHIPPED_CHECKPOINT, tmp_path / "models" / "checkpoints" / "b.safetensors")
    shutil.copy(SHIPPED_T5_TOKENIZER, tmp_path / "models" / "checkpoints" / "spiece.model")

    def prompt(model_ref):
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a.safetensors"}},
            "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b.safetensors"}},
            "3": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": 0.5}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red circle"}},
            "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "7": {"class_type": "KSampler", "inputs": {"model": model_ref, "seed": 3, "steps": 2, "cfg": 4.0,
                                                       "sampler_name": "euler", "scheduler": "simple",
                                                       "positive": ["4", 0], "negative": ["5", 0],
                                                       "latent_image": ["6", 0], "denoise": 1.0}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "m"}},
        }

    images = []
    for ref in (["3", 0], ["1", 0]):
        wf = tmp_path / "wf.json"
        wf.write_text(json.dumps(prompt(ref)))
        out = run_workflow(wf, models_dir=tmp_path / "models", output_dir=tmp_path / "out", device="cpu")
        assert out.success, out.error
        images.append(out)
    from PIL import Image
    import numpy as np

    files = sorted((tmp_path / "out").glob("m_*.png"))
    assert len(files) == 2
    a, b = (np.asarray(Image.open(f)) for f in files)
    assert np.array_equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_merge_on_the_gpu_engine_gpu(files, tmp_path):
    """On CUDA (Triton dequantisation, the fused FP8 engine with CUDA graphs): the merged engine's step against the
    float32 forward of ComfyUI's merged weights."""
    from sd35fp8.fp8.scaling import sqnr
    from sd35fp8.models.mmdit import MMDiT

    dev = torch.device("cuda")
    m1, m2 = (SD3Model(EngineOptions().mmdit(load_mmdit(f, device=dev, fp8="dynamic"), dev), name=f.name)
              for f in files)
    node = NODE_CLASS_MAPPINGS["ModelMergeSimple"](NodeContext(folders=ModelFolders(tmp_path), device=dev))
    (merged,) = node.merge(m1, m2, 0.4)
    assert fp8_mode_of(base_mmdit(merged.mmdit)) == "dynamic"
    want = comfy_merge(weights(m1), weights(m2), lambda k: (0.6, 0.4))
    ref = MMDiT(CFG).to(dev)
    ref.load_state_dict({k: v.float() for k, v in want.items()})
    x, sigma, context, pooled = (t.to(dev) for t in inputs(CFG, 16, 16))
    with torch.no_grad():
        got = [merged.mmdit(x, sigma, context, pooled).float() for _ in range(3)]  # eager, capture, replay
        r = ref(x, sigma, context, pooled).float()
    assert torch.equal(got[1], got[2])
    assert sqnr(r, got[2]) > 20.0


def test_server_bounds_model_nodes_per_prompt():
    """Each merge holds a new MMDiT and each ModelSave writes one: the server refuses more than --max-model-nodes."""
    from sd35fp8.server.validation import Limits, RequestError, check_prompt_work

    merge = {"class_type": "ModelMergeSimple", "inputs": {"model1": ["9", 0], "model2": ["8", 0], "ratio": 0.5}}
    save = {"class_type": "ModelSave", "inputs": {"model": ["1", 0], "filename_prefix": "x"}}
    check_prompt_work({"1": merge, "2": save}, Limits())
    with pytest.raises(RequestError) as e:
        check_prompt_work({"1": merge, "2": dict(merge), "3": save}, Limits())
    assert e.value.status == 400 and "--max-model-nodes" in e.value.details
    check_prompt_work({"1": merge, "2": dict(merge), "3": save}, Limits(max_model_nodes=3))


def test_checkpoint_clip_vae_save_read_back(tmp_path):
    """CheckpointSave writes ComfyUI's all-in-one layout, which the loader reads back to the same MMDiT, VAE and text
    encoders, with the CLIP's and MODEL's LoRAs baked in; CLIPSave writes one file per encoder, VAESave the VAE."""
    from sd35fp8.checkpoints.sources import resolve
    from sd35fp8.tiny import SHIPPED_CHECKPOINT, SHIPPED_T5_TOKENIZER
    from sd35fp8.workflow.engine import load_checkpoint

    if not SHIPPED_CHECKPOINT.exists():
        pytest.skip("shipped model weights not built")
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    shutil.copy(SHIPPED_CHECKPOINT, src_dir / "a.safetensors")
    shutil.copy(SHIPPED_T5_TOKENIZER, src_dir / "spiece.model")
    m, clip, vae = load_checkpoint(src_dir / "a.safetensors", "cpu", None)
    path, delta = lora_file(tmp_path / "l.safetensors")
    lm = SD3Model(m.mmdit, name=m.name, loras=((str(path), 0.5),))
    c = ctx(tmp_path)
    NODE_CLASS_MAPPINGS["CheckpointSave"](c).save(lm, clip, vae, "checkpoints/all", prompt={"1": {}})
    out = c.folders.output_dir / "checkpoints" / "all_00001_.safetensors"
    assert set(resolve(str(out)).__dict__) >= {"mmdit", "vae", "clip_l", "clip_g", "t5xxl"}
    shutil.copy(SHIPPED_T5_TOKENIZER, out.parent / "spiece.model")
    m2, clip2, vae2 = load_checkpoint(out, "cpu", None)
    key = "joint_blocks.1.x_block.attn.qkv.weight"
    want = weights(m)
    want[key] = (want[key].float() + 0.5 * delta).to(want[key].dtype)
    got = weights(m2)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    for a, b in ((vae, vae2), (clip.encoder.clip_l, clip2.encoder.clip_l), (clip.encoder.clip_g, clip2.encoder.clip_g),
                 (clip.encoder.t5, clip2.encoder.t5)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    NODE_CLASS_MAPPINGS["CLIPSave"](c).save(clip, "clip/enc")
    names = sorted(p.name for p in (c.folders.output_dir / "clip").iterdir())
    assert names == ["enc_clip_g_00001_.safetensors", "enc_clip_l_00001_.safetensors", "enc_t5xxl_00001_.safetensors"]
    with safe_open(str(c.folders.output_dir / "clip" / names[1]), "pt") as f:
        assert set(f.keys()) == set(clip.encoder.clip_l.state_dict()) and f.metadata()["format"] == "pt"
    NODE_CLASS_MAPPINGS["VAESave"](c).save(vae, "vae/v")
    with safe_open(str(c.folders.output_dir / "vae" / "v_00001_.safetensors"), "pt") as f:
        assert set(f.keys()) == set(vae.state_dict())


def test_clip_merges_match_comfyui(tmp_path):
    """CLIPMergeSimple / Subtract / Add on the shipped text encoders and a perturbed copy: every weight as ComfyUI's
    patch arithmetic, position ids and logit scales untouched, clip1 itself unchanged, the merged CLIP encodes."""
    import copy

    from sd35fp8.tiny import SHIPPED_CHECKPOINT, SHIPPED_T5_TOKENIZER
    from sd35fp8.workflow.engine import encode_text, load_checkpoint

    if not SHIPPED_CHECKPOINT.exists():
        pytest.skip("shipped model weights not built")
    shutil.copy(SHIPPED_CHECKPOINT, tmp_path / "a.safetensors")
    shutil.copy(SHIPPED_T5_TOKENIZER, tmp_path / "spiece.model")
    _, clip1, _ = load_checkpoint(tmp_path / "a.safetensors", "cpu", None)
    clip2 = replace(clip1, encoder=copy.deepcopy(clip1.encoder), name="b")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in clip2.encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
    before = {k: v.clone() for k, v in clip1.encoder.state_dict().items()}
    c = ctx(tmp_path)
    cases = [("CLIPMergeSimple", {"ratio": 0.3}, (0.7, 0.3)), ("CLIPMergeSubtract", {"multiplier": 0.5}, (-0.5, 0.5)),
             ("CLIPMergeAdd", {}, (1.0, 1.0))]
    for node, args, (sp, sm) in cases:
        (merged,) = NODE_CLASS_MAPPINGS[node](c).merge(clip1, clip2, **args)
        got, a, b = merged.encoder.state_dict(), clip1.encoder.state_dict(), clip2.encoder.state_dict()
        for k in a:
            if k.endswith((".position_ids", ".logit_scale")):
                assert torch.equal(got[k], a[k]), k
                continue
            want = a[k].float()
            if sm != 1.0:
                want = want * sm
            want = (want + sp * b[k].float()).to(a[k].dtype)
            assert torch.equal(got[k], want), (node, k)
        assert encode_text(merged, "a red circle")[0][0].isfinite().all()
    for k, v in clip1.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert NODE_CLASS_MAPPINGS["CLIPMergeSimple"](c).merge(clip1, clip2, 1.0)[0] is clip1
