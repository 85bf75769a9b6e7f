"""SD3 text encoders: CLIP-L, CLIP-G and T5-XXL as transformers modules, configs inferred from
weights, and ``SD3TextEncoder`` that turns token dicts into (context, pooled) like ComfyUI's
``SD3ClipModel`` (comfy/text_encoders/sd3_clip.py).

Key names are those of transformers (and of ComfyUI's separate ``clip_l`` / ``clip_g`` /
``t5xxl`` files): ``text_model.*`` + ``text_projection.weight`` for CLIP, ``encoder.*`` +
``shared.weight`` for T5. ``plan_text_encoder_keys`` says how a file's keys map onto a model.

Dtype: the modules compute in the dtype of their weights; outputs are cast to ``out_dtype``
(float32 by default, as ComfyUI returns ``.float()``). T5 is known to overflow in float16:
run it in bfloat16 or float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from sd35fp8.errors import CheckpointError, InputError

CLIP_L_WIDTH = 768  # widths ComfyUI assumes for a missing CLIP-L / CLIP-G (zeros)
CLIP_G_WIDTH = 1280
DEFAULT_CONTEXT_DIM = 4096
CLIP_BOS, CLIP_EOS = 49406, 49407
T5_EOS, T5_PAD = 1, 0

_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
_T5_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")


def _shape(shapes: Mapping[str, Sequence[int]], key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{what}: missing key {key}", keys=[key])
    return tuple(int(s) for s in shapes[key])


def _count(shapes: Mapping[str, Sequence[int]], pattern: re.Pattern[str], what: str) -> int:
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    if not found or found != set(range(len(found))):
        raise CheckpointError(f"{what}: layer indices are missing or not contiguous: {sorted(found)}")
    return len(found)


# --- configs -----------------------------------------------------------------------------------


def guess_clip_kind(shapes: Mapping[str, Sequence[int]]) -> str:
    """``"clip_g"`` when the model has >= 24 layers (ComfyUI tests for layer 30), else ``"clip_l"``."""
    return "clip_g" if _count(shapes, _CLIP_LAYER, "CLIP text encoder") >= 24 else "clip_l"


def clip_config_from_state_dict(shapes: Mapping[str, Sequence[int]], kind: str) -> CLIPTextConfig:
    """CLIPTextConfig from key -> shape. ``kind`` picks the activation: clip_l quick_gelu, clip_g gelu."""
    if kind not in ("clip_l", "clip_g"):
        raise InputError(f"CLIP kind must be 'clip_l' or 'clip_g', got {kind!r}")
    what = f"{kind} text encoder"
    vocab, hidden = _shape(shapes, "text_model.embeddings.token_embedding.weight", what)
    max_pos, _ = _shape(shapes, "text_model.embeddings.position_embedding.weight", what)
    layers = _count(shapes, _CLIP_LAYER, what)
    inter, _ = _shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", what)
    proj = hidden
    if "text_projection.weight" in shapes:
        proj = _shape(shapes, "text_projection.weight", what)[0]
    elif "text_projection" in shapes:  # legacy CLIPSave layout, stored transposed [hidden, proj]
        proj = _shape(shapes, "text_projection", what)[1]
    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        projection_dim=proj,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=max_pos,
        hidden_act="quick_gelu" if kind == "clip_l" else "gelu",
        layer_norm_eps=1e-5,
        bos_token_id=CLIP_BOS,
        eos_token_id=CLIP_EOS,
        pad_token_id=1,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def t5_config_from_state_dict(shapes: Mapping[str, Sequence[int]]) -> T5Config:
    """T5Config (encoder only) from key -> shape; gated-gelu when ``wi_0``/``wi_1`` exist, else relu."""
    what = "T5 text encoder"
    emb_key = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
    vocab, d_model = _shape(shapes, emb_key, what)
    layers = _count(shapes, _T5_BLOCK, what)
    buckets, heads = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", what)
    inner, _ = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", what)
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in shapes
    d_ff, _ = _shape(shapes, ff + ("wi_0.weight" if gated else "wi.weight"), what)
    if inner % heads:
        raise CheckpointError(f"{what}: attention width {inner} is not a multiple of {heads} heads")
    cfg = T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128,  # not stored in weights; 128 for every T5 v1.1
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=T5_PAD,
        eos_token_id=T5_EOS,
    )
    cfg._attn_implementation = "eager"
    return cfg


def describe_text_config(cfg: CLIPTextConfig | T5Config) -> str:
    """One line for the load log."""
    if isinstance(cfg, T5Config):
        return (
            f"T5 encoder: {cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads x {cfg.d_kv}, "
            f"d_ff {cfg.d_ff} ({cfg.feed_forward_proj}), vocab {cfg.vocab_size}"
        )
    return (
        f"CLIP text: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
        f"mlp {cfg.intermediate_size} ({cfg.hidden_act}), projection {cfg.projection_dim}, "
        f"{cfg.max_position_embeddings} positions"
    )


# --- modules -----------------------------------------------------------------------------------


class ClipTextEncoder(nn.Module):
    """transformers ``CLIPTextModel`` under ``text_model`` + optional ``text_projection`` (no bias).

    ``forward(ids [B, L], layer=-2) -> (hidden [B, L, H], pooled [B, H])``: the hidden states after
    layer `layer` (ComfyUI's layer_idx: -2 = the second-to-last, SD3's) without the final LayerNorm, or
    the final-LN output when |layer| exceeds the depth (ComfyUI's "last"); and the final-LN state at the
    first EOS (49407). Project the pooled with ``text_projection`` where wanted (CLIP-G in SD3).
    """

    def __init__(self, config: CLIPTextConfig, with_projection: bool = True):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(config)
        self.text_projection = (
            nn.Linear(config.hidden_size, config.projection_dim, bias=False) if with_projection else None
        )

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def forward(self, ids: torch.Tensor, layer: int = -2) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_model(input_ids=ids, output_hidden_states=True)
        if abs(layer) > self.config.num_hidden_layers:
            return out.last_hidden_state, out.pooler_output
        return out.hidden_states[layer], out.pooler_output  # [B, L, H], [B, H]


def build_clip(config: CLIPTextConfig, with_projection: bool = True) -> ClipTextEncoder:
    """A ``ClipTextEncoder`` on the meta device (load with ``load_state_dict(..., assign=True)``,
    then call :func:`init_meta_buffers`)."""
    with torch.device("meta"):
        return ClipTextEncoder(config, with_projection).eval().requires_grad_(False)


def build_t5(config: T5Config) -> T5EncoderModel:
    """A transformers ``T5EncoderModel`` on the meta device. ``shared`` and ``encoder.embed_tokens``
    are two modules whose weights must be the same tensor: load both keys (see
    :func:`plan_text_encoder_keys`) or call ``tie_t5_embeddings`` after loading."""
    with torch.device("meta"):
        return T5EncoderModel(config).eval().requires_grad_(False)


def tie_t5_embeddings(model: T5EncoderModel) -> None:
    """Make ``encoder.embed_tokens`` use ``shared.weight`` (after an ``assign=True`` load)."""
    model.encoder.embed_tokens.weight = model.shared.weight


def init_meta_buffers(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Materialise the non-persistent buffers a meta-built model still has on meta
    (CLIP's ``position_ids``); T5 has none. Call after loading the weights."""
    for module in model.modules():
        if hasattr(module, "position_ids") and isinstance(module.position_ids, torch.Tensor):
            if module.position_ids.is_meta:
                n = module.position_ids.shape[-1]
                module.position_ids = torch.arange(n, device=device).expand((1, -1))


# --- key mapping for loaders -------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPlan:
    """How one text-encoder file fills one model (all lists name keys; nothing is skipped silently).

    ``source``: model key -> file key to load it from (usually the same name);
    ``transpose``: model keys whose file tensor must be transposed first;
    ``ignored``: file keys known to be unused (logit_scale, position_ids, T5 decoder...);
    ``fp8_meta``: ComfyUI scaled-fp8 keys (``scaled_fp8``, ``*.scale_weight``, ``*.scale_input``)
    for the fp8 loader; ``unexpected``: other file keys; ``missing``: model keys without a source.
    """

    source: dict[str, str]
    transpose: frozenset[str]
    ignored: tuple[str, ...]
    fp8_meta: tuple[str, ...]
    unexpected: tuple[str, ...]
    missing: tuple[str, ...]


_FP8_META = re.compile(r"(^|\.)scaled_fp8$|\.scale_weight$|\.scale_input$")
_CLIP_IGNORED = re.compile(r"^(logit_scale|text_model\.embeddings\.position_ids)$")
_T5_IGNORED = re.compile(r"^(decoder\..*|lm_head\.weight)$")


def plan_text_encoder_keys(kind: str, file_keys: Sequence[str], model_keys: Sequence[str]) -> KeyPlan:
    """Map a ``clip_l``/``clip_g``/``t5xxl`` file's keys (prefix stripped) onto ``model_keys``
    (``model.state_dict().keys()`` of :func:`build_clip` / :func:`build_t5`)."""
    if kind not in ("clip_l", "clip_g", "t5xxl"):
        raise InputError(f"text encoder kind must be clip_l, clip_g or t5xxl, got {kind!r}")
    files = set(file_keys)
    source: dict[str, str] = {}
    transpose: set[str] = set()
    for key in model_keys:
        if key in files:
            source[key] = key
        elif kind == "t5xxl" and key in ("shared.weight", "encoder.embed_tokens.weight"):
            other = "encoder.embed_tokens.weight" if key == "shared.weight" else "shared.weight"
            if other in files:
                source[key] = other  # one stored embedding feeds both tied modules
        elif key == "text_projection.weight" and "text_projection" in files:
            source[key] = "text_projection"  # old ComfyUI CLIPSave layout: stored transposed
            transpose.add(key)
    used = set(source.values())
    ignored, fp8_meta, unexpected = [], [], []
    for key in sorted(files - used):
        if _FP8_META.search(key):
            fp8_meta.append(key)
        elif (_CLIP_IGNORED if kind != "t5xxl" else _T5_IGNORED).match(key):
            ignored.append(key)
        elif key in ("text_projection.weight", "text_projection") and kind == "clip_l":
            ignored.append(key)  # CLIP-L's projection is unused by SD3 (pooled is unprojected)
        else:
            unexpected.append(key)
    missing = tuple(k for k in model_keys if k not in source)
    return KeyPlan(source, frozenset(transpose), tuple(ignored), tuple(fp8_meta), tuple(unexpected), missing)


# --- SD3 conditioning --------------------------------------------------------------------------


def _join(each: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_each's per-prompt (context, pooled) -> one batch (context [B, L, C], pooled [B, P])."""
    return concat_contexts([c for c, _ in each]), torch.cat([p for _, p in each], dim=0)


def _compute_device(model: nn.Module) -> torch.device:
    """Where a text tower computes: its first parameter off the CPU (parameters of streamed blocks and
    CPU token tables stay in CPU memory, offload.py), else the CPU."""
    return next((p.device for p in model.parameters() if p.device.type != "cpu"), torch.device("cpu"))


class ContextBatchError(InputError):
    """Prompt contexts whose lengths ComfyUI would not batch (see concat_contexts)."""


def concat_contexts(contexts: Sequence[torch.Tensor], max_repeat: int = 4) -> torch.Tensor:
    """Batch contexts [1, L_i, C] of different lengths as ComfyUI's ``CONDCrossAttn.concat``:
    repeat each along the sequence up to the LCM of the lengths. ComfyUI refuses (and runs the
    prompts in separate passes) when the LCM is more than ``max_repeat`` x the shortest; so do we,
    with ``InputError``: encode those prompts one at a time."""
    lengths = [c.shape[1] for c in contexts]
    target = math.lcm(*lengths)
    if target // min(lengths) > max_repeat:
        raise ContextBatchError(
            f"prompt contexts of lengths {lengths} cannot be batched (LCM {target} is more than "
            f"{max_repeat}x the shortest); encode and run these prompts separately"
        )
    return torch.cat([c.repeat(1, target // c.shape[1], 1) for c in contexts], dim=0)  # [B, L, C]


def _empty_row(name: str, length: int) -> list[int]:
    """ComfyUI ``gen_empty_tokens``: the reference row token weights are measured against."""
    if name == "t5":
        return [T5_EOS] + [T5_PAD] * (length - 1)
    pad = CLIP_EOS if name == "l" else 0
    return [CLIP_BOS, CLIP_EOS] + [pad] * (length - 2)


def _t5_states(model: T5EncoderModel, ids: torch.Tensor, layer: int | None) -> torch.Tensor:
    """T5's output [N, L, C]: the last (final-LayerNorm) states, or with ComfyUI's layer_idx `layer` the states
    after that block through the final LayerNorm (ComfyUI's T5 normalises its intermediate output)."""
    depth = model.config.num_layers
    if layer is None or layer == -1 or abs(layer) > depth:
        return model(input_ids=ids).last_hidden_state
    # transformers' hidden_states: the embeddings, then each block's input; [-k] (k >= 2) is the output of
    # block depth - k + 1 before the final LayerNorm
    states = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    return model.encoder.final_layer_norm(states)


class SD3TextEncoder(nn.Module):
    """CLIP-L + CLIP-G (+ T5-XXL) -> (context [B, L, C], pooled [B, 2048]) as ComfyUI's SD3ClipModel.

    Per prompt: CLIP chunks are encoded and joined along the sequence (penultimate layer, no final
    LN); CLIP-L and CLIP-G features are concatenated (768 + 1280) and zero-padded to
    ``context_dim``; T5 tokens follow along the sequence. Pooled = cat(CLIP-L pooled unprojected,
    CLIP-G pooled projected) of the first chunk. Missing parts as ComfyUI: a missing CLIP gives a
    zero pooled part (and CLIP-G alone is padded on the left by 768); no T5 gives the CLIP
    context alone (77 tokens per chunk); nothing at all gives zeros [1, 77, context_dim].
    Token weights (``*_weights``) move each token's state away from the empty prompt's:
    z = (z - z_empty) * w + z_empty.
    """

    def __init__(
        self,
        clip_l: ClipTextEncoder | None,
        clip_g: ClipTextEncoder | None,
        t5: T5EncoderModel | None = None,
        context_dim: int | None = None,
        tokenizer=None,
        out_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer = tokenizer
        self.out_dtype = out_dtype
        # CLIPSetLastLayer's layer while encoding (last_layer) for the CLIPs and for T5; None: the defaults
        self.clip_layer: int | None = None
        self.t5_layer: int | None = None
        self.l_width = clip_l.width if clip_l is not None else CLIP_L_WIDTH
        self.g_width = clip_g.width if clip_g is not None else CLIP_G_WIDTH
        if context_dim is None:
            context_dim = t5.config.d_model if t5 is not None else DEFAULT_CONTEXT_DIM
        self.context_dim = context_dim
        if clip_g is not None and clip_g.text_projection is None:
            raise InputError("CLIP-G needs its text_projection (SD3 uses the projected pooled output)")
        if t5 is not None and t5.config.d_model != context_dim:
            raise InputError(f"T5 width {t5.config.d_model} differs from context_dim {context_dim}")
        if self.l_width + self.g_width > context_dim:
            raise InputError(f"CLIP widths {self.l_width}+{self.g_width} exceed context_dim {context_dim}")
        g_pool = clip_g.config.projection_dim if clip_g is not None else CLIP_G_WIDTH
        self.pooled_dim = self.l_width + g_pool

    def _models(self) -> dict[str, nn.Module]:
        named = {"l": self.clip_l, "g": self.clip_g, "t5": self.t5}
        return {k: m for k, m in named.items() if m is not None}

    @property
    def device(self) -> torch.device:
        for m in self._models().values():
            return _compute_device(m)
        return torch.device("cpu")

    @contextmanager
    def last_layer(self, layer: int | None, t5: bool = True) -> Iterator[None]:
        """Encode with ComfyUI's CLIPSetLastLayer `layer` (-1 .. -24) for the block: every encoder's output
        taken after that layer (SD3ClipModel.set_clip_options: CLIP-L, CLIP-G and T5 alike; CLIP un-normed,
        T5 through its final LayerNorm; an encoder shallower than |layer| gives its last, normed output).
        None: the defaults (CLIP -2, T5 last). t5=False: the CLIPs only (diffusers' clip_skip)."""
        before = self.clip_layer, self.t5_layer
        self.clip_layer = layer
        if t5:
            self.t5_layer = layer
        try:
            yield
        finally:
            self.clip_layer, self.t5_layer = before

    def _run(self, name: str, rows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Encode token rows (grouped by length; rows are independent: no attention mask)."""
        model = self._models()[name]
        device = _compute_device(model)
        out: list = [None] * len(rows)
        by_len: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_len.setdefault(len(r), []).append(i)
        for idx in by_len.values():
            ids = torch.tensor([rows[i] for i in idx], dtype=torch.long, device=device)  # [N, L]
            if name == "t5":
                hidden, pooled = _t5_states(model, ids, self.t5_layer), None  # [N, L, C]
            else:
                hidden, pooled = model(ids, -2 if self.clip_layer is None else self.clip_layer)  # [N, L, H], [N, H]
                if name == "g":
                    pooled = model.text_projection(pooled)  # [N, P]
            hidden = hidden.to(self.device, self.out_dtype)
            pooled = pooled.to(self.device, self.out_dtype) if pooled is not None else None
            for j, i in enumerate(idx):
                out[i] = (hidden[j], pooled[j] if pooled is not None else None)
        return out

    @torch.no_grad()
    def encode_each(self, token_batch: Sequence[Mapping] | Mapping) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per prompt: (context [1, L_i, C], pooled [1, P]); lengths may differ between prompts."""
        if isinstance(token_batch, Mapping):
            token_batch = [token_batch]
        models = self._models()
        rows: dict[str, list[list[int]]] = {k: [] for k in models}
        plan: list[dict] = []  # per prompt, per model: (row indices, weights, empty-row index)
        for p, tokens in enumerate(token_batch):
            entry = {}
            for name in models:
                chunks = tokens.get(name)
                if name == "t5":
                    if chunks is None:
                        raise InputError(f"prompt {p}: the T5 encoder is loaded but the tokens have no 't5' ids")
                    chunks = [chunks]
                    weights = [tokens["t5_weights"]] if tokens.get("t5_weights") is not None else None
                else:
                    weights = tokens.get(f"{name}_weights")
                if not chunks or any(len(c) == 0 for c in chunks):
                    raise InputError(f"prompt {p}: no '{name}' tokens")
                if weights is not None and [len(w) for w in weights] != [len(c) for c in chunks]:
                    raise InputError(f"prompt {p}: '{name}_weights' do not match the '{name}' token shape")
                idx = list(range(len(rows[name]), len(rows[name]) + len(chunks)))
                rows[name] += [list(c) for c in chunks]
                empty = None
                if weights is not None and any(w != 1.0 for ws in weights for w in ws):
                    empty = len(rows[name])
                    rows[name].append(_empty_row(name, max(len(c) for c in chunks)))
                else:
                    weights = None
                entry[name] = (idx, weights, empty)
            plan.append(entry)
        encoded = {name: self._run(name, r) for name, r in rows.items() if r}
        return [self._assemble(entry, encoded) for entry in plan]

    def _part(self, name: str, entry: dict, encoded: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One model's states for one prompt: [1, chunks*L, W] and the first chunk's pooled [1, P]."""
        idx, weights, empty = entry[name]
        states = []
        for k, i in enumerate(idx):
            z = encoded[name][i][0]  # [L, W]
            if weights is not None:
                z_empty = encoded[name][empty][0][: z.shape[0]]
                w = torch.tensor(weights[k], dtype=z.dtype, device=z.device)[:, None]  # [L, 1]
                z = torch.where(w != 1.0, (z - z_empty) * w + z_empty, z)
            states.append(z)
        pooled = encoded[name][idx[0]][1]
        return torch.cat(states, dim=0)[None], (pooled[None] if pooled is not None else None)

    def _assemble(self, entry: dict, encoded: dict) -> tuple[torch.Tensor, torch.Tensor]:
        dev, dt = self.device, self.out_dtype
        lg = None
        l_pooled = torch.zeros(1, self.l_width, device=dev, dtype=dt)
        g_pooled = torch.zeros(1, self.pooled_dim - self.l_width, device=dev, dtype=dt)
        if "l" in entry:
            lg, l_pooled = self._part("l", entry, encoded)  # [1, N*77, 768]
        if "g" in entry:
            g_out, g_pooled = self._part("g", entry, encoded)  # [1, N*77, 1280]
            if lg is not None:
                cut = min(lg.shape[1], g_out.shape[1])
                lg = torch.cat([lg[:, :cut], g_out[:, :cut]], dim=-1)  # [1, N*77, 2048]
            else:
                lg = nn.functional.pad(g_out, (self.l_width, 0))
        if lg is not None:
            lg = nn.functional.pad(lg, (0, self.context_dim - lg.shape[-1]))  # [1, N*77, C]
        out = lg
        if "t5" in entry:
            t5_out, _ = self._part("t5", entry, encoded)  # [1, T, C]
            out = t5_out if lg is None else torch.cat([lg, t5_out], dim=1)
        if out is None:
            out = torch.zeros(1, 77, self.context_dim, device=dev, dtype=dt)
        return out, torch.cat([l_pooled, g_pooled], dim=-1)  # [1, L, C], [1, P]

    def encode(self, token_batch: Sequence[Mapping] | Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """Token dicts (from ``SD3Tokenizer.tokenize``) -> (context [B, L, C], pooled [B, P]).
        Prompts whose contexts differ in length are batched with :func:`concat_contexts`."""
        return _join(self.encode_each(token_batch))

    def encode_prompts(self, prompts: Sequence[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize with ``self.tokenizer`` (an ``SD3Tokenizer``) and :meth:`encode`."""
        return self.encode_prompt_groups([prompts] if isinstance(prompts, str) else prompts)[0]

    def encode_prompt_groups(self, *groups: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Several prompt lists (e.g. prompts and negatives) in ONE batch through each text encoder
        (half the launches and weight reads of one call per list; rows are independent, but the batch
        size can change the rounding) -> (context, pooled) per list, as :meth:`encode_prompts` gives."""
        if self.tokenizer is None:
            raise InputError("SD3TextEncoder.encode_prompts needs a tokenizer (pass tokenizer=SD3Tokenizer(...))")
        each = self.encode_each([self.tokenizer.tokenize(p) for g in groups for p in g])
        out, start = [], 0
        for g in groups:
            out.append(_join(each[start:start + len(g)]))
            start += len(g)
        return out

    def forward(self, token_batch: Sequence[Mapping] | Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(token_batch)
