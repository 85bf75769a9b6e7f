"""Text conditioning: tokenizers vs open_clip / transformers, ComfyUI chunking and padding rules,
config inference, and SD3TextEncoder vs a hand-written transformers reference (tiny models)."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from sd35fp8.errors import InputError
from sd35fp8.text import (
    CLIPBPE,
    SD3TextEncoder,
    SD3Tokenizer,
    T5Tokenizer,
    build_clip,
    build_t5,
    clip_config_from_state_dict,
    concat_contexts,
    find_t5_tokenizer,
    guess_clip_kind,
    init_meta_buffers,
    parse_prompt_weights,
    plan_text_encoder_keys,
    t5_config_from_state_dict,
)

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on the moon, highly-detailed, 8k, trending on artstation!!",
    "  Multiple   spaces\tand\nnewlines  ",
    "don't stop, it's 3.14159 o'clock; ok?",
    "café naïve résumé — “quoted” 東京 🚀",
    "",
]
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def clip() -> CLIPBPE:
    return CLIPBPE.default()


# --- CLIP tokenizer ----------------------------------------------------------------------------


def test_clip_ids_match_open_clip(clip):
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip not installed")
    # open_clip/__init__ needs torchvision; its tokenizer module alone does not.
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    ref = mod.SimpleTokenizer()
    # open_clip runs ftfy.fix_text (uncurls quotes...); ComfyUI/transformers do not: skip those
    for p in [p for p in PROMPTS if "“" not in p] + ["café naïve résumé 東京 🚀 — ok"]:
        assert clip.encode(p) == ref.encode(p), p


def test_clip_ids_match_transformers(clip, tmp_path):
    import json

    from transformers import CLIPTokenizer

    # the layout of openai/clip-vit-large-patch14's tokenizer folder, loaded through transformers
    (tmp_path / "vocab.json").write_text(json.dumps(clip.vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in clip.merges]
    (tmp_path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ref = CLIPTokenizer.from_pretrained(str(tmp_path))
    for p in PROMPTS + ["<|endoftext|> inside a prompt"]:
        ids = ref(p)["input_ids"]
        assert ids[0] == BOS and ids[-1] == EOS
        assert clip.encode(p) == ids[1:-1], p
    assert len(clip.vocab) == 49408 and clip.vocab["<|startoftext|>"] == BOS


def test_clip_pad_rules(clip):
    tok = SD3Tokenizer(clip)
    out = tok.tokenize("a photo of a cat")
    ids = [BOS] + clip.encode("a photo of a cat") + [EOS]
    assert out["l"] == [ids + [EOS] * (77 - len(ids))]
    assert out["g"] == [ids + [0] * (77 - len(ids))]
    assert out["t5"] is None and out["t5_weights"] is None
    assert out["l_weights"] == [[1.0] * 77]
    empty = tok.tokenize("")
    assert empty["l"][0][:3] == [BOS, EOS, EOS] and empty["g"][0][:3] == [BOS, EOS, 0]


def test_clip_chunking(clip):
    tok = SD3Tokenizer(clip)
    word = clip.encode("word")
    assert len(word) == 1
    # one big group (>= 8 tokens) is cut at the chunk boundary: 75 tokens per chunk
    out = tok.tokenize("word " * 100)
    assert [len(c) for c in out["l"]] == [77, 77]
    assert out["l"][0] == [BOS] + word * 75 + [EOS]
    assert out["l"][1] == [BOS] + word * 25 + [EOS] + [EOS] * 50
    assert out["g"][1] == [BOS] + word * 25 + [EOS] + [0] * 50
    # a small group (< 8 tokens) that does not fit moves whole to the next chunk
    out = tok.tokenize("word " * 74 + "(a b c:1.2)")
    abc = clip.encode("a b c")
    assert out["l"][0] == [BOS] + word * 74 + [EOS, EOS]
    assert out["g"][0] == [BOS] + word * 74 + [EOS, 0]
    assert out["l"][1][:5] == [BOS] + abc + [EOS]
    assert out["l_weights"][1][:5] == [1.0, 1.2, 1.2, 1.2, 1.0]


def test_prompt_weight_parsing():
    assert parse_prompt_weights("a (red:1.3) cat") == [("a ", 1.0), ("red", 1.3), (" cat", 1.0)]
    segs = parse_prompt_weights("((big)) \\(x\\) (a:b)")
    assert [s for s, _ in segs] == ["big", " (x) ", "a:b"]
    assert segs[0][1] == pytest.approx(1.21) and segs[2][1] == pytest.approx(1.1)
    tok = SD3Tokenizer(parse_weights=False)
    assert tok.tokenize("(red:1.3)")["l_weights"] == [[1.0] * 77]


# --- T5 tokenizer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    sents = [
        "a photo of a cat sitting on a mat",
        "the quick brown fox jumps over the lazy dog",
        "an astronaut riding a horse on the moon",
        "a painting of a sunset over the ocean, highly detailed",
    ] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents), model_writer=buf, vocab_size=100, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("t5tok")
    (folder / "spiece.model").write_bytes(buf.getvalue())
    return folder / "spiece.model"


T5_TEXTS = ["a cat on the moon", "  A Painting,  of the OCEAN!! ", "xyz qq", ""]


def test_t5_tokenizer_spiece_and_json(spiece, tmp_path):
    import sentencepiece
    from transformers import T5Tokenizer as HFT5

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    hf = HFT5.from_pretrained(str(spiece.parent))
    hf.save_pretrained(str(tmp_path / "tokenizer_3"))
    ours_sp = T5Tokenizer(spiece)
    ours_json = T5Tokenizer(find_t5_tokenizer(tmp_path, use_hf_cache=False))
    assert ours_json.path.name == "tokenizer.json"
    for t in T5_TEXTS:
        assert ours_sp.encode(t) == list(sp.encode(t)), t
        assert ours_json.encode(t) + [1] == hf(t)["input_ids"], t


def test_t5_tokenize_padding_and_limits(spiece):
    t5 = T5Tokenizer(spiece)
    ids = t5.encode("a cat on the moon")
    out = SD3Tokenizer(t5=t5).tokenize("a cat on the moon")
    assert out["t5"] == ids + [1] + [0] * (77 - len(ids) - 1)
    assert SD3Tokenizer(t5=t5).tokenize("")["t5"] == [1] + [0] * 76
    assert len(SD3Tokenizer(t5=t5, t5_min_length=256).tokenize("a cat")["t5"]) == 256
    long = "the quick brown fox jumps over the lazy dog " * 20
    full = SD3Tokenizer(t5=t5).tokenize(long)["t5"]
    assert len(full) > 77 and full[-1] == 1 and 0 not in full  # not chunked, no limit
    cut = SD3Tokenizer(t5=t5, t5_max_length=77).tokenize(long)["t5"]
    assert cut == full[:76] + [1]


def test_t5_tokenizer_search(spiece, tmp_path):
    weights = tmp_path / "t5xxl_fp16.safetensors"
    weights.write_bytes(b"")
    (tmp_path / "spiece.model").write_bytes(spiece.read_bytes())
    assert find_t5_tokenizer(near=[weights], use_hf_cache=False) == tmp_path / "spiece.model"
    # diffusers: text_encoder_3/ weights find ../tokenizer_3/
    root = tmp_path / "pipe"
    (root / "text_encoder_3").mkdir(parents=True)
    (root / "tokenizer_3").mkdir()
    (root / "tokenizer_3" / "spiece.model").write_bytes(spiece.read_bytes())
    found = find_t5_tokenizer(near=[root / "text_encoder_3" / "model.safetensors"], use_hf_cache=False)
    assert found == root / "tokenizer_3" / "spiece.model"


def test_t5_tokenizer_missing_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(InputError) as err:
        find_t5_tokenizer(near=[tmp_path / "t5xxl_fp8_e4m3fn.safetensors"])
    msg = str(err.value)
    assert str(tmp_path / "spiece.model") in msg and str(tmp_path / "tokenizer.json") in msg
    assert "models--stabilityai--stable-diffusion-3.5-large" in msg
    assert "--t5-tokenizer PATH" in msg
    assert f"at {tmp_path / 'spiece.model'}:" in msg  # exactly what file to put where
    assert "32000 pieces" in msg and "tokenizer_3/spiece.model" in msg and "t5_tokenizer/tokenizer.json" in msg
    with pytest.raises(InputError, match="Searched"):
        find_t5_tokenizer(tmp_path / "nowhere", use_hf_cache=False)


# --- configs and encoders ----------------------------------------------------------------------


def _clip_ref(hidden: int, proj: int, act: str):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2, projection_dim=proj,
        num_hidden_layers=3, num_attention_heads=hidden // 64, max_position_embeddings=77,
        hidden_act=act, eos_token_id=EOS, bos_token_id=BOS,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def _t5_ref():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=128, d_model=256, d_kv=64, d_ff=160, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        is_encoder_decoder=False, use_cache=False,
    )
    return T5EncoderModel(cfg).eval()


@pytest.fixture(scope="module")
def refs():
    torch.manual_seed(0)
    return {"l": _clip_ref(64, 64, "quick_gelu"), "g": _clip_ref(128, 96, "gelu"), "t5": _t5_ref()}


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _load(kind: str, sd: dict):
    """What a loader does: infer config, build on meta, map keys, assign, materialise buffers."""
    shapes = _shapes(sd)
    if kind == "t5xxl":
        model = build_t5(t5_config_from_state_dict(shapes))
    else:
        has_proj = "text_projection.weight" in sd or "text_projection" in sd
        model = build_clip(clip_config_from_state_dict(shapes, kind), with_projection=has_proj)
    plan = plan_text_encoder_keys(kind, list(sd), list(model.state_dict()))
    assert not plan.missing and not plan.unexpected, (plan.missing, plan.unexpected)
    tensors = {k: sd[f].t() if k in plan.transpose else sd[f] for k, f in plan.source.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    init_meta_buffers(model)
    return model


@pytest.fixture(scope="module")
def ours(refs):
    return {
        "l": _load("clip_l", refs["l"].state_dict()),
        "g": _load("clip_g", refs["g"].state_dict()),
        "t5": _load("t5xxl", refs["t5"].state_dict()),
    }


def test_config_inference(refs):
    for kind, ref in (("clip_l", refs["l"]), ("clip_g", refs["g"])):
        cfg = clip_config_from_state_dict(_shapes(ref.state_dict()), kind)
        rc = ref.config
        for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "vocab_size", "projection_dim", "hidden_act"):
            assert getattr(cfg, f) == getattr(rc, f), (kind, f)
    assert guess_clip_kind(_shapes(refs["l"].state_dict())) == "clip_l"
    t5 = t5_config_from_state_dict(_shapes(refs["t5"].state_dict()))
    rc = refs["t5"].config
    for f in ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size",
              "relative_attention_num_buckets", "is_gated_act", "dense_act_fn"):
        assert getattr(t5, f) == getattr(rc, f), f
    # T5 files holding only one of the tied embeddings
    only_enc = {k: v for k, v in _shapes(refs["t5"].state_dict()).items() if k != "shared.weight"}
    assert t5_config_from_state_dict(only_enc).vocab_size == 128


def test_key_plan_extras():
    model_keys = ["text_model.a.weight", "text_projection.weight"]
    plan = plan_text_encoder_keys(
        "clip_g", ["text_model.a.weight", "text_projection", "logit_scale",
                   "text_model.embeddings.position_ids", "text_model.a.scale_weight", "junk"], model_keys)
    assert plan.source["text_projection.weight"] == "text_projection"
    assert plan.transpose == {"text_projection.weight"}
    assert set(plan.ignored) == {"logit_scale", "text_model.embeddings.position_ids"}
    assert plan.fp8_meta == ("text_model.a.scale_weight",) and plan.unexpected == ("junk",)
    t5 = plan_text_encoder_keys(
        "t5xxl", ["encoder.embed_tokens.weight", "decoder.block.0.x", "scaled_fp8"],
        ["shared.weight", "encoder.embed_tokens.weight", "encoder.final_layer_norm.weight"])
    assert t5.source == {"shared.weight": "encoder.embed_tokens.weight",
                         "encoder.embed_tokens.weight": "encoder.embed_tokens.weight"}
    assert t5.ignored == ("decoder.block.0.x",) and t5.fp8_meta == ("scaled_fp8",)
    assert t5.missing == ("encoder.final_layer_norm.weight",)


@torch.no_grad()
def _ref_clip(model, chunks, project):
    ids = torch.tensor(chunks)
    o = model(ids, output_hidden_states=True)
    eos = (ids == EOS).int().argmax(-1)
    pooled = o.last_hidden_state[torch.arange(len(chunks)), eos]
    if project:
        pooled = model.text_projection(pooled)
    return o.hidden_states[-2].reshape(1, -1, o.hidden_states[-2].shape[-1]), pooled[:1]


@torch.no_grad()
def _reference(refs, tokens, context_dim=256, with_t5=True):
    l, lp = _ref_clip(refs["l"], tokens["l"], project=False)
    g, gp = _ref_clip(refs["g"], tokens["g"], project=True)
    lg = nn.functional.pad(torch.cat([l, g], -1), (0, context_dim - 64 - 128))
    ctx = lg
    if with_t5:
        t5 = refs["t5"](input_ids=torch.tensor([tokens["t5"]])).last_hidden_state
        ctx = torch.cat([lg, t5], dim=1)
    return ctx, torch.cat([lp, gp], -1)


def test_sd3_encoder_matches_reference(refs, ours, spiece):
    tok = SD3Tokenizer(t5=T5Tokenizer(spiece))
    enc = SD3TextEncoder(ours["l"], ours["g"], ours["t5"], tokenizer=tok)
    assert enc.context_dim == 256 and enc.pooled_dim == 64 + 96
    prompts = ["a photo of a cat on a mat", "the lazy dog " * 40]  # the second has 2 CLIP chunks
    for p in prompts:
        tokens = tok.tokenize(p)
        ctx, pooled = enc.encode([tokens])
        rctx, rpooled = _reference(refs, tokens)
        assert ctx.shape == rctx.shape and ctx.dtype == torch.float32
        torch.testing.assert_close(ctx, rctx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, rpooled, atol=1e-5, rtol=1e-5)
    long = tok.tokenize(prompts[1])
    assert len(long["l"]) == 2 and len(long["t5"]) > 77
    ctx, _ = enc.encode([long])
    assert ctx.shape[1] == 154 + len(long["t5"])
    # a batch of two same-length prompts equals the prompts one by one
    batch_ctx, batch_pooled = enc.encode_prompts(["a cat", "a dog"])
    one, onep = enc.encode_prompts("a dog")
    torch.testing.assert_close(batch_ctx[1:], one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch_pooled[1:], onep, atol=1e-5, rtol=1e-5)


def _hooked(model, blocks, index: int, ids: torch.Tensor) -> tuple:
    """model's output and what block `index` of `blocks` returned (a forward hook: the reference for a
    layer's output that does not rely on how transformers lays out hidden_states)."""
    got = []
    h = blocks[index].register_forward_hook(lambda m, i, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        out = model(input_ids=ids)
    finally:
        h.remove()
    return out, got[0]


@torch.no_grad()
def _reference_at(refs, tokens, layer: int, context_dim=256):
    """ComfyUI's SD3ClipModel with clip_layer(layer): CLIP-L/G give the output of layer `layer` un-normed (the
    final-LN output when |layer| exceeds the depth); T5 the output of block `layer` through its final LayerNorm."""
    parts, pooled = [], []
    for name, project in (("l", False), ("g", True)):
        model = refs[name]
        ids = torch.tensor(tokens[name])
        layers = model.text_model.encoder.layers if hasattr(model, "text_model") else model.encoder.layers
        if abs(layer) > len(layers):
            out = model(input_ids=ids)
            states = out.last_hidden_state
        else:
            out, states = _hooked(model, layers, len(layers) + layer, ids)
        eos = (ids == EOS).int().argmax(-1)
        p = out.last_hidden_state[torch.arange(len(ids)), eos] if project else out.last_hidden_state[0, eos[:1]]
        pooled.append(model.text_projection(p)[:1] if project else p)
        parts.append(states.reshape(1, -1, states.shape[-1]))
    lg = nn.functional.pad(torch.cat(parts, -1), (0, context_dim - 64 - 128))
    t5 = refs["t5"]
    ids = torch.tensor([tokens["t5"]])
    blocks = t5.encoder.block
    if layer == -1 or abs(layer) > len(blocks):
        t5_out = t5(input_ids=ids).last_hidden_state
    else:
        t5_out = t5.encoder.final_layer_norm(_hooked(t5, blocks, len(blocks) + layer, ids)[1])
    return torch.cat([lg, t5_out], dim=1), torch.cat(pooled, -1)


def test_clip_set_last_layer_matches_comfyui_rule(refs, ours, spiece):
    """CLIPSetLastLayer (SD3TextEncoder.last_layer): every encoder's states after the chosen layer, as ComfyUI's
    SD3ClipModel.set_clip_options; -2 is SD3's own choice for CLIP (and leaves T5 at its normed block -2)."""
    tok = SD3Tokenizer(t5=T5Tokenizer(spiece))
    enc = SD3TextEncoder(ours["l"], ours["g"], ours["t5"], tokenizer=tok)
    tokens = tok.tokenize("a photo of a cat on a mat")
    default, default_pooled = enc.encode([tokens])
    for layer in (-1, -2, -3, -24):
        with enc.last_layer(layer):
            ctx, pooled = enc.encode([tokens])
        rctx, rpooled = _reference_at(refs, tokens, layer)
        torch.testing.assert_close(ctx, rctx, atol=1e-5, rtol=1e-5, msg=f"layer {layer}")
        torch.testing.assert_close(pooled, default_pooled)  # the pooled output never moves
    assert enc.clip_layer is None and enc.t5_layer is None
    with enc.last_layer(-1, t5=False):  # diffusers' clip_skip: the CLIPs only
        ctx, _ = enc.encode([tokens])
    torch.testing.assert_close(ctx[:, 77:], default[:, 77:])
    torch.testing.assert_close(ctx[:, :77], _reference_at(refs, tokens, -1)[0][:, :77], atol=1e-5, rtol=1e-5)
    with enc.last_layer(-3, t5=False):  # clip_skip 1: hidden_states[-3]
        ctx, _ = enc.encode([tokens])
    ref = [refs[n](input_ids=torch.tensor(tokens[n]), output_hidden_states=True).hidden_states[-3] for n in "lg"]
    torch.testing.assert_close(ctx[:, :77, :192], torch.cat(ref, -1), atol=1e-5, rtol=1e-5)
    with enc.last_layer(-2):
        ctx, _ = enc.encode([tokens])
    torch.testing.assert_close(ctx[:, :77], default[:, :77])  # CLIP at -2 is the default


def test_token_weights(refs, ours):
    tok = SD3Tokenizer()
    enc = SD3TextEncoder(ours["l"], ours["g"], None, context_dim=256)
    tokens = tok.tokenize("a (red:1.5) cat")
    ctx, pooled = enc.encode(tokens)
    plain = dict(tokens, l_weights=None, g_weights=None)
    base, base_pooled = enc.encode(plain)
    empty = {"l": [[BOS, EOS] + [EOS] * 75], "g": [[BOS, EOS] + [0] * 75]}
    zero, _ = _reference(refs, empty, with_t5=False)
    w = torch.tensor(tokens["l_weights"][0])[None, :, None]
    expect = torch.where(w != 1, (base - zero) * w + zero, base)
    torch.testing.assert_close(ctx, expect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, base_pooled)  # the pooled output ignores weights


def test_missing_parts(refs, ours):
    tok = SD3Tokenizer()
    tokens = tok.tokenize("a photo of a cat")
    # no T5: CLIP context alone, 77 tokens, padded to context_dim (4096 unless given)
    enc = SD3TextEncoder(ours["l"], ours["g"], None)
    ctx, pooled = enc.encode(tokens)
    rctx, rpooled = _reference(refs, tokens, context_dim=4096, with_t5=False)
    assert ctx.shape == (1, 77, 4096)
    torch.testing.assert_close(ctx, rctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, rpooled, atol=1e-5, rtol=1e-5)
    # no CLIP-L: zeros in its 768 columns and pooled part, CLIP-G after them
    enc_g = SD3TextEncoder(None, ours["g"], None)
    ctx_g, pooled_g = enc_g.encode(tokens)
    assert pooled_g.shape == (1, 768 + 96) and not pooled_g[:, :768].any()
    assert not ctx_g[..., :768].any() and not ctx_g[..., 768 + 128:].any()
    torch.testing.assert_close(ctx_g[..., 768:768 + 128], rctx[..., 64:192], atol=1e-5, rtol=1e-5)
    # T5 loaded but tokens without T5 ids
    with pytest.raises(InputError, match="'t5'"):
        SD3TextEncoder(ours["l"], ours["g"], ours["t5"]).encode(tokens)
    # nothing at all
    ctx0, pooled0 = SD3TextEncoder(None, None, None).encode(tokens)
    assert ctx0.shape == (1, 77, 4096) and pooled0.shape == (1, 2048) and not ctx0.any()


def test_concat_contexts():
    a, b = torch.randn(1, 154, 8), torch.randn(1, 77, 8)
    out = concat_contexts([a, b])
    assert out.shape == (2, 154, 8)
    torch.testing.assert_close(out[1], torch.cat([b[0], b[0]]))
    with pytest.raises(InputError, match="separately"):
        concat_contexts([torch.randn(1, 154 + 80, 8), torch.randn(1, 154 + 77, 8)])
