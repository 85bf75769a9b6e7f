"""Tiny model training: smoke run writes a loadable all-in-one checkpoint in the original layout, and
the training conditioning equals the pipeline's SD3TextEncoder on the same tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sd35fp8.defaults import DEFAULTS_METADATA_KEY
from sd35fp8.tiny import data, export, spec, train, world
from sd35fp8.tiny.export import PREFIXES


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_smoke")
    rec = train.main(["--out", str(out), "--smoke", "--seed", "0"])
    return out, rec


def test_smoke_run_writes_loadable_checkpoint(smoke_run):
    out, rec = smoke_run
    ckpt = out / export.CHECKPOINT_NAME
    assert ckpt.is_file() and (out / "spiece.model").is_file() and (out / "train_log.json").is_file()
    with safe_open(str(ckpt), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert dtypes == {torch.float16}
    for prefix in PREFIXES.values():
        assert any(k.startswith(prefix) for k in keys), prefix
    assert all(k.startswith(tuple(PREFIXES.values())) for k in keys)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight" in keys  # qk-norm
    assert "text_encoders.clip_g.transformer.text_projection.weight" in keys
    assert "text_encoders.t5xxl.transformer.shared.weight" in keys
    defaults = json.loads(meta[DEFAULTS_METADATA_KEY])
    assert defaults["sampler"] == "euler_ancestral" and defaults["width"] == 32

    mmdit, vae, text, tokenizer = export.load_back(ckpt)
    s = spec.TinySpec.smoke()
    assert mmdit.config.depth == s.depth and mmdit.config.qk_norm and not mmdit.config.x_block_self_attn_layers
    assert mmdit.config.context_dim == s.t5_width and mmdit.config.pooled_dim == 2 * s.clip_width
    assert vae.config.latent_channels == 16 and vae.config.downscale == 8
    assert text.clip_l.config.hidden_act == "quick_gelu" and text.clip_g.config.hidden_act == "gelu"
    assert tokenizer.t5 is not None and tokenizer.t5.eos_id == 1 and tokenizer.t5.pad_id == 0

    log = json.loads((out / "train_log.json").read_text())
    assert log["mmdit_steps"] == 3 and log["mmdit_loss"] and "heldout" in log["eval"]
    # the latent fold: to_model_space(encode(x)) is standardised over the training set
    assert abs(log["latents_model_space"]["mean"]) < 0.05
    assert abs(log["latents_model_space"]["std"] - 1.0) < 0.05


def test_training_conditioning_equals_pipeline_encoder(smoke_run):
    from sd35fp8.text.encoders import SD3TextEncoder

    out, _ = smoke_run
    tok = data.make_tokenizer(out / "spiece.model")
    s = spec.TinySpec.smoke().with_t5_vocab(tok.t5.vocab_size)
    torch.manual_seed(0)
    towers = spec.TextTowers(s).eval()
    prompts = ["a photo of a red star left of a blue ring", "", "three objects: a cyan heart, a pink cross and a"
               " green square on a gray background"]
    rows = [data.token_rows(tok, p) for p in prompts]
    ids = [torch.tensor([r[i] for r in rows]) for i in range(3)]
    with torch.no_grad():
        ctx, pooled = towers(*ids)
    ref_ctx, ref_pooled = SD3TextEncoder(towers.clip_l, towers.clip_g, towers.t5, tokenizer=tok).encode_prompts(prompts)
    assert ctx.shape == ref_ctx.shape == (3, 154, s.t5_width)
    torch.testing.assert_close(ctx, ref_ctx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-6)


def test_smoke_run_reuses_vae_spiece_and_init(tmp_path, smoke_run):
    """--vae-from / --spiece-from / --init-from: the VAE comes over bit for bit (no training, no fold),
    the vocabulary file is copied, the sizes come from the file, the sources' sha256 are logged."""
    src, _ = smoke_run
    ckpt = src / export.CHECKPOINT_NAME
    out = tmp_path / "reuse"
    rec = train.main(["--out", str(out), "--smoke", "--seed", "1", "--vae-from", str(ckpt),
                      "--spiece-from", str(src / "spiece.model"), "--init-from", str(ckpt)])
    assert "vae_loss" not in rec and "vae_fold" not in rec
    assert rec["vae_from"]["sha256"] == rec["init_from"]["sha256"] and len(rec["spiece_from"]["sha256"]) == 64
    assert (out / "spiece.model").read_bytes() == (src / "spiece.model").read_bytes()
    new = out / export.CHECKPOINT_NAME
    assert spec.TinySpec.from_checkpoint(new, 32) == spec.TinySpec.from_checkpoint(ckpt, 32)
    old_vae, new_vae = export.read_component(ckpt, "vae"), export.read_component(new, "vae")
    assert old_vae.keys() == new_vae.keys()
    assert all(torch.equal(old_vae[k], new_vae[k]) for k in old_vae)
    old_mm, new_mm = export.read_component(ckpt, "mmdit"), export.read_component(new, "mmdit")
    assert any(not torch.equal(old_mm[k], new_mm[k]) for k in old_mm)  # trained on from the init
    with safe_open(str(new), "pt") as f:
        info = json.loads(f.metadata()["sd35fp8.tiny"])
    assert info["init_from_sha256"] == rec["init_from"]["sha256"]


def test_smoke_run_patch_1(tmp_path, smoke_run):
    """--patch 1 (4x the image tokens): the loaders infer the patch size back from x_embedder, and
    pos_embed still covers the same largest image (grid x2)."""
    src, _ = smoke_run
    out = tmp_path / "patch1"
    train.main(["--out", str(out), "--smoke", "--patch", "1", "--vae-from", str(src / export.CHECKPOINT_NAME),
                "--spiece-from", str(src / "spiece.model")])
    got = spec.TinySpec.from_checkpoint(out / export.CHECKPOINT_NAME, 32)
    s = spec.TinySpec.smoke()
    assert got.patch == 1 and got.pos_embed_max_size == 2 * s.pos_embed_max_size
    mmdit, *_ = export.load_back(out / export.CHECKPOINT_NAME)
    assert mmdit.config.patch_size == 1 and mmdit.config.max_pixels == s.pos_embed_max_size * s.patch * 8


def test_latent_shape_penalty():
    """--vae-align: zero when the first 3 latent channels are the cell-averaged image; --vae-tail:
    zero for Gaussian latents' bulk, positive for an isolated spike."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(2, 16, 4, 4, generator=g) * 0.5
    z[:, :3] = torch.nn.functional.avg_pool2d(x, 8)
    assert float(train.latent_shape_penalty(z, x, 1.0, 0.0)) == 0.0
    assert float(train.latent_shape_penalty(z, x, 0.0, 0.0)) == 0.0
    big = torch.randn(4, 16, 16, 16, generator=g)
    big = big.clamp(-2.5, 2.5)
    assert float(train.latent_shape_penalty(big, x, 0.0, 1.0)) == 0.0
    big[0, 5, 3, 3] = 40.0  # one spike of a shape code
    assert float(train.latent_shape_penalty(big, x, 0.0, 1.0)) > 0.0


def test_scale_equivariance_loss():
    """--vae-eq: zero for a piecewise-constant decoder and a latent smooth over 2x2 cells (its 2x2 average
    decodes to the 2x2-averaged image), positive once one cell carries a spike."""
    g = torch.Generator().manual_seed(0)

    def decoder(z):  # every latent cell paints its 8x8 pixels with its first 3 channels
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")

    z = torch.randn(2, 16, 2, 2, generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)  # [2, 16, 4, 4]
    x = decoder(z)  # [2, 3, 32, 32]
    assert float(train.scale_equivariance_loss(decoder, z, x)) < 1e-12
    z[0, 0, 1, 1] += 5.0  # a code hidden in one cell: the image changes in that cell only
    assert float(train.scale_equivariance_loss(decoder, z, decoder(z))) > 0.1


def test_vae_only_then_vae_from(tmp_path):
    """A run split in two calls: --vae-only writes the trained VAE (no MMDiT training, no evaluation);
    a --vae-from run on it carries that VAE over bit for bit."""
    first, second = tmp_path / "vae", tmp_path / "mmdit"
    rec = train.main(["--out", str(first), "--smoke", "--seed", "0", "--vae-only", "--vae-eq", "1.0"])
    assert rec["vae_only"] and "vae_loss" in rec and "mmdit_loss" not in rec and "eval" not in rec
    ckpt = first / export.CHECKPOINT_NAME
    train.main(["--out", str(second), "--smoke", "--seed", "0", "--vae-from", str(ckpt),
                "--spiece-from", str(first / "spiece.model")])
    a, b = export.read_component(ckpt, "vae"), export.read_component(second / export.CHECKPOINT_NAME, "vae")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_arguments_are_the_shipped_recipe():
    """`python -m sd35fp8.tiny.train --out DIR` is the shipped run's recipe (train_log.json args), with
    torch.compile (CUDA graphs) on CUDA only."""
    log = json.loads((export.Path(train.__file__).parent / "train_log.json").read_text())
    shipped, vae_run = log["args"], log["vae_source_run"]["args"]  # the VAE came from its own --vae-only call
    cuda = train.parse_args(["--out", "x", "--device", "cuda"])
    for key in ("batch", "lr", "n_images", "minutes_mmdit", "compile", "compile_mode", "step_graph", "ema",
                "warmup", "train_shift", "sigma_uniform", "text_dropout", "mix", "relation_said", "eval_sampler",
                "eval_steps", "cfg_grid"):
        assert getattr(cuda, key) == shipped[key], key
    for key in ("minutes_vae", "batch_vae", "lr_vae", "vae_eq", "vae_align", "vae_tail"):
        assert getattr(cuda, key) == vae_run[key], key
    cpu = train.parse_args(["--out", "x", "--device", "cpu"])
    assert not cpu.compile and not cpu.step_graph
    assert not train.parse_args(["--out", "x", "--device", "cuda", "--no-compile"]).compile


def test_shipped_file_is_the_logged_run():
    """The shipped all-in-one is the file train_log.json describes (its sha256 as trained, or after a
    metadata-only defaults rewrite)."""
    import hashlib

    from sd35fp8.tiny import SHIPPED_CHECKPOINT

    log = json.loads((export.Path(train.__file__).parent / "train_log.json").read_text())
    want = log.get("defaults_rewritten", {}).get("sha256_after", log["sha256"])
    assert hashlib.sha256(SHIPPED_CHECKPOINT.read_bytes()).hexdigest() == want


def test_mix_and_sampler_arguments():
    args = train.parse_args(["--out", "x", "--mix", "single=1,two=3", "--relation-said", "0.9",
                             "--eval-sampler", "euler_ancestral"])
    assert args.mix == {"single": 0.25, "two": 0.75, "count": 0.0, "three": 0.0}
    assert args.relation_said == 0.9 and args.eval_sampler == "euler_ancestral"
    assert train.parse_args(["--out", "x", "--mix", "single=0.3,two=0.4,count=0.12,three=0.18"]).mix == world.KIND_WEIGHTS
    for bad in (["--mix", "single"], ["--mix", "single=x"], ["--mix", "four=1"], ["--relation-said", "1.5"],
                ["--eval-sampler", "nope"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--out", "x"] + bad)


def test_set_defaults_rewrites_metadata_only(tiny_random_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from sd35fp8.errors import InputError

    src, _ = tiny_random_checkpoint
    path = tmp_path / "m.safetensors"
    shutil.copyfile(src, path)
    with safe_open(str(path), "pt") as f:
        before = dict(f.metadata())
    new = export.set_defaults(path, {"sampler": "euler_ancestral", "steps": "30", "cfg": "6"})
    assert (new["sampler"], new["steps"], new["cfg"]) == ("euler_ancestral", 30, 6.0)
    with safe_open(str(path), "pt") as f:
        after = dict(f.metadata())
    assert json.loads(after[DEFAULTS_METADATA_KEY]) == new
    assert {k: v for k, v in after.items() if k != DEFAULTS_METADATA_KEY} == \
        {k: v for k, v in before.items() if k != DEFAULTS_METADATA_KEY}
    a, b = load_file(str(src)), load_file(str(path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="unknown fields"):
        export.set_defaults(path, {"colour": "red"})
    with pytest.raises(InputError, match="unknown sampler"):
        export.set_defaults(path, {"sampler": "nope"})
