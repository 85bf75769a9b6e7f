"""Run SD3.5 within a small GPU budget: weights live in pinned CPU memory and visit the GPU only
while they compute.

- `PackedWeights`: one module's parameters and buffers in ONE pinned CPU buffer (uint8, each tensor an
  aligned view). Putting it on the GPU is one host-to-device copy; taking it off is dropping the GPU
  copy (no device-to-host copy: the pinned CPU copy never changes).
- `TensorPack`: a dict of tensors (one MMDiT engine block's weights) in one pinned buffer.
- `BlockStreamer`: blocks (modules or TensorPacks) streamed block by block, the next `prefetch`
  blocks copied on a side CUDA stream into a ring of fixed device slots while the current one
  computes (events order copy -> compute -> reuse of the slot). The MMDiT engine
  (fast/engine.py, offload="sequential") streams its joint blocks' weight dicts this way (embedders,
  final layer, pos_embed and the fused adaLN stay resident; FP8 weights and scales travel as they
  are); `SequentialOffload` does it for a plain MMDiT module, `stream_t5_blocks` for T5's blocks.
- `ModelOffload`: whole models (MMDiT, text encoders, VAE) on the device only while in use, one
  at a time (ComfyUI's "model" offload, but with pinned memory and no copy back).
- `peak_memory_report(stats)`: per-stage seconds and peak memory of a pipeline call.
- `use_tiled_decode(width, height, budget_bytes)`: when the VAE decode must go tiled.
- `keep_token_embeddings_on_cpu(encoder)`: the text encoders' token tables (T5-XXL 32128 x 4096,
  CLIP-G / CLIP-L 49408 x 1280 / 768: 0.43 GiB in bf16) stay in CPU memory; a prompt's few hundred
  rows are looked up there and copied over.

On a CPU device every mechanism is a no-op: the modules run where they are (tests check outputs).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sd35fp8.errors import InputError

log = logging.getLogger(__name__)

ALIGN = 256  # byte alignment of each tensor inside a packed buffer (any dtype view is legal)
GIB = 1024 ** 3

# Full VAE decode (SD3 VAE, bf16) activation peak above the weights, measured on H100 with
# benchmarks/e2e.py --vae-sweep: 1024^2 2.47 GiB, 1536^2 11.88 GiB, 2048^2 36.88 GiB (the mid-block
# attention over (H/8*W/8)^2 makes it quadratic); fit GiB = 0.209*MP + 2.047*MP^2 (MP = pixels/1e6).
# decode_tiled (64-latent tiles, before tiles were balanced in session 4) stayed at 0.55-0.60 GiB at
# every size. On an 8 GB card the decode goes tiled above 1024x1024 (1280^2 would already need ~6 GiB).
VAE_DECODE_GIB_FIT = (0.209, 2.047)
TILED_DECODE_PIXELS_8GB = 1024 * 1024
# offload "model" (a 12 GB card) / "sequential" (an 8 GB card): a full VAE decode only when it fits next to
# the engine's resident weights (pipeline._tiled_decode). Sequential at Large 1024²: 2.6 GiB resident + 2.5 GiB
# full decode peaked at 6.38 GiB on the H200 (benchmarks/paths.py, first run): above the 6 GiB goal, so tiled.
MODEL_OFFLOAD_BUDGET = 10 * GIB
SEQUENTIAL_OFFLOAD_BUDGET = 5 * GIB


@dataclass(frozen=True)
class _Slot:
    offset: int  # bytes into the packed buffer
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def _view(flat: torch.Tensor, slot: _Slot) -> torch.Tensor:
    return flat[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


class PackedWeights:
    """All parameters and buffers of `module` (tied tensors once) packed into one CPU buffer.
    Weights under a StreamedBlock are left out (BlockStreamer packs those).

    After packing, the module's tensors ARE views of that buffer (the original storage is freed, so
    a module given on the GPU leaves it). `to_device` makes a device copy; `swap_in` points the module
    at it, `swap_out` back at the CPU views. Pinned when CUDA is available.
    """

    def __init__(self, module: nn.Module, name: str = "module"):
        self.name = name
        self.module = module
        entries: list[tuple[nn.Module, str, bool]] = []  # (owner, leaf name, is_param)
        tensors: dict[int, torch.Tensor] = {}
        self._refs: list[tuple[nn.Module, str, bool, int]] = []
        for owner in _owned_modules(module):
            for leaf, p in owner._parameters.items():
                if p is not None:
                    entries.append((owner, leaf, True))
                    tensors.setdefault(id(p), p)
                    self._refs.append((owner, leaf, True, id(p)))
            for leaf, b in owner._buffers.items():
                if b is not None:
                    entries.append((owner, leaf, False))
                    tensors.setdefault(id(b), b)
                    self._refs.append((owner, leaf, False, id(b)))
        self.slots: dict[int, _Slot] = {}
        offset = 0
        for key, t in tensors.items():
            if t.device.type == "meta":
                raise InputError(f"PackedWeights({name}): tensor of shape {tuple(t.shape)} is still on meta; "
                                 "load or initialise the weights first")
            slot = _Slot(offset, t.dtype, tuple(t.shape))
            self.slots[key] = slot
            offset += -(-slot.nbytes // ALIGN) * ALIGN
        self.nbytes = offset
        pin = torch.cuda.is_available()
        self.cpu = torch.empty(max(offset, 1), dtype=torch.uint8, pin_memory=pin)  # [bytes]
        with torch.no_grad():
            for key, t in tensors.items():
                _view(self.cpu, self.slots[key]).copy_(t.detach())
        self._cpu_views = {key: _view(self.cpu, slot) for key, slot in self.slots.items()}
        self._set(self._cpu_views)

    def _set(self, views: Mapping[int, torch.Tensor]) -> None:
        done: set[int] = set()
        for owner, leaf, is_param, key in self._refs:
            if is_param:
                if key not in done:  # a tied Parameter is one object: set its data once
                    owner._parameters[leaf].data = views[key]
                    done.add(key)
            else:
                owner._buffers[leaf] = views[key]

    def to_device(self, device: torch.device, stream: torch.cuda.Stream | None = None) -> torch.Tensor:
        """One copy of the packed buffer on `device` ([bytes], uint8), issued on `stream` if given."""
        if stream is None:
            return self.cpu.to(device, non_blocking=True)
        with torch.cuda.stream(stream):
            return self.cpu.to(device, non_blocking=True)

    def swap_in(self, flat: torch.Tensor) -> None:
        """Point the module's tensors at views of `flat` (from `to_device`)."""
        self._set({key: _view(flat, slot) for key, slot in self.slots.items()})

    def swap_out(self) -> None:
        self._set(self._cpu_views)


class TensorPack:
    """A dict of tensors packed into ONE CPU buffer (pinned when CUDA is available), each an aligned
    view: `cpu_views` (same names, CPU) and `views(flat)` (the same layout over a device copy)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "tensors"):
        self.name = name
        self.slots: dict[str, _Slot] = {}
        offset = 0
        for key, t in tensors.items():
            if t.device.type == "meta":
                raise InputError(f"TensorPack({name}): {key} is still on meta; load the weights first")
            self.slots[key] = _Slot(offset, t.dtype, tuple(t.shape))
            offset += -(-self.slots[key].nbytes // ALIGN) * ALIGN
        self.nbytes = offset
        self.cpu = torch.empty(max(offset, 1), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        with torch.no_grad():
            for key, t in tensors.items():
                _view(self.cpu, self.slots[key]).copy_(t.detach().contiguous())
        self.cpu_views = self.views(self.cpu)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: _view(flat, slot) for key, slot in self.slots.items()}


class BlockStreamer:
    """Stream the blocks of a ModuleList to `device` one at a time with `prefetch` blocks in flight.

    CUDA: a ring of `prefetch + 1` fixed device slots (each the size of the largest block). Block j
    is copied into a free slot on a side stream once the compute stream is done with the slot's last
    block (event), and the compute stream waits for the copy (event). Device memory for blocks is
    thus exactly (prefetch + 1) x largest block, however far the host runs ahead. After the last
    block the first ones are prefetched again (the next sampling step starts without a stall).

    `blocks`: modules (packed here, PackedWeights; `run` swaps them in) or ready TensorPacks (the
    caller uses `acquire(i)` -> the device slot holding block i, then `done(i)` after its work).
    """

    def __init__(self, blocks: Sequence[nn.Module | TensorPack], device: torch.device | str, prefetch: int = 1,
                 name: str = "blocks"):
        if prefetch < 0:
            raise InputError(f"prefetch must be >= 0, got {prefetch}")
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.packs = [b if isinstance(b, TensorPack) else PackedWeights(b, f"{name}.{i}") for i, b in enumerate(blocks)]
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._slots: list[torch.Tensor] = []  # [(prefetch+1)] x [largest block bytes] uint8
        self._holds: list[int | None] = []  # block index held by each slot
        self._ready: list[torch.cuda.Event | None] = []  # copy into the slot finished
        self._done: list[torch.cuda.Event | None] = []  # compute with the slot finished
        self._next = 0  # round-robin slot pointer
        self.bytes_streamed = 0

    def block_bytes(self) -> int:
        return max((p.nbytes for p in self.packs), default=0)

    def device_bytes(self) -> int:
        """Device memory the slots take (0 until the first CUDA forward)."""
        return sum(t.numel() for t in self._slots)

    def _alloc(self) -> None:
        n = self.prefetch + 1
        self._slots = [torch.empty(self.block_bytes(), dtype=torch.uint8, device=self.device) for _ in range(n)]
        self._holds, self._ready, self._done = [None] * n, [None] * n, [None] * n

    def _fetch(self, j: int, keep: int | None) -> int:
        """Copy block j into a slot other than `keep` (the one computing now); returns the slot."""
        s = self._next
        if s == keep:
            s = (s + 1) % len(self._slots)
        self._next = (s + 1) % len(self._slots)
        pack = self.packs[j]
        with torch.cuda.stream(self.copy_stream):
            if self._done[s] is not None:
                self.copy_stream.wait_event(self._done[s])
            self._slots[s][:pack.nbytes].copy_(pack.cpu[:pack.nbytes], non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self._holds[s], self._ready[s] = j, ready
        self.bytes_streamed += pack.nbytes
        return s

    def acquire(self, i: int) -> torch.Tensor | None:
        """The device slot ([bytes] uint8) holding block i once the compute stream may read it (CUDA;
        prefetches the next blocks); None on CPU, where the weights already are where the inputs are."""
        if not self.cuda:
            return None
        if not self._slots:
            self._alloc()
        compute = torch.cuda.current_stream(self.device)
        s = self._holds.index(i) if i in self._holds else self._fetch(i, keep=None)
        n = len(self.packs)
        for j in (k % n for k in range(i + 1, i + 1 + self.prefetch)):
            if j != i and j not in self._holds:
                self._fetch(j, keep=s)
        compute.wait_event(self._ready[s])
        return self._slots[s]

    def done(self, i: int) -> None:
        """The compute stream's work with block i is queued: its slot may be refilled after it."""
        if not self.cuda or i not in self._holds:
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._done[self._holds.index(i)] = done

    def run(self, i: int, block: nn.Module, args: tuple, kwargs: dict):
        slot = self.acquire(i)
        if slot is None:
            return block(*args, **kwargs)
        pack = self.packs[i]
        pack.swap_in(slot)
        try:
            return block(*args, **kwargs)
        finally:
            pack.swap_out()
            self.done(i)

    def release(self) -> None:
        """Free the device slots (e.g. before the VAE decode on a small card)."""
        if self._slots:
            torch.cuda.current_stream(self.device).synchronize()
            self.copy_stream.synchronize()
        self._slots, self._holds, self._ready, self._done, self._next = [], [], [], [], 0


class StreamedBlock(nn.Module):
    """Stands in for block `index`: the real block is kept off the device; `.to()` leaves it alone."""

    def __init__(self, block: nn.Module, streamer: BlockStreamer, index: int):
        super().__init__()
        self.block = block
        self.index = index
        self._streamer = [streamer]  # a list: not a submodule, not moved

    def _apply(self, fn, recurse: bool = True):
        return self  # weights stay in pinned CPU memory; BlockStreamer moves them

    def forward(self, *args, **kwargs):
        return self._streamer[0].run(self.index, self.block, args, kwargs)


def stream_module_list(owner: nn.Module, attr: str, device: torch.device | str, prefetch: int = 1
                       ) -> BlockStreamer:
    """Replace `owner.<attr>` (a ModuleList) by StreamedBlocks in place; returns their streamer."""
    blocks = getattr(owner, attr)
    if not isinstance(blocks, nn.ModuleList):
        raise InputError(f"{type(owner).__name__}.{attr} is not an nn.ModuleList")
    if any(isinstance(b, StreamedBlock) for b in blocks):
        raise InputError(f"{type(owner).__name__}.{attr} is already streamed")
    streamer = BlockStreamer(list(blocks), device, prefetch, name=attr)
    setattr(owner, attr, nn.ModuleList(StreamedBlock(b, streamer, i) for i, b in enumerate(blocks)))
    return streamer


class SequentialOffload(nn.Module):
    """MMDiT whose joint blocks stream from pinned CPU memory; same forward contract as MMDiT.

    Takes ownership of `model` (its joint_blocks become StreamedBlocks: state_dict names gain a
    `.block` level, so load and quantise before wrapping). The rest of the model moves to `device`.
    GPU memory for weights: resident parts + (1 + prefetch) blocks (Large FP8: ~0.2 GB per block).
    """

    def __init__(self, model: nn.Module, device: torch.device | str, prefetch: int = 1):
        super().__init__()
        self.model = model
        self.config = model.config
        self.device = torch.device(device)
        self.streamer = stream_module_list(model, "joint_blocks", self.device, prefetch)
        model.to(self.device)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                skip_layers: Sequence[int] = ()) -> torch.Tensor:
        return self.model(x, sigma, context, pooled, skip_layers=skip_layers)

    def describe(self) -> str:
        s = self.streamer
        return (f"sequential offload: {len(s.packs)} blocks streamed from pinned CPU memory "
                f"(largest {s.block_bytes() / GIB:.2f} GiB, prefetch {s.prefetch}) to {self.device}")


class CPUTokenEmbedding(nn.Module):
    """An nn.Embedding whose table stays in CPU memory (a plain attribute: `.to(device)`, ModelOffload
    and SequentialOffload leave it there). The lookup runs on the CPU; only the looked-up rows go to
    the ids' device. For token tables, where a prompt reads a few hundred of tens of thousands of rows."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = emb.num_embeddings, emb.embedding_dim, emb.padding_idx
        self.table = emb.weight.detach().to("cpu")  # [V, D]

    @property
    def weight(self) -> torch.Tensor:  # for code that reads the table's dtype / shape
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (any device) -> [..., D] on the ids' device."""
        return F.embedding(ids.cpu(), self.table).to(ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, on cpu"


def keep_token_embeddings_on_cpu(model: nn.Module, min_rows: int = 10_000) -> int:
    """Replace every nn.Embedding of `model` with >= min_rows rows (token tables, not position tables)
    by a CPUTokenEmbedding; tied modules (T5's shared / encoder.embed_tokens) stay one. Returns the
    bytes taken off the device."""
    done: dict[int, CPUTokenEmbedding] = {}  # keyed by the weight's storage: tied modules share one table
    freed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Embedding or child.num_embeddings < min_rows:
                continue
            key = child.weight.untyped_storage().data_ptr()
            if key not in done:
                if child.weight.device.type != "cpu":
                    freed += child.weight.numel() * child.weight.element_size()
                done[key] = CPUTokenEmbedding(child)
            setattr(parent, name, done[key])
    return freed


def stream_t5_blocks(t5: nn.Module, device: torch.device | str, prefetch: int = 1) -> BlockStreamer:
    """Stream a transformers T5EncoderModel's `encoder.block` list (the rest stays with the module)."""
    return stream_module_list(t5.encoder, "block", device, prefetch)


class ModelOffload:
    """Whole models on the device only while used: `with offload.on_device(model): ...`.

    Each model is packed once into pinned CPU memory (`register`, or on first use). Entering copies
    it to the device in one transfer; leaving drops the device copy (nothing is copied back) and,
    with `empty_cache`, returns the memory to the driver so a small card is not left fragmented.
    StreamedBlocks inside a model stay streamed (their weights are not part of the pack).
    """

    def __init__(self, device: torch.device | str, empty_cache: bool = True):
        self.device = torch.device(device)
        self.empty_cache = empty_cache
        self._packs: dict[int, PackedWeights] = {}

    def manages(self, module: nn.Module) -> bool:
        """Whether `module` was registered here (on_device moves only those, or any on first use)."""
        return id(module) in self._packs

    def register(self, module: nn.Module, name: str = "module") -> PackedWeights:
        key = id(module)
        if key not in self._packs:
            self._packs[key] = PackedWeights(module, name)
        return self._packs[key]

    @contextmanager
    def on_device(self, module: nn.Module) -> Iterator[nn.Module]:
        if self.device.type != "cuda":
            yield module
            return
        pack = self.register(module, type(module).__name__)
        flat = pack.to_device(self.device)
        pack.swap_in(flat)
        try:
            yield module
        finally:
            pack.swap_out()
            del flat
            if self.empty_cache:
                torch.cuda.empty_cache()


def _owned_modules(module: nn.Module) -> Iterator[nn.Module]:
    """module and its descendants, except what sits under a StreamedBlock (streamed separately)."""
    stack = [module]
    while stack:
        m = stack.pop()
        if isinstance(m, StreamedBlock):
            continue
        yield m
        stack.extend(m.children())


# ---------------------------------------------------------------------- reports and decisions

def peak_memory_report(stats) -> str:
    """Table of a StageStats (pipeline.stats): stage, seconds, peak GPU memory allocated."""
    seconds: Mapping[str, float] = getattr(stats, "seconds", {}) or {}
    peaks: Mapping[str, int] = getattr(stats, "peak_bytes", {}) or {}
    names = list(dict.fromkeys([*seconds, *peaks]))
    lines = [f"{'stage':<14}{'seconds':>10}{'peak GiB':>11}"]
    for n in names:
        s = f"{seconds[n]:.3f}" if n in seconds else "-"
        p = f"{peaks[n] / GIB:.2f}" if n in peaks else "-"
        lines.append(f"{n:<14}{s:>10}{p:>11}")
    total_s = sum(seconds.values())
    total_p = f"{max(peaks.values()) / GIB:.2f}" if peaks else "-"
    lines.append(f"{'total':<14}{total_s:>10.3f}{total_p:>11}")
    return "\n".join(lines)


def use_tiled_decode(width: int, height: int, budget_bytes: int | None = None,
                     resident_bytes: int = 0) -> bool:
    """Whether the VAE decode of a width x height image should run tiled.

    budget_bytes None: the fixed 8 GB-card rule (tiled above TILED_DECODE_PIXELS_8GB pixels).
    Otherwise: tiled when the estimated full-decode activations plus `resident_bytes` (weights still
    on the device while decoding) exceed the budget.
    """
    if width <= 0 or height <= 0:
        raise InputError(f"invalid image size {width}x{height}")
    if budget_bytes is None:
        return width * height > TILED_DECODE_PIXELS_8GB
    return resident_bytes + vae_decode_bytes(width, height) > budget_bytes


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on a CUDA device: the driver's free memory plus what
    torch's caching allocator holds unused. None off CUDA."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def vae_decode_bytes(width: int, height: int) -> int:
    """Estimated activation peak of a full bf16 VAE decode (fit to H100 measurements, see above)."""
    mp = width * height / 1e6
    a, b = VAE_DECODE_GIB_FIT
    return int((a * mp + b * mp * mp) * GIB)
