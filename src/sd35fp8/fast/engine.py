"""build_engine: the one way an MMDiT runs (pipeline, workflow loaders, server, benchmarks).

    engine = build_engine(mmdit, device)                        # eager fused; CUDA graphs on CUDA
    engine = build_engine(mmdit, "cuda", compile=True)          # + torch.compile per block shape
    engine = build_engine(mmdit, "cuda", offload="sequential")  # joint blocks streamed from pinned RAM
    engine = build_engine(mmdit, "cuda", attention="bf16")      # cuDNN SDPA instead of FP8 attention
    engine.warmup([(1024, 1024, 1)])   # compile/capture before the first prompt (MMDiTEngine.warmup)
    v = engine(x, sigma, context, pooled, skip_layers=(), control=None)  # MMDiT.forward's contract
                                                                # (control: ControlNet residuals per block)

What is decided here, from the weights, the device and the flags:
- FP8 mode: read from the model's FP8Linear layers (`fp8_mode_of`: the joint blocks' most common
  effective mode; None for a 16/32-bit model), then checked against the device with
  fp8.device.choose_mode: a matmul mode ("dynamic"/"static") on a device without FP8 matmuls runs
  "weight_only" with a logged warning. Layers whose own mode differs (a policy kept them 16-bit, a
  shape fell back to weight_only) keep it (MMDiTEngine per_layer).
- Execution: eager fused step (fast/step.py) everywhere; on CUDA with offload "none"/"model" the
  whole step is captured as a CUDA graph per input shape (capture costs two eager steps, no compile);
  `compile=True` adds torch.compile of the per-block function (Inductor; kernels cached on disk by
  fast.enable_compile_cache). On CPU: torch ops, no Triton, no graphs (what CI tests).
- Attention (`attention`, --attention): "auto" = FP8 flash attention (fast/attention_triton.py) for
  the FP8 matmul modes on sm_89+ with Triton, else BF16 SDPA (cuDNN on CUDA); "fp8" = FP8 attention
  always: the Triton kernel on CUDA (DeviceError where it cannot run), its torch emulation on the
  CPU (`fp8_attention_emulated`, same numerics; slow, for checks on the tiny model); "bf16" = SDPA
  (cuDNN on CUDA). Measured on the H200 (benchmarks/faster.py): see docs/ARCHITECTURE.md. Under FP8
  attention, the joint blocks a shipped attention policy names for this model's config keep 16-bit
  SDPA (fp8/attention_policy.py, fp8/policies/attention_default.json; `attention_16bit_blocks=`).
- Offload: "none" and "model" keep the MMDiT resident on `device` (with "model" the pipeline moves
  the text encoders and VAE in and out); "sequential" keeps the joint blocks' weights in pinned CPU
  memory and streams them block by block with prefetch into the fused per-block step; embedders,
  final layer, pos_embed and the fused adaLN weight stay resident.

GPU tolerance of the fused path (tests/test_engine.py, GPU-only test): against the plain MMDiT forward
in float32 over the same FP8 weights, the fused FP8 step keeps an output SQNR above 25 dB (dynamic
and static: fp8 activations; measured 28.9 dB at Large on the H100, docs/PERF.md) and above 35 dB in
weight_only and 16-bit modes; CUDA graphs replay bit-identically to the eager fused step.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from sd35fp8.errors import DeviceError, InputError
from sd35fp8.fast.attention import ATTENTION_CHOICES, default_backend
from sd35fp8.fast.cache import enable_compile_cache
from sd35fp8.fast.step import MMDiTEngine
from sd35fp8.fast.weights import auto_attention, layer_mode
from sd35fp8.fp8.attention_policy import default_attention_16bit_blocks
from sd35fp8.fp8.device import choose_mode

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "model", "sequential")


def fp8_mode_of(mmdit: nn.Module) -> str | None:
    """The FP8 mode the weights were loaded in: the most common effective mode of the joint blocks'
    FP8Linear layers (fp8/linear.py), None when they hold none (a 16/32-bit model)."""
    blocks = getattr(mmdit, "joint_blocks", None)
    if blocks is None:
        raise InputError(f"build_engine: {type(mmdit).__name__} is not an MMDiT (no joint_blocks)")
    modes = Counter(layer_mode(m) for m in blocks.modules() if type(m).__name__ == "FP8Linear")
    return modes.most_common(1)[0][0] if modes else None


def default_compile(device: torch.device | str, offload: str = "none", serving: bool = False) -> bool:
    """compile=None resolved: torch.compile where it pays. A long-running process (server, `run`)
    compiles once at start-up (warm-up) on CUDA; one-shot use (generate, the Python API) runs the
    eager fused step with CUDA graphs (no compile wait); CPU and sequential offload never compile."""
    return torch.device(device).type == "cuda" and offload != "sequential" and serving


def attention_kind(choice: str, device: torch.device, fp8_mode: str | None) -> str | None:
    """--attention auto | fp8 | bf16 -> the engine's attention_backend (see the module docstring)."""
    if choice not in ATTENTION_CHOICES:
        raise InputError(f"unknown attention {choice!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    if choice == "auto":
        return auto_attention(device, fp8_mode)
    if choice == "bf16":
        return default_backend(device)
    if device.type != "cuda":
        return "fp8_emulated"
    from sd35fp8.fast import attention_triton

    if attention_triton.triton is None or torch.cuda.get_device_capability(device) < (8, 9):
        raise DeviceError(f"--attention fp8 needs Triton and an sm_89+ GPU; {torch.cuda.get_device_name(device)} "
                          f"(sm_{''.join(map(str, torch.cuda.get_device_capability(device)))}, Triton "
                          f"{'present' if attention_triton.triton is not None else 'missing'}): use --attention bf16")
    return "triton_fp8"


def build_engine(mmdit: nn.Module, device: torch.device | str, *, compile: bool = False, offload: str = "none",
                 attention: str = "auto", cuda_graphs: bool | None = None, prefetch: int = 1,
                 **engine_kwargs) -> MMDiTEngine:
    """The MMDiT's engine on `device` (see the module docstring). Takes ownership of `mmdit`: its
    weights move to `device` (offload none/model) or into pinned CPU memory (sequential).

    cuda_graphs None: on CUDA unless offload is "sequential". engine_kwargs go to MMDiTEngine
    (attention_backend overrides `attention`, kernels, fast_accum, compile_mode; benchmarks)."""
    if isinstance(mmdit, MMDiTEngine):
        raise InputError("build_engine: this is already an engine (pass engine.model to rebuild it)")
    if offload not in OFFLOAD_MODES:
        raise InputError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
    device = torch.device(device)
    if compile and device.type != "cuda":
        raise InputError(f"compile needs a CUDA device (got {device.type}); on the CPU the engine runs eager")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    mode = fp8_mode_of(mmdit)
    if mode in ("dynamic", "static"):
        mode, reason = choose_mode(mode, device)  # warns when the device has no FP8 matmul
        logger.debug("engine fp8 mode: %s", reason)
    engine_kwargs.setdefault("attention_backend", attention_kind(attention, device, mode))
    # under FP8 attention, the blocks a shipped attention policy keeps 16-bit for this model (by its config)
    engine_kwargs.setdefault("attention_16bit_blocks", default_attention_16bit_blocks(mmdit.config))
    streamed = offload == "sequential"
    if cuda_graphs is None:
        cuda_graphs = device.type == "cuda" and not streamed
    if compile:
        enable_compile_cache()
    mmdit.to("cpu" if streamed else device)
    engine = MMDiTEngine(mmdit, mode, compile=compile, cuda_graphs=cuda_graphs, per_layer=True, device=device,
                         **engine_kwargs)
    engine.offload = offload
    if streamed:
        _stream_blocks(engine, device, prefetch)
    logger.info("%s", engine.describe())
    return engine


def _stream_blocks(engine: MMDiTEngine, device: torch.device, prefetch: int) -> None:
    """Pack each block's weight dict into pinned memory (the model's parameters re-pointed at the packed
    copies, so nothing is held twice), move everything else to `device`, attach a BlockStreamer."""
    from sd35fp8.offload import BlockStreamer, TensorPack

    model = engine.model
    params = {(p.data_ptr(), p.dtype, tuple(p.shape)): p for p in model.joint_blocks.parameters()}
    engine.packs = []
    for i, p in enumerate(engine.blocks):
        tensors = {k: v for k, v in p.items() if isinstance(v, torch.Tensor)}
        pack = TensorPack(tensors, f"joint_blocks.{i}")
        for k, v in tensors.items():
            owner = params.get((v.data_ptr(), v.dtype, tuple(v.shape)))
            if owner is not None and owner.device.type == "cpu":
                owner.data = pack.cpu_views[k]
        p.update(pack.cpu_views)
        engine.packs.append(pack)
    engine.streamer = BlockStreamer(engine.packs, device, prefetch, name="joint_blocks")
    for name, child in model.named_children():
        if name != "joint_blocks":
            child.to(device)
    with torch.no_grad():
        for key, t in list(model._parameters.items()):
            if t is not None:
                t.data = t.data.to(device)
        for key, t in list(model._buffers.items()):
            if t is not None:
                model._buffers[key] = t.to(device)
        old_w = engine.ada["w"]
        engine.ada = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in engine.ada.items()}
        for i, jb in enumerate(model.joint_blocks):  # adaLN params shared the fused weight: keep sharing it
            for s, db in (("c", jb.context_block), ("x", jb.x_block)):
                w = db.adaLN_modulation[1].weight
                if w.untyped_storage().data_ptr() == old_w.untyped_storage().data_ptr():
                    a, b = engine.ada_slices[i][s]
                    w.data = engine.ada["w"][a:b]
        for m in model.joint_blocks.modules():  # small leftovers (biases in other dtypes, scales): device
            for key, t in list(m._buffers.items()):
                if t is not None and t.numel() <= 1:
                    m._buffers[key] = t.to(device)


class PlainForward(nn.Module):
    """The MMDiT's own module forward (models/mmdit.py), with the engine's attributes: for tools that
    hook its nn.Linear / FP8Linear layers (activation calibration), never for generation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self.fp8_mode = fp8_mode_of(model)

    def forward(self, x, sigma, context, pooled, skip_layers=(), control=None):
        return self.model(x, sigma, context, pooled, skip_layers=skip_layers, control=control)

    def warmup(self, shapes, **_kwargs) -> float:
        return 0.0

    def describe(self) -> str:
        return f"plain MMDiT forward ({self.fp8_mode or 'high precision'}; calibration only)"
