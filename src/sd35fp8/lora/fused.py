"""Unmerged LoRA inside the FP8 GEMM (K-augmentation): the fused step's one `torch._scaled_mm` per
layer also computes the low-rank term, instead of a down GEMM, an up GEMM and a pass over the output
beside it (lora/apply.py apply_lora, which stays the road everywhere else).

    y = sa[m] sb'[n] (sum_k x8[m,k] W8'[n,k] + sum_j h8[m,j] U8[n,j]) + b
      = x W^T + b + sum_t strength_t (x down_t^T) up_t^T            (up to the e4m3 rounding of h8, U8)

    A = [x8 | h8]  [M, K + R]: the activation kernel that quantises x (fast/kernels.py, `extra`) leaves R
                   spare columns; kernels.lora_down_fp8 fills them from x8 in one pass:
                   h8 = e4m3(clamp(x8 @ D^T / beta))            (x8 the raw e4m3 values: no sa in it)
    B = [W8' | U8] [N, K + R], built once per LoRA set and layer (`pack_for`), kept on the slot's first
                   ActiveTerm, so a CUDA graph holding the terms (fast/graphs.py keep) holds it too:
                   U8[n,j] = e4m3(Up[n,j] beta_j / sb'[n]),  sb'[n] = sb[n] 2^e[n],  W8'[n] = W8[n] 2^-e[n]

D [R, K] and Up [N, R] are the layer's terms side by side (ranks added; a term on some rows
only, e.g. q of a fused qkv, has zero rows elsewhere; strength folded into Up), R padded to a power
of 2 >= 16. The input then gets PAD more zero columns (and B zero columns) so that K + R + PAD is a
multiple of K_TILE: cuBLAS's fp8 kernels run K in tiles of 128, and K + 64 on Large (2496, 9792)
cost a whole extra tile pass, 2-4x the 64 columns' share (H100, benchmarks/lora_kernels.py: the
image-row fc1 GEMM 0.323 ms, with K + 64 0.365, with K + 128 0.333). D is e4m3 with a
per-row scale folded into 1 / beta (the down projection as an fp8 x fp8 MMA), or bf16 with
SD35FP8_LORA_DOWN=bf16. H100, Large, rank 64 on every linear (benchmarks/results/
lora_nvidia-h100-80gb-hbm3_pad.json, one process): step overhead over the base step 11.8 % (bf16 D,
no padding), 10.1 % (e4m3 D), 8.2 % (bf16 D, padded), 6.7 % (e4m3 D, padded), SQNR against the
merged model 26.53 dB with bf16 D and 26.49 dB with e4m3 D.

The scales: a product h8 * U8 is at most 448^2, and R terms must carry what K terms carry in the
base GEMM, so h8 aims at rms H_RMS for an input row of rms X_RMS (beta_j = |D_j| X_RMS / H_RMS,
leaving 448 / H_RMS headroom before the clamp), and a row n whose U8 would pass 448 moves part of
its scale into the weight by a power of 2, e[n] (exact for W8 values above 2^(e - 6); at e = 10 the
values under 16, of an rms near 100, lose bits: ~-50 dB; a layer with a row needing more than
MAX_SHIFT keeps the separate road). Measured error:
tests/test_lora_fused.py, benchmarks/lora.py (SQNR against the merged float reference).

Cost: B is a copy of the layer's fp8 weight per LoRA set (Large, rank 64 on every joint-block linear:
~5.5 GB), so packs are only built while the device keeps RESERVE_BYTES free after them (else the layer
takes apply_lora), and a graph captured for a LoRA set keeps its packs alive (graphs of at most
fast/graphs.py MAX_STATES sets are kept). DoRA terms, ranks
above MAX_RANK, 16-bit / weight-only layers, torch.compile'd blocks, streamed blocks (offload
sequential: fast/step.py _lora_pack) and devices without rowwise `_scaled_mm` take apply_lora. SD35FP8_LORA_FUSED=0 turns the road off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sd35fp8.fp8.device import rowwise_scaled_mm
from sd35fp8.fp8.scaling import E4M3_MAX, FP8_DTYPE

from .apply import ActiveTerm, weights_generation

ENV = "SD35FP8_LORA_FUSED"
DOWN_ENV = "SD35FP8_LORA_DOWN"  # fp8 (default) or bf16: the dtype of D
KTILE_ENV = "SD35FP8_LORA_KTILE"  # K + R + PAD is a multiple of this (default K_TILE; 16: no padding)
K_TILE = 128
MAX_RANK = 256  # padded rank; the down kernel keeps [BLOCK_M, R] fp32 accumulators in registers
MAX_SHIFT = 10  # most powers of 2 moved from a weight row's fp8 values into its scale (W8 < 16 lose bits)
X_RMS = 160.0  # rms of an e4m3 per-token input row (amax 448 at ~2.8 rms); an upper estimate
H_RMS = 16.0  # target rms of h8: 28x headroom to 448
RESERVE_BYTES = 3 << 30  # device memory left free after building a pack
_ATTR = "_sd35_fused"  # on slot[0]: (key, FusedPack | None)


@dataclass
class FusedPack:
    k: int  # the layer's input features
    rank: int  # R + PAD: spare columns of the input (the padded rank, then zero columns to K_TILE)
    w_aug: torch.Tensor  # [N, K + R + PAD] fp8: [W8' | U8 | 0]
    scale_b: torch.Tensor  # [1, N] fp32: sb'
    down: torch.Tensor  # [R, K] bf16 or e4m3
    inv_beta: torch.Tensor  # [R] fp32 (with D's row scales when D is e4m3)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def pack_options() -> tuple[str, int]:
    """(D's dtype name, K tile) from SD35FP8_LORA_DOWN / SD35FP8_LORA_KTILE: part of the packs' cache
    key and of the CUDA graphs' (fast/step.py lora_state)."""
    down = os.environ.get(DOWN_ENV, "fp8").strip().lower()
    if down not in ("bf16", "fp8"):
        raise ValueError(f"{DOWN_ENV}={down!r}: expected bf16 or fp8")
    tile = int(os.environ.get(KTILE_ENV, K_TILE))
    if tile < 16 or tile % 16:
        raise ValueError(f"{KTILE_ENV}={tile}: expected a multiple of 16")
    return down, tile


def pack_for(slot: list[ActiveTerm], w: torch.Tensor, ws_row: torch.Tensor) -> FusedPack | None:
    """The fused pack of a layer's non-empty slot (built on first use, cached on slot[0]), or None
    when the layer takes apply_lora (see the module docstring)."""
    if not slot or w.dtype != FP8_DTYPE or not enabled() or not rowwise_scaled_mm(w.device):
        return None
    key = (tuple(id(t) for t in slot), w.data_ptr(), ws_row.data_ptr(), weights_generation(), pack_options())
    cached = getattr(slot[0], _ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if w.is_cuda and torch.cuda.is_current_stream_capturing():
        return None  # never build inside a capture (the warm-up calls before it build)
    pack = build_pack(slot, w, ws_row)
    setattr(slot[0], _ATTR, (key, pack))
    return pack


def build_pack(slot: list[ActiveTerm], w: torch.Tensor, ws_row: torch.Tensor) -> FusedPack | None:
    if any(t.dora_g is not None or t.down.dim() != 2 for t in slot):
        return None
    n, k = w.shape
    down_dtype, tile = pack_options()
    rank = sum(t.down.shape[0] for t in slot)
    r_pad = max(16, 1 << (rank - 1).bit_length())
    if r_pad > MAX_RANK:
        return None
    spare = -(-(k + r_pad) // tile) * tile - k  # R + PAD: K + R + PAD a multiple of the K tile
    if w.is_cuda:
        free, _ = torch.cuda.mem_get_info(w.device)
        if free < n * (k + spare) + 4 * n * (k + r_pad) + RESERVE_BYTES:  # the pack + its float32 temporaries
            return None
    dev = w.device
    down = torch.zeros(r_pad, k, device=dev, dtype=torch.float32)
    up = torch.zeros(n, r_pad, device=dev, dtype=torch.float32)
    j = 0
    for t in slot:
        r = t.down.shape[0]
        down[j:j + r] = t.down.float()
        up[t.offset:t.offset + t.up.shape[0], j:j + r] = t.up.float().reshape(t.up.shape[0], r) * t.strength
        j += r
    if down_dtype == "fp8":  # e4m3 rows with a per-row scale ds, folded into 1 / beta below
        ds = (down.abs().amax(dim=1) / E4M3_MAX).clamp(min=1e-30)  # [R]
        down = (down / ds[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    else:
        ds = torch.ones(r_pad, device=dev)
        down = down.to(torch.bfloat16)
    norm = down.float().norm(dim=1) * ds  # [R]: of what the kernel multiplies (beta from the rounded rows)
    beta = torch.where(norm > 0, norm * (X_RMS / H_RMS), torch.ones_like(norm))
    sb = ws_row.reshape(-1).float()  # [N]
    v = up * beta[None, :] / sb[:, None]  # [N, R]: U8 before the row shift
    row_max = v.abs().amax(dim=1)
    shift = torch.ceil(torch.log2(row_max.clamp(min=1e-30) / E4M3_MAX)).clamp(min=0)  # [N]
    if float(shift.max()) > MAX_SHIFT:
        return None
    p2 = torch.exp2(shift)
    w8 = (w.float() / p2[:, None]).to(FP8_DTYPE) if float(shift.max()) > 0 else w
    u8 = (v / p2[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    zeros = torch.zeros(n, spare - r_pad, device=dev, dtype=FP8_DTYPE)
    w_aug = torch.cat([w8, u8, zeros], dim=1).contiguous()  # [N, K + R + PAD]
    return FusedPack(k, spare, w_aug, (sb * p2).reshape(1, n).contiguous(), down.contiguous(),
                     (ds / beta).contiguous())


def spare_input(a: torch.Tensor, rank: int) -> torch.Tensor:
    """a [M, K] -> [M, K + rank] with a's columns first (a copy: for inputs no kernel made wide;
    lora_down_fp8 writes the rest)."""
    out = torch.empty(a.shape[0], a.shape[1] + rank, device=a.device, dtype=a.dtype)
    out[:, :a.shape[1]] = a
    return out


def fused_matmul(a: torch.Tensor, a_scale: torch.Tensor, pack: FusedPack, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """The layer's output with its LoRA: a [M, K] or [M, K + R + PAD] fp8 (the quantised input, with
    the spare columns when the activation kernel left them), a_scale [M, 1] -> [M, N] out_dtype."""
    from sd35fp8.fast.kernels import lora_down_fp8

    if a.shape[1] != pack.k + pack.rank:
        a = spare_input(a, pack.rank)
    lora_down_fp8(a, pack.k, pack.down, pack.inv_beta)
    return torch._scaled_mm(a, pack.w_aug.t(), scale_a=a_scale, scale_b=pack.scale_b, bias=bias,
                            out_dtype=out_dtype, use_fast_accum=fast_accum)


# ---------------------------------------------------------------------------------- adaLN, grouped
@dataclass
class AdaPack:
    """Every adaLN slot's LoRA as one down GEMM, one batched up GEMM per (rows, rank) group and one
    index_add into the big adaLN output (instead of a few small kernels and a copy of the output per
    slot: 76 slots on Large). 16-bit factors (the adaLN input is the engine's 16-bit silu(c))."""

    down: torch.Tensor  # [sum R, C]: the slots' terms side by side
    groups: list[tuple[int, int, int, torch.Tensor]]  # (first h column, slots G, rank R, ups [G, n, R])
    index: torch.Tensor  # [sum of the grouped slots' n] long: their rows in the big output, group order
    rest: list[tuple[int, int, list[ActiveTerm]]]  # slots with DoRA terms: apply_lora one by one


def ada_pack_for(ada: list[tuple[int, int, list[ActiveTerm]]], dtype: torch.dtype) -> AdaPack | None:
    """The grouped pack of the engine's adaLN slots ((first row, rows, slot) each), cached on the first
    active term; None when no slot has terms (or, inside a CUDA graph capture, when not built yet)."""
    live = [(off, n, slot) for off, n, slot in ada if slot]
    if not live or not enabled():
        return None
    key = (tuple(id(t) for _, _, slot in live for t in slot), dtype)
    holder = live[0][2][0]
    cached = getattr(holder, _ATTR + "_ada", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    dev = live[0][2][0].down.device
    if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    rest = [(off, n, slot) for off, n, slot in live if any(t.dora_g is not None for t in slot)]
    plain = [(off, n, slot) for off, n, slot in live if not any(t.dora_g is not None for t in slot)]
    downs, by_shape = [], {}
    for off, n, slot in plain:
        rank = sum(t.down.shape[0] for t in slot)
        up = torch.zeros(n, rank, device=dev, dtype=torch.float32)
        j = 0
        for t in slot:
            r = t.down.shape[0]
            downs.append(t.down.reshape(r, -1).float())
            up[t.offset:t.offset + t.up.shape[0], j:j + r] = t.up.float().reshape(t.up.shape[0], r) * t.strength
            j += r
        by_shape.setdefault((n, rank), []).append((off, up))
    if not plain:
        pack = AdaPack(torch.zeros(0), [], torch.zeros(0), rest)
        setattr(holder, _ATTR + "_ada", (key, pack))
        return pack
    # h columns follow `plain`'s order; regroup them by shape
    col, cols_of = 0, {}
    for off, n, slot in plain:
        rank = sum(t.down.shape[0] for t in slot)
        cols_of[off] = col
        col += rank
    down = torch.cat(downs).to(dtype).contiguous()
    groups, index, perm = [], [], []
    for (n, rank), items in by_shape.items():
        first = len(perm)
        for off, _ in items:
            perm.extend(range(cols_of[off], cols_of[off] + rank))
            index.append(torch.arange(off, off + n, device=dev))
        groups.append((first, len(items), rank, torch.stack([u for _, u in items]).to(dtype).contiguous()))
    down = down[torch.tensor(perm, device=dev)].contiguous()  # h columns in group order
    pack = AdaPack(down, groups, torch.cat(index), rest)
    setattr(holder, _ATTR + "_ada", (key, pack))
    return pack


def ada_apply(y: torch.Tensor, a: torch.Tensor, pack: AdaPack) -> torch.Tensor:
    """y [B, sum n] (the big adaLN output, owned) += every grouped slot's a [B, C] @ down^T @ up^T."""
    if not pack.groups:
        return y
    h = a.to(pack.down.dtype) @ pack.down.t()  # [B, sum R]
    outs = []
    for first, g, rank, ups in pack.groups:
        hg = h[:, first:first + g * rank].reshape(-1, g, rank).permute(1, 2, 0)  # [G, R, B]
        outs.append(torch.bmm(ups, hg).permute(2, 0, 1).reshape(h.shape[0], -1))  # [B, G * n]
    delta = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return y.index_add_(1, pack.index, delta.to(y.dtype))
