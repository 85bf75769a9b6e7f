"""ControlNetEngine: a ControlNet (models/controlnet.py) run on the MMDiT engine's machinery.

    engine = controlnet_engine(net, base_engine)   # built once per (net, base engine), cached on the net
    outs = engine.layer_outputs(x, sigma, context, pooled, hint)   # as net.layer_outputs(..., base)
    control = engine(x, sigma, context, pooled, hint, strength)    # as net(..., base, strength)

control.ControlApply takes this road whenever the base model is an MMDiTEngine (what `generate`,
`run` and the server build); with the plain MMDiT (or fast.PlainForward, calibration) the eager
net runs. What is the engine's (fast/step.py), over the net's own weights (no copy but the fused
adaLN, whose layers are re-pointed at views of it as in MMDiTEngine):
- FP8 linears with the activation quantisation fused into the LayerNorm/modulate, residual and GELU
  passes (fast/kernels.py) instead of FP8Linear's separate per-call quantisation; FP8 weights used
  as they are (per layer its own mode, as build_engine's per_layer: a policy's 16-bit layer stays so).
- one matmul for every layer's adaLN (MMDiTEngine._build_adaln / _adaln, shared code).
- attention: the base engine's FP8 flash attention (fast/attention_triton.py) when this net is in an
  FP8 matmul mode and the base engine uses it; SDPA (the base engine's backend, cuDNN on CUDA) else.
- a CUDA graph per input shape (fast/graphs.py TensorGraphs) when the base engine has graphs.
Embedding (the base model's x_embedder, pos_embed_input, t/y embedders) is ControlNet.embed, the
eager net's own code, so rows stay batch-invariant the same way (per_row / per_image).

FP8 mode: the most common effective mode of the blocks' FP8Linear layers (None: a 16/32-bit net),
checked against the device (fp8.device.choose_mode); "static" without calibrated input scales on
every layer runs "dynamic".
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch

from sd35fp8.errors import InputError
from sd35fp8.fast.attention import EMULATED_KINDS, LIBRARY_KINDS, TRITON_KINDS, backend_context, default_backend
from sd35fp8.fast.graphs import TensorGraphs
from sd35fp8.fast.kernels import plain_act
from sd35fp8.fast.step import MMDiTEngine, _linear_on, _lm, joint_block, single_block, stream_weights
from sd35fp8.fast.weights import layer_mode, linear_weights, put
from sd35fp8.fp8.device import choose_mode
from sd35fp8.fp8.linear import FP8Linear
from sd35fp8.models.controlnet import ControlNet
from sd35fp8.models.mmdit import batched, per_row

FP8_ATTENTION = ("triton_fp8", "fp8_emulated", *LIBRARY_KINDS)


def controlnet_fp8_mode(net: ControlNet, device: torch.device) -> str | None:
    """The engine's FP8 mode for `net` on `device` (see the module docstring)."""
    blocks = net.transformer_blocks if net.config.kind == "sd35" else net.joint_blocks
    lins = [m for m in blocks.modules() if isinstance(m, FP8Linear)]
    modes = Counter(layer_mode(m) for m in lins)
    mode = modes.most_common(1)[0][0] if modes else None
    if mode in ("dynamic", "static"):
        mode, _ = choose_mode(mode, device)
    if mode == "static" and any(m.input_scale is None for m in lins):
        mode = "dynamic"
    return mode


class ControlNetEngine:
    """See the module docstring. Not an nn.Module: it reads the net's weights (the net itself by weak
    reference, so that the cache in `controlnet_engine` lets it go) and the base MMDiT's embedder."""

    # the MMDiT engine's fused adaLN: reads fp8_mode, per_layer, dtype, blocks, fast_accum; sets ada*
    _build_adaln = MMDiTEngine._build_adaln
    _adaln = MMDiTEngine._adaln

    def __init__(self, net: ControlNet, base: MMDiTEngine, fast_accum: bool = True):
        if not isinstance(base, MMDiTEngine):
            raise InputError(f"ControlNetEngine needs an MMDiTEngine base, got {type(base).__name__}")
        net.check_base(base.model)
        self._net, self.base = weakref.ref(net), base.model
        self.config = net.config
        self.single = net.config.kind == "sd35"
        self.device = base.device
        self.dtype = net.dtype
        self.fp8_mode = controlnet_fp8_mode(net, self.device)
        self.fast_accum = bool(fast_accum) and self.fp8_mode in ("dynamic", "static")
        self.per_layer = True
        self.kernels = base.kernels
        if base._attn in FP8_ATTENTION and self.fp8_mode not in ("dynamic", "static"):
            self._attn, self.sdpa_backend = "sdpa", default_backend(self.device)  # 16-bit / weight-only net
        else:
            self._attn, self.sdpa_backend = base._attn, base.attention_backend
        if self._attn not in ("sdpa", *TRITON_KINDS, *EMULATED_KINDS, *LIBRARY_KINDS):
            raise InputError(f"ControlNetEngine: attention {self._attn!r}")
        with torch.no_grad():
            self._build_weights()
        self.graphs = TensorGraphs(self._forward) if base.graphs is not None else None

    @property
    def net(self) -> ControlNet:
        net = self._net()
        if net is None:
            raise InputError("ControlNetEngine: its ControlNet is gone")
        return net

    def _build_weights(self) -> None:
        mode, dt = self.fp8_mode, self.dtype
        self.blocks: list[dict] = []
        ada = []  # (layer index, stream, adaLN linear, its name)
        net = self.net
        blocks = net.transformer_blocks if self.single else net.joint_blocks
        for i, (blk, out) in enumerate(zip(blocks, net.controlnet_blocks)):
            p: dict = {}
            if self.single:
                ada.append((i, "x", *stream_weights(p, "x", blk, f"transformer_blocks.{i}", mode, dt, True)))
            else:
                for s, db in (("c", blk.context_block), ("x", blk.x_block)):
                    where = f"joint_blocks.{i}.{'context_block' if s == 'c' else 'x_block'}"
                    ada.append((i, s, *stream_weights(p, s, db, where, mode, dt, True)))
            put(p, "out", linear_weights(out, mode, dt, f"controlnet_blocks.{i}", True))
            if self.fast_accum:
                p["fast_accum"] = True
            self.blocks.append(p)
        self._build_adaln(ada)

    def _out(self, p: dict, tokens: torch.Tensor) -> torch.Tensor:
        """controlnet_blocks[i](tokens): [B, L, C] -> [B, L, C]."""
        B, L, C = tokens.shape
        mode = _lm(p, "out", self.fp8_mode)
        act = plain_act(tokens.reshape(B * L, C), mode, p.get("out.xs"), self.kernels)
        return _linear_on(p, "out", act, mode, tokens.dtype, None).view(B, L, -1)

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, pooled: torch.Tensor, hint: torch.Tensor,
                 context: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        net, mode, heads = self.net, self.fp8_mode, self.config.num_heads
        tokens, c, ctx = net.embed(x, sigma, context, pooled, hint, self.base)
        vec = per_row if net.batch_invariant else batched
        mods = vec(lambda ci: self._adaln(ci, mode, None), c)  # [B, sum n_i*C]: every layer's modulation
        outs = []
        with backend_context(self.sdpa_backend if self._attn == "sdpa" else None):
            for i, p in enumerate(self.blocks):
                if self.single:
                    a, b = self.ada_slices[i]["x"]
                    tokens = single_block(p, tokens, mods[:, a:b], mode, heads, None, self.kernels, self._attn)
                else:
                    (c0, c1), (x0, x1) = self.ada_slices[i]["c"], self.ada_slices[i]["x"]
                    ctx, tokens = joint_block(p, ctx, tokens, mods[:, c0:c1], mods[:, x0:x1], mode, heads, None,
                                              self.kernels, self._attn)
                outs.append(self._out(p, tokens))
        return tuple(outs)

    @torch.no_grad()
    def layer_outputs(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                      hint: torch.Tensor) -> list[torch.Tensor]:
        """ControlNet.layer_outputs's contract. With CUDA graphs the tensors are the graph's buffers,
        rewritten by the next call: use them before calling again (__call__ returns scaled copies)."""
        dt = self.dtype
        args = (x.to(dt), sigma.reshape(-1).float(), pooled.to(dt), hint.to(dt))
        if not self.single:
            args += (context.to(dt),)
        if self.graphs is not None:
            return list(self.graphs(*args)[0])
        return list(self._forward(*args))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 hint: torch.Tensor, strength: float = 1.0) -> list[torch.Tensor | None]:
        """Residuals per base joint block (ControlNet.forward's contract), fresh tensors."""
        outs = self.layer_outputs(x, sigma, context, pooled, hint)
        with torch.no_grad():
            return self.net.per_block(outs, self.base.config.depth, strength)

    def describe(self) -> str:
        return (f"ControlNetEngine({self.config.kind}, {self.config.num_layers} layers, "
                f"{self.fp8_mode or 'high precision'}, attention={self._attn if self._attn != 'sdpa' else self.sdpa_backend}, "
                f"cuda_graphs={self.graphs is not None})")


# net -> base engine -> its ControlNetEngine; an entry goes when the net or the base engine does
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def controlnet_engine(net: ControlNet, base: MMDiTEngine) -> ControlNetEngine:
    """`net`'s engine next to the base engine `base`: built on first use, kept while both live."""
    engines = _ENGINES.setdefault(net, weakref.WeakKeyDictionary())
    engine = engines.get(base)
    if engine is None:
        engine = engines[base] = ControlNetEngine(net, base)
    return engine
