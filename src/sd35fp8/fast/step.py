"""MMDiTEngine: the MMDiT forward restructured for speed, over the wrapped model's own parameters.

    engine = sd35fp8.fast.build_engine(model, device)     # how every road builds it (fast/engine.py)
    v = engine(x, sigma, context, pooled, skip_layers=())  # same contract as MMDiT.forward

What changes against models/mmdit.py (same math, see tests/test_fast.py):
- adaLN: c is the same for every block, so the adaLN weights of all joint blocks live in ONE
  contiguous [sum n_i*C, C] buffer and one matmul per step gives every block's shift/scale/gate
  (rows in pairs, M = 2, when model.batch_invariant, as MMDiT.forward: models.mmdit.per_row).
  The wrapped model's adaLN parameters are re-pointed at views of that buffer (values unchanged,
  no second copy; the model still runs on its own).
- LayerNorm + modulate (+ per-token fp8 quantise) is one pass producing the qkv / fc1 input (the
  fc1 one also adds the attention residual first); GELU(tanh) (+ quantise) one pass producing the
  fc2 input (fast/kernels.py Triton kernels, also inside the compiled graph).
- Attention: FP8 flash attention in Triton (fast/attention_triton.py) for the FP8 matmul modes on
  sm_89+, cuDNN SDPA otherwise.
- Weight-only FP8 dequantises each weight in one Triton pass (fp8/dequant.py) before the bf16 GEMM.
- Per-block function `joint_block` takes its weights as a dict of tensors, so torch.compile
  compiles it once per block *shape* (2 graphs for Large, 3 for Medium), not once per block.
- CUDA graphs (fast/graphs.py) replay the whole step per fixed (shape, skip_layers).

FP8 modes (fp8/linear.py's meaning, vocabulary fp8.device.MODES): `fp8_mode` is the engine's mode
for joint-block linears (qkv, proj, fc1, fc2, adaLN). FP8Linear weights of a model converted by
fp8.quantize_model are used as they are (no copy). With `per_layer=True` (build_engine's choice) a
linear whose own mode differs keeps it: an nn.Linear a precision policy left 16-bit runs 16-bit,
an FP8Linear that falls back to weight_only (shape not a multiple of 16) runs weight_only (its mode
string sits in the block's weight dict under `<name>.mode`). With `per_layer=False` (benchmarks:
one mode everywhere) nn.Linear weights are quantised per output channel at wrap time (the only copy).
Embedders and the final layer run through the model's own modules (whatever the policy left them).

Block streaming (offload="sequential", fast/engine.py): each joint block's weight dict is packed into
pinned CPU memory (offload.TensorPack) and a BlockStreamer copies it into a device slot, with
prefetch, just before the block runs; the block function gets a dict of views of that slot.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sd35fp8.errors import InputError
from sd35fp8.fast.ada_memo import adaln_gemv, build_memo
from sd35fp8.fast.attention import BACKENDS, EMULATED_KINDS, LIBRARY_KINDS, TRITON_KINDS, attend, backend_context
from sd35fp8.fast.graphs import GraphCache
from sd35fp8.fast.weights import (HIGH_PRECISION, MM_OUT_DTYPE, PADDED_LINEARS, auto_attention, linear_weights,
                                  pad_output_rows, put)
from sd35fp8.fast.kernels import (GEMV_MAX_ROWS, IMPLS, fp8_weight_gemv, gelu_act, ln_modulate_act, plain_act,
                                   plain_act_window, residual_ln_modulate_act, static_row_scale)
from sd35fp8.fp8.dequant import dequantize
from sd35fp8.fp8.device import MODES, fp8_gemm_fp32, rowwise_scaled_mm
from sd35fp8.fp8.scaling import E4M3_MAX, amax_to_scale
from sd35fp8.lora import fused
from sd35fp8.lora.apply import apply_lora, weights_generation
from sd35fp8.models.mmdit import MMDiT, batched, per_image, per_row

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_TOKENS = 154  # CLIP 77 + T5 77 tokens: a prompt up to 75 tokens (t5_min_length 77)



# ---------------------------------------------------------------------------------- matmul
def matmul(p: dict, name: str, a: torch.Tensor, a_scale: torch.Tensor | None, mode: str | None,
           out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """a [M, K] -> [M, N] with the weights p[name + '.w' / '.ws' / '.b'].

    fast_accum: torch._scaled_mm's use_fast_accum (Hopper: no periodic promotion of the fp8 MMA
    partial sums to fp32; faster, slightly less exact). p[name + '.n']: the weight's rows are padded
    (fast/weights.py pad_output_rows); the result is the first n columns of the padded output (a view)."""
    w, b = p[name + ".w"], p.get(name + ".b")
    n = p.get(name + ".n")
    if mode is None:
        y = F.linear(a, w, b)
    elif mode == "weight_only":
        y = F.linear(a, dequantize(w, p[name + ".ws"], a.dtype), b)
    elif not rowwise_scaled_mm(a.device):  # per-tensor-only _scaled_mm (fp8.device.matmul_scaling)
        y = _matmul_scaled_after(a, w, a_scale, p[name + ".ws"], b, out_dtype)
    elif (pack := _lora_pack(p, name, mode)) is not None:  # the LoRA inside the one GEMM (lora/fused.py)
        y = fused.fused_matmul(a, a_scale, pack, b if n is None else b[:n], MM_OUT_DTYPE, fast_accum)
        return y if out_dtype == MM_OUT_DTYPE else y.to(out_dtype)  # the pack holds the layer's own n rows
    else:
        y = torch._scaled_mm(a, w.t(), scale_a=a_scale, scale_b=p[name + ".ws"], bias=b, out_dtype=MM_OUT_DTYPE,
                             use_fast_accum=fast_accum)
        y = y if out_dtype == MM_OUT_DTYPE else y.to(out_dtype)
    if n is not None:  # padded rows: the first n columns, a view whose rows lie w.shape[0] apart
        y, b = y[:, :n], None if b is None else b[:n]
    lora = p.get(name + ".lora")  # the layer's active LoRA terms (lora/apply.py); empty: nothing to add
    return apply_lora(y, a, lora, b, a_scale) if lora else y


def _lora_pack(p: dict, name: str, mode: str | None) -> fused.FusedPack | None:
    """The layer's fused LoRA pack (lora/fused.py) when its slot has terms and it runs an fp8 matmul
    mode eagerly from resident weights; None: no LoRA, or apply_lora after the GEMM (a streamed block's
    weights sit in a reused device slot, and a pack would hold a device copy of them)."""
    if mode not in ("dynamic", "static") or p.get("streamed") or torch.compiler.is_compiling():
        return None
    slot = p.get(name + ".lora")
    if not slot:
        return None
    n = p.get(name + ".n")  # padded rows (pad_output_rows): the pack takes the layer's own n
    w, ws = (p[name + ".w"], p[name + ".ws"]) if n is None else (p[name + ".w"][:n], p[name + ".ws"][:, :n])
    return fused.pack_for(slot, w, ws)


def _spare(p: dict, name: str, mode: str | None) -> int:
    """Spare input columns the activation kernel leaves for the layer's fused LoRA (0: none)."""
    pack = _lora_pack(p, name, mode)
    return 0 if pack is None else pack.rank


def _matmul_scaled_after(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                         b: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """(a * a_scale) @ (w * w_scale).T + b where `_scaled_mm` takes scalar scales only: a scale-1 fp8
    GEMM in fp32 (fp8.device.fp8_gemm_fp32), then the per-token [M, 1] and per-channel scales.
    a [M, K] fp8, w [N, K] fp8."""
    y = fp8_gemm_fp32(a, w)  # [M, N]
    y = y * a_scale.float() * w_scale.float().reshape(1, -1)
    if b is not None:
        y = y + b.float()
    return y.to(MM_OUT_DTYPE).to(out_dtype)  # rounded through bf16 like the rowwise kernel's output


def _record(rec: dict | None, name: str, a_scale: torch.Tensor | None) -> None:
    if rec is not None and a_scale is not None:  # dynamic scales are amax / 448 per token
        amax = a_scale.amax() * E4M3_MAX
        rec[name] = amax if name not in rec else torch.maximum(rec[name], amax)


def _lm(p: dict, name: str, mode: str | None) -> str | None:
    """The mode of linear `name`: its own `.mode` entry when it differs from the block's, else `mode`."""
    own = p.get(name + ".mode")
    if own is None:
        return mode
    return None if own == HIGH_PRECISION else own


def _linear_on(p, name, act, mode, dtype, rec):
    a, s = act
    _record(rec, name, s)
    return matmul(p, name, a, s, mode, dtype, fast_accum=bool(p.get("fast_accum")))


def _rms(t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return t if w is None else F.rms_norm(t, (t.shape[-1],), w, eps=1e-6)


class Residual(NamedTuple):
    """x + gate * y not added yet: a block's last residual, which the next block's first LayerNorm pass
    adds on its way (kernels.residual_ln_modulate_act) instead of a pass of its own (MMDiTEngine defers
    it between joint blocks; `settle` adds it where a plain tensor is needed)."""

    x: torch.Tensor  # [B, L, C]
    gate: torch.Tensor  # [B, C]
    y: torch.Tensor  # [B*L, C]


def settle(x: torch.Tensor | Residual) -> torch.Tensor:
    if isinstance(x, Residual):
        return torch.addcmul(x.x, x.gate.unsqueeze(1), x.y.view(x.x.shape))
    return x


def _stream(x: torch.Tensor | Residual) -> torch.Tensor:
    """The stream tensor before its pending residual (its shape is the stream's)."""
    return x.x if isinstance(x, Residual) else x


def _qkv_out(p, name, x, shift, scale, mode, rec, impl):
    """modulate(LN(x)) -> (x, the qkv linear's output [B, L, 3*C]); x a Residual: added in the same pass
    (the returned x is the sum)."""
    mode = _lm(p, name, mode)
    xs, spare = p.get(name + ".xs"), _spare(p, name, mode)
    if isinstance(x, Residual):
        x, act = residual_ln_modulate_act(x.x, x.gate, x.y, shift, scale, mode, xs, impl, spare)
    else:
        act = ln_modulate_act(x, shift, scale, mode, xs, impl, spare)
    B, L, C = x.shape
    return x, _linear_on(p, name, act, mode, x.dtype, rec).view(B, L, 3 * C)


def _qkv(p, name, x, shift, scale, mode, heads, rec, impl):
    """modulate(LN(x)) -> (x, (q, k, v) [B, L, H, D]) (q, k RMS-normed; x as _qkv_out)."""
    x, qkv = _qkv_out(p, name, x, shift, scale, mode, rec, impl)
    B, L, C = x.shape
    q, k, v = qkv.view(B, L, 3, heads, C // heads).unbind(2)
    stem = name.rsplit(".", 1)[0]
    return x, (_rms(q, p.get(stem + ".ln_q")), _rms(k, p.get(stem + ".ln_k")), v)


FP8_JOINT_KINDS = ("triton_fp8", *LIBRARY_KINDS)  # joint_block's fused FP8 attention road (_fp8_attention)
# FP8 attention key -> (ctx stem, x stem, ctx proj, x proj): "self" is a single block's attention (x alone)
ATTN_KEYS = {"attn": ("c", "x", "c.proj", "x.proj"), "x.attn2": ("x.attn2", "x.attn2", None, "x.attn2.proj"),
             "self": ("x", "x", None, "x.proj")}


# dynamic mode: the FP8 attention writes its outputs as the proj GEMMs' e4m3 inputs, one scale per batch row
# (attention_triton.joint_attention_fp8_rows_op), instead of bf16 and a per-token quantise pass; False: the latter
# (benchmarks/faster.py times both)
ATTN_OUT_ROWS = True


def _fp8_attention(p, key, qkv_c, qkv_x, n_ctx, heads, mode, rec, kind: str = "triton_fp8"):
    """FP8 joint attention from the raw qkv outputs, qk RMS-norm (weights p[stem + '.ln_q' / '.ln_k'])
    fused (fast/attention_triton.py) -> (o_ctx [B, Lc, C], o_x [B, Lx, C]). key: "attn" (joint) or
    "x.attn2" (MMDiT-X self-attention, n_ctx 0). Static mode with calibrated scales (p[key + '.s']
    [3, H]): no amax pass, and the outputs come as e4m3 scaled for the proj linears. Dynamic mode
    (ATTN_OUT_ROWS, proj linears dynamic): each output comes as (e4m3 [B, L, C], row scales [B*L, 1]) for
    its proj linear. `rec` (calibration): records the per-head q/k/v amax under `key`. kind "fa3_fp8":
    FlashAttention-3's FP8 forward (fast/attention_fa3.py) in dynamic mode, its bf16 output quantised per token
    for the proj linears in one pass a stream (fast/kernels.py plain_act_window); static mode and calibration
    take the Triton kernel."""
    from sd35fp8.fast.attention_triton import joint_attention_amax, joint_attention_fp8_op, joint_attention_fp8_rows_op

    stem_c, stem_x, proj_c, proj_x = ATTN_KEYS[key]
    w = (p.get(stem_c + ".ln_q"), p.get(stem_c + ".ln_k"), p.get(stem_x + ".ln_q"), p.get(stem_x + ".ln_k"))
    if rec is not None:
        amax = joint_attention_amax(qkv_c, qkv_x, n_ctx, heads, *w)  # [3, H]
        rec[key] = amax if key not in rec else torch.maximum(rec[key], amax)
    projs = [n for n in (proj_c, proj_x) if n is not None and n + ".w" in p]
    projs_dynamic = all(_lm(p, n, mode) == "dynamic" for n in projs)
    if kind == "fa3_fp8" and mode == "dynamic" and rec is None:
        from sd35fp8.fast.attention_fa3 import joint_attention_fa3_op

        o = joint_attention_fa3_op(qkv_c, qkv_x, n_ctx, heads, *w)  # [B, Lc + Lx, C] bf16
        if not projs_dynamic:
            return o[:, :n_ctx], o[:, n_ctx:]
        windows = ((0, n_ctx), (n_ctx, o.shape[1] - n_ctx))  # each proj's input: per-token e4m3 of its rows
        return tuple(plain_act_window(o, start, n, "dynamic") if n else None for start, n in windows)
    if mode == "dynamic" and rec is None and ATTN_OUT_ROWS and projs_dynamic:
        oc, ox, sc, sx = joint_attention_fp8_rows_op(qkv_c, qkv_x, n_ctx, heads, *w)
        return (oc, sc), (ox, sx)
    projs_static = all(_lm(p, n, mode) == "static" for n in projs)
    out_scale = None
    if mode == "static" and projs_static and p.get(proj_x + ".xs") is not None:
        xs_x = p[proj_x + ".xs"].reshape(1)
        xs_c = p[proj_c + ".xs"].reshape(1) if proj_c is not None and proj_c + ".xs" in p else xs_x
        out_scale = torch.cat([xs_c, xs_x]).float()  # [2]
    qkv_scale = p.get(key + ".s") if mode == "static" else None
    return joint_attention_fp8_op(qkv_c, qkv_x, n_ctx, heads, *w, qkv_scale=qkv_scale, out_scale=out_scale)


def _proj(p, name, o, mode, dtype, rec, impl):
    """Attention output o [B, L, C] (fp8: already quantised with p[name + '.xs']; or (e4m3 [B, L, C], row
    scales [B*L, 1]) from the dynamic FP8 attention) -> proj(o) [B*L, C]."""
    mode = _lm(p, name, mode)
    if isinstance(o, tuple):
        o8, s = o
        return _linear_on(p, name, (o8.view(-1, o8.shape[-1]), s), mode, dtype, rec)
    B, L, C = o.shape
    if o.dtype == torch.float8_e4m3fn:
        act = (o.view(B * L, C), static_row_scale(p[name + ".xs"], B * L))
    else:
        act = plain_act(o.reshape(B * L, C), mode, p.get(name + ".xs"), impl, _spare(p, name, mode))
    return _linear_on(p, name, act, mode, dtype, rec)


def _attn_residual_then_mlp_input(p, s, x, gate, y, shift, scale, mode, impl):
    """x + gate * y, and the fc1 input modulate(LN(that)), in one pass (fast/kernels.py)."""
    m1 = _lm(p, s + ".fc1", mode)
    return residual_ln_modulate_act(x, gate, y, shift, scale, m1, p.get(s + ".fc1.xs"), impl, _spare(p, s + ".fc1", m1))


def _mlp_residual(p, s, x, act, gate, mode, rec, impl, defer: bool = False):
    """x + gate * fc2(GELU(fc1(act))); act = the fc1 input. defer: as a Residual (not added yet)."""
    m1, m2 = _lm(p, s + ".fc1", mode), _lm(p, s + ".fc2", mode)
    h = _linear_on(p, s + ".fc1", act, m1, x.dtype, rec)
    act = gelu_act(h, m2, p.get(s + ".fc2.xs"), impl, _spare(p, s + ".fc2", m2))
    res = Residual(x, gate, _linear_on(p, s + ".fc2", act, m2, x.dtype, rec))
    return res if defer else settle(res)


def joint_block(p: dict, ctx: torch.Tensor, x: torch.Tensor, mods_c: torch.Tensor, mods_x: torch.Tensor,
                mode: str | None, heads: int, rec: dict | None = None,
                impl: str = "auto", attn: str = "sdpa", defer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One joint block. ctx [B, Lc, C], x [B, Lx, C] (or Residuals: added by the first LayerNorm pass);
    mods_* [B, n*C] = this block's adaLN output. defer: return the MLP residuals as Residuals.

    Chunks as in the reference: shift, scale, gate (msa), shift, scale, gate (mlp)[, msa2 x3].
    `impl`: the elementwise kernels' implementation (fast/kernels.py act_impl); `attn`: "sdpa" or a
    Triton attention kind (fast/attention.py attend).
    """
    C = _stream(x).shape[-1]
    m = lambda mods, i: mods[:, i * C:(i + 1) * C]  # noqa: E731  [B, C]
    n_ctx = _stream(ctx).shape[1]
    if attn in FP8_JOINT_KINDS:  # q/k norm, concatenation and fp8 quantisation in one pass
        ctx, qkv_c = _qkv_out(p, "c.qkv", ctx, m(mods_c, 0), m(mods_c, 1), mode, rec, impl)  # [B, Lc, 3C]
        x, qkv_x = _qkv_out(p, "x.qkv", x, m(mods_x, 0), m(mods_x, 1), mode, rec, impl)  # [B, Lx, 3C]
        o_c, o_x = _fp8_attention(p, "attn", qkv_c, qkv_x, n_ctx, heads, mode, rec, attn)  # [B, Lc, C], [B, Lx, C]
    else:
        ctx, (qc, kc, vc) = _qkv(p, "c.qkv", ctx, m(mods_c, 0), m(mods_c, 1), mode, heads, rec, impl)  # [B, Lc, H, D]
        x, (qx, kx, vx) = _qkv(p, "x.qkv", x, m(mods_x, 0), m(mods_x, 1), mode, heads, rec, impl)  # [B, Lx, H, D]
        o = attend(torch.cat([qc, qx], 1), torch.cat([kc, kx], 1), torch.cat([vc, vx], 1), attn)  # [B, Lc+Lx, C]
        o_c, o_x = o[:, :n_ctx], o[:, n_ctx:]
    if "c.proj.w" in p:  # not the last (pre-only) context block
        y = _proj(p, "c.proj", o_c, mode, ctx.dtype, rec, impl)
        ctx, act = _attn_residual_then_mlp_input(p, "c", ctx, m(mods_c, 2), y, m(mods_c, 3), m(mods_c, 4), mode, impl)
        ctx = _mlp_residual(p, "c", ctx, act, m(mods_c, 5), mode, rec, impl, defer)
    y = _proj(p, "x.proj", o_x, mode, x.dtype, rec, impl)
    gate = m(mods_x, 2)
    if "x.attn2.qkv.w" in p:  # MMDiT-X self-attention on the same normed input, its own modulation
        if attn in FP8_JOINT_KINDS:
            qkv2 = _qkv_out(p, "x.attn2.qkv", x, m(mods_x, 6), m(mods_x, 7), mode, rec, impl)[1]  # [B, Lx, 3C]
            o2 = _fp8_attention(p, "x.attn2", qkv2, qkv2, 0, heads, mode, rec, attn)[1]  # [B, Lx, C]
        else:
            o2 = attend(*_qkv(p, "x.attn2.qkv", x, m(mods_x, 6), m(mods_x, 7), mode, heads, rec, impl)[1], attn)
        x = torch.addcmul(x, gate.unsqueeze(1), y.view(x.shape))
        y, gate = _proj(p, "x.attn2.proj", o2, mode, x.dtype, rec, impl), m(mods_x, 8)
    x, act = _attn_residual_then_mlp_input(p, "x", x, gate, y, m(mods_x, 3), m(mods_x, 4), mode, impl)
    x = _mlp_residual(p, "x", x, act, m(mods_x, 5), mode, rec, impl, defer)
    return ctx, x


def stream_weights(p: dict, s: str, db: nn.Module, where: str, mode: str | None, dtype: torch.dtype,
                   per_layer: bool) -> tuple[nn.Module, str]:
    """Put one stream's linears (a models.mmdit.DismantledBlock `db`: attention qkv / proj, attn2, MLP) into
    the block's weight dict `p` under `s` ("c", "x") -> (its adaLN linear, that linear's name)."""
    attns = [("attn", db.attn)] + ([("attn2", db.attn2)] if db.attn2 is not None else [])
    for an, attn in attns:
        stem = f"{s}.qkv" if an == "attn" else f"{s}.attn2.qkv"
        put(p, stem, linear_weights(attn.qkv, mode, dtype, f"{where}.{an}.qkv", per_layer))
        if attn.ln_q is not None:
            p[stem[:-4] + ".ln_q"] = attn.ln_q.weight.detach()  # "c.ln_q", "x.attn2.ln_q"
            p[stem[:-4] + ".ln_k"] = attn.ln_k.weight.detach()
        if attn.proj is not None:
            put(p, stem[:-4] + ".proj", linear_weights(attn.proj, mode, dtype, f"{where}.{an}.proj", per_layer))
    if db.mlp is not None:
        put(p, f"{s}.fc1", linear_weights(db.mlp.fc1, mode, dtype, f"{where}.mlp.fc1", per_layer))
        put(p, f"{s}.fc2", linear_weights(db.mlp.fc2, mode, dtype, f"{where}.mlp.fc2", per_layer))
    return db.adaLN_modulation[1], f"{where}.adaLN_modulation.1"


def single_block(p: dict, x: torch.Tensor, mods: torch.Tensor, mode: str | None, heads: int, rec: dict | None = None,
                 impl: str = "auto", attn: str = "sdpa") -> torch.Tensor:
    """One self-attention block without context (the SD3.5 ControlNets' models.controlnet.SingleBlock):
    the x stream of joint_block with attention over x alone. x [B, L, C]; mods [B, 6*C]; weights "x.*"."""
    C = x.shape[-1]
    m = lambda i: mods[:, i * C:(i + 1) * C]  # noqa: E731  [B, C]
    if attn in FP8_JOINT_KINDS:
        qkv = _qkv_out(p, "x.qkv", x, m(0), m(1), mode, rec, impl)[1]  # [B, L, 3C]
        o = _fp8_attention(p, "self", qkv, qkv, 0, heads, mode, rec, attn)[1]  # [B, L, C]
    else:
        o = attend(*_qkv(p, "x.qkv", x, m(0), m(1), mode, heads, rec, impl)[1], attn)
    y = _proj(p, "x.proj", o, mode, x.dtype, rec, impl)
    x, act = _attn_residual_then_mlp_input(p, "x", x, m(2), y, m(3), m(4), mode, impl)
    return _mlp_residual(p, "x", x, act, m(5), mode, rec, impl)


class MMDiTEngine(nn.Module):
    """The MMDiT's executor, with MMDiT's forward contract. See the module docstring; build it with
    fast.build_engine (which reads the mode from the weights and the device and sets the flags)."""

    def __init__(self, model: MMDiT, fp8_mode: str | None = None, compile: bool = False, cuda_graphs: bool = False,
                 attention_backend: str | None = "auto", compile_mode: str = "default", kernels: str = "triton",
                 fast_accum: bool = True, per_layer: bool = False, device: torch.device | str | None = None,
                 attention_16bit_blocks: Sequence[int] = ()):
        super().__init__()
        if fp8_mode is not None and fp8_mode not in MODES:
            raise InputError(f"MMDiTEngine: fp8_mode {fp8_mode!r} not in {MODES} or None")
        if kernels not in IMPLS:
            raise InputError(f"MMDiTEngine: kernels {kernels!r} not in {IMPLS}")
        # elementwise kernels (fast/kernels.py): "triton" = our one-pass kernels on CUDA, also inside the
        # compiled graph (measured faster than Inductor's fusion: 104.4 vs 108.5 ms, Large static, H100);
        # "auto" = Inductor fuses torch ops under compile; torch ops on CPU either way
        self.kernels = kernels
        # dynamic / static: torch._scaled_mm(use_fast_accum=...) for every fp8 GEMM (see matmul). Default on:
        # Large static compiled 97.4 -> 90.6 ms, Medium 41.1 -> 39.3 ms, step SQNR unchanged (28.9 / 30.2 dB;
        # H100, benchmarks/speed.py '+acc'); torchao's float8 inference uses it too
        self.fast_accum = bool(fast_accum) and fp8_mode in ("dynamic", "static")
        self.model = model
        self.config = model.config
        self.fp8_mode = fp8_mode
        self.per_layer = per_layer
        self.dtype = model.x_embedder.proj.weight.dtype
        device = torch.device(device) if device is not None else model.x_embedder.proj.weight.device
        self.device = device
        if attention_backend == "auto":
            attention_backend = auto_attention(device, fp8_mode)
        if attention_backend in ("cudnn", "flash") and self.dtype == torch.float32:
            # cuDNN and flash SDPA take 16-bit only ("No available kernel" on a float32 model): the memory-
            # efficient kernel takes float32
            logger.info("MMDiTEngine: a float32 model: SDPA on the memory-efficient kernel instead of %s",
                        attention_backend)
            attention_backend = "efficient"
        self.attention_backend = attention_backend
        kinds = (*TRITON_KINDS, *EMULATED_KINDS, *LIBRARY_KINDS)
        if self.attention_backend is not None and self.attention_backend not in (*BACKENDS, *kinds):
            raise InputError(f"MMDiTEngine: attention_backend {attention_backend!r} not in "
                             f"{('auto', None, *BACKENDS, *kinds)}")
        if self.attention_backend in LIBRARY_KINDS:
            from sd35fp8.fast import attention_fa3

            attention_fa3.check(device)
        self._attn = self.attention_backend if self.attention_backend in kinds else "sdpa"
        # joint blocks whose attention stays 16-bit SDPA (torch's backend choice) under an FP8 attention kind:
        # an attention policy's kept blocks (fp8/attention_policy.py)
        depth = len(model.joint_blocks)
        bad = [i for i in attention_16bit_blocks if not 0 <= int(i) < depth]
        if bad:
            raise InputError(f"MMDiTEngine: attention_16bit_blocks {bad} outside the model's {depth} joint blocks")
        self.attention_16bit_blocks = frozenset(int(i) for i in attention_16bit_blocks)
        self.compile_seconds = 0.0
        self.offload = "none"
        self.streamer = None  # offload.BlockStreamer over self.packs (fast/engine.py stream_blocks)
        self.packs: list = []
        with torch.no_grad():
            self._build_weights()
        self._compiled = compile
        self._block_fn = joint_block
        if compile:
            import torch._dynamo as dynamo

            # one graph per block shape and batch size; raise dynamo's per-function limit (default 8)
            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
            self._block_fn = torch.compile(joint_block, dynamic=False, mode=compile_mode, fullgraph=True)
        self.graphs = GraphCache(self._forward, self.lora_state) if cuda_graphs and device.type == "cuda" else None

    # -------------------------------------------------------------- wrap-time weight layout
    def _build_weights(self) -> None:
        self._weights_gen = weights_generation()  # fuse/unfuse since: refresh_weights (forward checks)
        mode, dt = self.fp8_mode, self.dtype
        self.blocks: list[dict] = []
        ada = []  # (block index, stream, module)
        for i, jb in enumerate(self.model.joint_blocks):
            p: dict = {}
            for s, db in (("c", jb.context_block), ("x", jb.x_block)):
                where = f"joint_blocks.{i}.{'context_block' if s == 'c' else 'x_block'}"
                ada.append((i, s, *stream_weights(p, s, db, where, mode, dt, self.per_layer)))
            xb = jb.x_block  # the image stream's N = hidden GEMMs, padded for the GEMM's tiling (fast/weights.py)
            layers = {"x.proj": xb.attn.proj, "x.fc2": None if xb.mlp is None else xb.mlp.fc2}
            for name in PADDED_LINEARS:
                pad_output_rows(p, name, layers[name], _lm(p, name, mode))
            if self.fast_accum:
                p["fast_accum"] = True  # a constant for the compiled block (read by _linear_on)
            self.blocks.append(p)
        self._build_adaln(ada)
        # every LoRA slot the step reads (the lists shared with the layers, lora/apply.py): lora_state
        self.lora_slots: list[list] = ([v for p in self.blocks for k, v in p.items() if k.endswith(".lora")]
                                       + [slot for _, _, slot in self.ada_lora])

    def lora_state(self) -> tuple[tuple, list]:
        """(tag, keep) of the active LoRA terms, the part of a CUDA graph's key that is no input
        (fast/graphs.py): per non-empty slot its index and each term's factors, DoRA scale (by
        identity: lora/apply.activate reuses them), rows and strength. A swap, a strength change or
        an unload gives another tag. keep: the
        terms' tensors, held by the graph entry so the ids stay unique while it lives."""
        tag, keep = [], []
        for i, slot in enumerate(self.lora_slots):
            for t in slot:
                tag.append((i, id(t.down), id(t.up), id(t.dora_g), t.offset, t.strength))
                keep.append(t)  # its factors, and the fused pack built on it (lora/fused.py)
        if tag:  # which road the terms take (SD35FP8_LORA_FUSED) and its pack options: a graph per road
            tag.append(("fused", fused.enabled(), fused.pack_options()))
        return tuple(tag), keep

    def _build_adaln(self, ada: list) -> None:
        """Concatenate every joint block's adaLN linear into one weight; re-point the model's params.

        One mode for the whole group: the engine's, unless (per_layer) every adaLN linear has the same
        other mode (e.g. a policy kept them 16-bit); mixed modes run 16-bit (dequantised copies)."""
        mode = self.fp8_mode
        if self.per_layer:
            own = {linear_weights(m, mode, self.dtype, where, True).get("mode") for _, _, m, where in ada}
            if len(own) > 1:
                mode = None
            elif own != {None}:
                mode = _lm({"ada.mode": own.pop()}, "ada", mode)
        self.ada_mode = mode
        lins = [linear_weights(m, mode, self.dtype, where) for _, _, m, where in ada]
        sizes = [lin["w"].shape[0] for lin in lins]
        big_w = torch.cat([lin["w"] for lin in lins])  # [sum N, C]
        self.ada = {"w": big_w}
        if mode is not None:
            self.ada["ws"] = torch.cat([lin["ws"] for lin in lins], dim=1)  # [1, sum N]
        if all(lin["b"] is not None for lin in lins):
            self.ada["b"] = torch.cat([lin["b"] for lin in lins])
        self.ada_slices: list[dict[str, tuple[int, int]]] = [{} for _ in self.blocks]
        self.ada_lora: list[tuple[int, int, list]] = []  # (first row in the big output, rows, the layer's LoRA slot)
        off = 0
        for (i, s, mod, _), n, lin in zip(ada, sizes, lins):
            self.ada_slices[i][s] = (off, off + n)
            self.ada_lora.append((off, n, lin["lora"]))
            if lin["w"] is mod.weight:  # same storage as the model's parameter: share it
                mod.weight.data = big_w[off:off + n]
            off += n
        if mode == "static":  # every adaLN layer sees the same silu(c): one scale (max of calibrated ones)
            xs = [lin.get("xs") for lin in lins]
            self.ada["xs"] = None if any(v is None for v in xs) else torch.stack(xs).amax()
        # the output rows per input row (fast/ada_memo.py): a new one with the new weights
        self.ada_memo = build_memo(self.ada, mode, self.dtype)

    # -------------------------------------------------------------- calibration (static mode)
    @torch.no_grad()
    def calibrate(self, x, sigma, context, pooled, margin: float = 1.0) -> dict[str, float]:
        """Static mode: activation amax of every fp8 linear over one dynamic-mode eager forward.

        Sets each linear's input scale = amax * margin / 448. Returns {name: amax}.
        """
        if self.fp8_mode != "static":
            raise InputError("MMDiTEngine.calibrate: only for fp8_mode='static'")
        rec_blocks = [dict() for _ in self.blocks]
        rec_ada: dict = {}
        self._forward(x, sigma, context, pooled, (), mode="dynamic", rec=(rec_ada, rec_blocks))
        out = {}
        for i, (p, rec) in enumerate(zip(self.blocks, rec_blocks)):
            for name, amax in rec.items():
                if name in ATTN_KEYS:  # FP8 attention: per-head q, k, v scales [3, H]
                    p[name + ".s"] = self._attention_scale(p, name, amax)
                    out[f"{i}.{name}"] = float(amax.max())
                    continue
                p[name + ".xs"] = amax_to_scale(amax * margin).reshape(())
                out[f"{i}.{name}"] = float(amax)
        self.ada["xs"] = amax_to_scale(rec_ada["ada"] * margin).reshape(())
        if self.ada_memo is not None:
            self.ada_memo.clear()  # rows computed with the old scale
        out["adaLN"] = float(rec_ada["ada"])
        if self.graphs is not None:
            self.graphs.clear()
        if self.packs:  # streamed blocks: the new scales travel with the packed weights
            self._repack()
        return out

    def _attention_scale(self, p: dict, key: str, amax: torch.Tensor) -> torch.Tensor:
        """Static q, k, v scales [3, H] of one FP8 attention (fast/attention_triton.static_qkv_scale)."""
        from sd35fp8.fast.attention_triton import static_qkv_scale

        stem_c, stem_x = ATTN_KEYS[key][:2]
        wq = [p.get(stem + ".ln_q") for stem in {stem_c, stem_x}]
        wk = [p.get(stem + ".ln_k") for stem in {stem_c, stem_x}]
        norms = None if any(w is None for w in wq + wk) else (tuple(wq), tuple(wk))
        return static_qkv_scale(amax, norms, self.config.hidden_size // self.config.num_heads)

    # -------------------------------------------------------------- forward
    def _adaln(self, c: torch.Tensor, mode: str | None, rec: dict | None) -> torch.Tensor:
        """silu(c) [B, C] -> every block's modulation [B, sum n_i*C] in one matmul."""
        a = F.silu(c)
        w, b = self.ada["w"], self.ada.get("b")
        if self.ada_mode != self.fp8_mode:  # the adaLN group keeps its own mode (see _build_adaln)
            mode = self.ada_mode
        if rec is None and self.ada_memo is not None and a.shape[0] <= GEMV_MAX_ROWS:  # the memo (ada_memo.py)
            y = adaln_gemv(a, self.ada, mode, c.dtype, self.ada_memo)
        elif mode is None:
            y = F.linear(a, w, b)
        elif mode == "weight_only":
            y = fp8_weight_gemv(a, w, self.ada["ws"], b, c.dtype)
        else:
            act = plain_act(a, mode, self.ada.get("xs"))
            _record(rec, "ada", act[1])
            y = matmul({"ada.w": w, "ada.ws": self.ada["ws"], "ada.b": b}, "ada", act[0], act[1], mode, c.dtype,
                       fast_accum=self.fast_accum)
        pack = fused.ada_pack_for(self.ada_lora, a.dtype)  # the slots' LoRAs grouped (lora/fused.py)
        if pack is not None:
            y = fused.ada_apply(y, a, pack)
        for off, n, slot in self.ada_lora if pack is None else pack.rest:  # one by one, on its rows of y
            if slot:
                bias = None if b is None else b[off:off + n]
                y = torch.cat([y[:, :off], apply_lora(y[:, off:off + n], a, slot, bias), y[:, off + n:]], dim=1)
        return y

    def _forward(self, x, sigma, context, pooled, skip: tuple[int, ...], mode: str | None = "model",
                 rec: tuple | None = None, control: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        model, cfg = self.model, self.config
        mode = self.fp8_mode if mode == "model" else mode
        B, _, h, w = x.shape
        p = cfg.patch_size
        hp, wp = h // p, w // p
        dt = self.dtype
        t = (sigma.reshape(-1) * 1000).expand(B)
        # batch-invariant (model.batch_invariant, as MMDiT.forward): the conditioning vectors (embedders,
        # the fused adaLN, the final layer's adaLN) in pairs of rows and the patch embedding image by image,
        # so a row's result does not depend on the other rows of the batch (models.mmdit.per_row)
        vec, img = (per_row, per_image) if model.batch_invariant else (batched, batched)
        tokens = img(model.x_embedder, x.to(dt)) + model.cropped_pos_embed(hp, wp).to(dt)  # [B, hp*wp, C]
        c = vec(lambda ti, yi: model.t_embedder(ti, dt) + model.y_embedder(yi.to(dt)), t, pooled)  # [B, C]
        ctx = model.context_embedder(context.to(dt))  # [B, L, C]
        rec_ada = None if rec is None else rec[0]
        mods = vec(lambda ci: self._adaln(ci, mode, rec_ada), c)  # [B, sum n_i*C]
        fn = self._block_fn if rec is None and mode == self.fp8_mode else joint_block
        # eager blocks hand their last residuals on as Residuals (added by the next block's first LN pass)
        extra = {"defer": True} if fn is joint_block else {}
        with backend_context(None if self._attn != "sdpa" else self.attention_backend):
            for i in range(len(self.blocks)):
                if i in skip:
                    continue
                blk = self._block_weights(i)
                (c0, c1), (x0, x1) = self.ada_slices[i]["c"], self.ada_slices[i]["x"]
                attn = "sdpa" if i in self.attention_16bit_blocks else self._attn
                ctx, tokens = fn(blk, ctx, tokens, mods[:, c0:c1], mods[:, x0:x1], mode, cfg.num_heads,
                                 None if rec is None else rec[1][i], self.kernels, attn, **extra)
                if self.streamer is not None:
                    self.streamer.done(i)
                if control is not None and control[i] is not None:  # ControlNet residual [B, hp*wp, C]
                    tokens = settle(tokens) + control[i].to(dt)
        out = model.final_layer(settle(tokens), c, vec)  # [B, hp*wp, p*p*out]
        out = out.view(B, hp, wp, p, p, cfg.out_channels)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(B, cfg.out_channels, hp * p, wp * p)
        return out.to(x.dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: Sequence[int] = (), control: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Same contract as MMDiT.forward. The first call per shape compiles / captures (slow).

        `control`: one ControlNet residual [B, hp*wp, C] (or None) per joint block, added to the x
        stream after that block as MMDiT.forward does. CUDA graphs key on which blocks get one (the
        residuals are graph inputs); the compiled per-block function is unchanged by it."""
        self.model.check_inputs(x, context, pooled, skip_layers, control)
        if control is not None and all(r is None for r in control):
            control = None
        if self.fp8_mode == "static" and self.ada.get("xs") is None:
            raise InputError("MMDiTEngine: static mode needs calibrate(x, sigma, context, pooled) first")
        skip = tuple(sorted(set(int(i) for i in skip_layers)))
        sigma = sigma.reshape(-1).to(x.device)
        if self._weights_gen != weights_generation():  # a LoRA was fused / unfused since the weights were read
            self.refresh_weights()
        t0 = time.perf_counter()
        if self.graphs is not None:
            out, fresh = self.graphs(x, sigma, context, pooled, skip, control)
        else:
            out, fresh = self._forward(x, sigma, context, pooled, skip, control=control), False
        if fresh:
            self.compile_seconds += time.perf_counter() - t0
        return out

    def warmup_inputs(self, width: int, height: int, batch: int,
                      context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> tuple[torch.Tensor, ...]:
        """Inputs shaped as the sampler calls the model for one image size: x [batch, C, height/8,
        width/8] in the engine's dtype, sigma [batch] float32, context [batch, L, ctx], pooled [batch, P]."""
        cfg, dev, dt = self.config, self.device, self.dtype
        if width % 16 or height % 16 or width <= 0 or height <= 0 or batch < 1:
            raise InputError(f"warm-up shape {width}x{height} batch {batch}: sizes must be positive multiples of 16")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, cfg.in_channels, height // 8, width // 8, generator=g).to(dev, dt)
        sigma = torch.full((batch,), 0.5, device=dev)
        context = torch.randn(batch, context_tokens, cfg.context_dim, generator=g).to(dev, dt)
        pooled = torch.randn(batch, cfg.pooled_dim, generator=g).to(dev, dt)
        return x, sigma, context, pooled

    def warmup(self, shapes: Iterable[Sequence[int]], *, cfg: bool = True, skip_layers: Sequence[int] = (),
               context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> float:
        """Compile (torch.compile) and capture (CUDA graphs) the step for each image shape now, so the
        first prompt of that shape does not pay it (a server calls this at start-up).

        shapes: (width, height, images per prompt) in pixels. With `cfg` the model runs cond + uncond as
        one batch of 2 x images (as the sampler does); `skip_layers` (skip-layer guidance) adds the
        cond-only pass with those layers skipped; context_tokens: the prompt length in tokens (154 =
        CLIP 77 + T5 77, any prompt up to 75 tokens). Returns the seconds spent; returns 0 at once when
        nothing is prepared per shape (CPU, or eager without CUDA graphs)."""
        shapes = [tuple(int(v) for v in shape) for shape in shapes]
        if self.graphs is None and not self._compiled:
            return 0.0
        t0 = time.perf_counter()
        for width, height, batch in shapes:
            x, sigma, context, pooled = self.warmup_inputs(width, height, 2 * batch if cfg else batch,
                                                           context_tokens)
            self(x, sigma, context, pooled)
            if skip_layers:
                self(x[:batch], sigma[:batch], context[:batch], pooled[:batch], skip_layers=skip_layers)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        logger.info("engine warm-up of %s: %.1f s", shapes, seconds)
        return seconds

    def _block_weights(self, i: int) -> dict:
        """Block i's weight dict: resident, or (streamed) views of the device slot holding it."""
        if self.streamer is None:
            return self.blocks[i]
        slot = self.streamer.acquire(i)  # None on CPU: the pinned views are where the inputs are
        if slot is None:
            return self.blocks[i]
        p = dict(self.blocks[i])
        p.update(self.packs[i].views(slot))
        p["streamed"] = True  # no fused LoRA packs (device copies of streamed weights): _lora_pack
        return p

    def _repack(self) -> None:
        from sd35fp8.offload import TensorPack

        for i, p in enumerate(self.blocks):
            tensors = {k: v for k, v in p.items() if isinstance(v, torch.Tensor)}
            self.packs[i] = TensorPack(tensors, f"joint_blocks.{i}")
            p.update(self.packs[i].cpu_views)
        self.streamer.packs = self.packs

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the engine's weights: 'blocks' (joint-block linears, norms), 'adaln' (the fused adaLN),
        'other' (embedders, final layer, pos_embed), 'total', 'adaln_memo' (the adaLN output rows kept,
        fast/ada_memo.py), 'resident' (on the device: all but the streamed blocks with offload sequential, plus
        the memo)."""
        seen: set[int] = set()

        def size(t: torch.Tensor) -> int:
            key = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
            if key in seen:
                return 0
            seen.add(key)
            return t.numel() * t.element_size()

        blocks = sum(size(v) for p in self.blocks for v in p.values() if isinstance(v, torch.Tensor))
        adaln = sum(size(v) for v in self.ada.values() if isinstance(v, torch.Tensor))
        other = sum(size(t) for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]
                    if not name.startswith("joint_blocks."))
        memo = 0 if self.ada_memo is None else self.ada_memo.nbytes()  # not weights, but resident (ada_memo.py)
        resident = adaln + other + memo + (0 if self.streamer is not None else blocks)
        return {"blocks": blocks, "adaln": adaln, "other": other, "total": blocks + adaln + other,
                "adaln_memo": memo, "resident": resident}

    def refresh_weights(self) -> None:
        """Re-read the model's weights after they were rewritten in place (a LoRA merge: new FP8 bytes and
        scales): rebuild the weight dicts and drop captured CUDA graphs."""
        with torch.no_grad():
            self._build_weights()
        if self.packs:  # streamed blocks: the new bytes travel in new packs
            self._repack()
        if self.graphs is not None:  # every graph read the old weights (copies) or scales
            self.graphs.clear()

    def describe(self) -> str:
        stream = ""
        if self.streamer is not None:
            stream = (f", offload=sequential ({len(self.packs)} blocks streamed, largest "
                      f"{self.streamer.block_bytes() / 2**30:.2f} GiB, prefetch {self.streamer.prefetch})")
        elif self.offload != "none":
            stream = f", offload={self.offload}"
        return (f"MMDiTEngine({self.fp8_mode or 'high precision'} on {self.device}, compile={self._compiled}, "
                f"cuda_graphs={self.graphs is not None}, attention={self.attention_backend or 'torch default'}, "
                f"kernels={self.kernels}{', fast_accum' if self.fast_accum else ''}"
                f"{self._attention_16bit_note()}{stream})")

    def _attention_16bit_note(self) -> str:
        if not self.attention_16bit_blocks or self._attn == "sdpa":
            return ""
        return f", 16-bit attention in blocks {sorted(self.attention_16bit_blocks)}"
