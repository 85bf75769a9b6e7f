"""CUDA graphs for the fast MMDiT step: one captured graph per fixed shape and model state.

A generation runs one shape for all its steps (batch, H, W, context length, skip_layers), so the
first call per key warms up (this is when torch.compile compiles), captures the whole step into a
CUDA graph with static input buffers, and every later call copies the inputs in and replays: no
Python, no per-kernel launch cost. All graphs share one memory pool, so several shapes (cond-only
and cfg batches, skip-layer passes) cost little extra memory.

What a graph reads besides its inputs is frozen at capture: the LoRA terms in the layers' slots
(their factor tensors by address, their strengths as constants, whether a layer has any). So the
key also holds `state()`: (a hashable tag, objects to keep alive), the engine's active LoRA set
(MMDiTEngine.lora_state: per slot the terms' identities and strengths, and whether they take the
fused road, lora/fused.py). A LoRA swap or a strength
change gives a new key, hence a new capture, and swapping back replays the earlier graph; the
entry keeps the tagged objects alive so their ids (and the tensors the graph reads) stay valid.
At most `max_graphs` graphs are kept (least recently used dropped first), and graphs of at most
`max_states` LoRA sets: a fused LoRA set holds a copy of every layer's fp8 weight (lora/fused.py, ~5.5 GB
at Large), which its graphs keep alive, so a server cycling through many LoRAs drops the graphs (and
with them the packs) of the least recently used set first.

The returned tensor is a fresh copy (a graph's output buffer is overwritten by the next replay).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)

WARMUP_CALLS = 2  # eager calls before capture: compile, cuDNN/cuBLAS plans, allocator warm
MAX_GRAPHS = 32  # captured graphs kept (shapes x LoRA sets); least recently used dropped first
MAX_STATES = 3  # LoRA sets (non-empty state tags) with graphs kept: each keeps its fused packs alive


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph (or what `capture` returns in a CPU test)
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    keep: Any = None  # the objects the state tag names (LoRA terms): alive while the graph is


def capture_graph(call: Callable[[], Any], pool) -> tuple[Any, Any]:
    """WARMUP_CALLS eager calls on a side stream, then `call` captured into a CUDA graph in `pool`
    -> (graph, what the captured call returned: its output buffers, rewritten by every replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = call()
    return graph, out


def no_state() -> tuple[tuple, None]:
    return (), None


class GraphCache:
    """`cache(x, sigma, context, pooled, skip) -> (out, fresh)`; fresh: this call compiled/captured.

    state: () -> (tag, keep): the part of the key that is not an input (the active LoRA set)."""

    def __init__(self, fn: Callable[..., torch.Tensor], state: Callable[[], tuple[tuple, Any]] = no_state,
                 max_graphs: int = MAX_GRAPHS, max_states: int = MAX_STATES):
        self.fn = fn
        self.state = state
        self.max_graphs = max_graphs
        self.max_states = max_states
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = None

    @staticmethod
    def key(tensors: tuple[torch.Tensor, ...], skip: tuple[int, ...], where: tuple = (),
            tag: tuple = ()) -> tuple:
        """Shapes, dtypes and devices of the inputs, the skipped blocks, the blocks given a ControlNet
        residual (`where`: a prompt with ControlNet gets its own graph; with `residual_inputs` the pairs
        (block, input index)) and the state tag (LoRA terms)."""
        return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors) + (skip, where, tag)

    @staticmethod
    def residual_inputs(control: list[torch.Tensor | None]) -> tuple[tuple, list[torch.Tensor]]:
        """Per-block residuals -> (where: ((block, input index), ...), the distinct tensors). A ControlNet
        output feeding several blocks (the SD3.5 Large ControlNets: each layer's output two blocks) is one
        graph input, copied in once."""
        where, uniq, index = [], [], {}
        for i, r in enumerate(control):
            if r is not None:
                if id(r) not in index:
                    index[id(r)] = len(uniq)
                    uniq.append(r)
                where.append((i, index[id(r)]))
        return tuple(where), uniq

    @staticmethod
    def _call(fn, static: tuple[torch.Tensor, ...], skip: tuple[int, ...], where: tuple, depth: int):
        """where: blocks (one input each, in order) or (block, input index) pairs (residual_inputs)."""
        if not where:
            return fn(*static, skip)
        control: list[torch.Tensor | None] = [None] * depth
        for k, w in enumerate(where):
            i, j = w if isinstance(w, tuple) else (w, k)
            control[i] = static[4 + j]
        return fn(*static[:4], skip, control=control)

    def clear(self) -> None:
        """Drop every graph, and the memory pool with them: once its last graph is gone the allocator frees
        the pool, and capturing into the old handle fails (CUDACachingAllocator 'use_count > 0' assert,
        seen on the H200 when a LoRA merge refreshed the engine's weights)."""
        self.graphs.clear()
        self.pool = None

    def capture(self, tensors: tuple[torch.Tensor, ...], skip: tuple[int, ...], where: tuple[int, ...] = (),
                depth: int = 0) -> _Graph:
        static = tuple(t.detach().clone() for t in tensors)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph, out = capture_graph(lambda: self._call(self.fn, static, skip, where, depth), self.pool)
        logger.info("captured CUDA graph for %s", self.key(tensors, skip, where))
        return _Graph(graph, static, out)

    def __call__(self, x, sigma, context, pooled, skip: tuple[int, ...],
                 control: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, bool]:
        """control: per joint block a residual or None (None: no ControlNet); present residuals are
        inputs of the graph, copied in like x."""
        where, residuals = self.residual_inputs(control) if control is not None else ((), [])
        tensors = (x, sigma, context, pooled, *residuals)
        tag, keep = self.state()
        k = self.key(tensors, skip, where, tag)
        fresh = k not in self.graphs
        if fresh:
            if tag:
                self._drop_old_states(tag)
            g = self.capture(tensors, skip, where, len(control) if control is not None else 0)
            g.keep = keep
            self.graphs[k] = g
        return replay(self.graphs, k, tensors, self.max_graphs).clone(), fresh


    def _drop_old_states(self, tag: tuple) -> None:
        """Before capturing for LoRA set `tag`: drop every graph of the least recently used other sets
        so that at most max_states sets keep graphs (and their packs: the memory goes back before the
        new set's packs and capture need it)."""
        order: list[tuple] = []  # non-empty tags, least recently used first
        for key in self.graphs:
            t = key[-1]
            if t and t != tag:
                if t in order:
                    order.remove(t)
                order.append(t)
        for old in order[:max(0, len(order) - (self.max_states - 1))]:
            for key in [key for key in self.graphs if key[-1] == old]:
                del self.graphs[key]
            logger.info("dropped the CUDA graphs of a LoRA set (more than %d sets kept)", self.max_states)


def replay(graphs: OrderedDict, k: tuple, tensors: Sequence[torch.Tensor], max_graphs: int):
    """Copy tensors into graph k's inputs, replay it, return its output buffer; k becomes the most recent
    and the least recent graphs beyond max_graphs are dropped (their memory goes back to the pool)."""
    graphs.move_to_end(k)
    while len(graphs) > max_graphs:
        dropped, _ = graphs.popitem(last=False)
        logger.info("dropped CUDA graph for %s (more than %d kept)", dropped, max_graphs)
    g = graphs[k]
    for dst, src in zip(g.inputs, tensors):
        dst.copy_(src)
    g.graph.replay()
    return g.output


class TensorGraphs:
    """`graphs(*tensors) -> (outputs, fresh)`: fn(*tensors) -> a tuple of tensors, captured once per input
    shapes / dtypes / devices and replayed (the ControlNet engine, fast/controlnet.py). The outputs are the
    graph's own buffers, rewritten by its next replay: consume or copy them before calling again."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], max_graphs: int = MAX_GRAPHS):
        self.fn = fn
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = None

    def clear(self) -> None:
        self.graphs.clear()
        self.pool = None

    def __call__(self, *tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], bool]:
        k = tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)
        fresh = k not in self.graphs
        if fresh:
            static = tuple(t.detach().clone() for t in tensors)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph, out = capture_graph(lambda: self.fn(*static), self.pool)
            logger.info("captured CUDA graph of %s for %s", getattr(self.fn, "__qualname__", self.fn), k)
            self.graphs[k] = _Graph(graph, static, out)
        return replay(self.graphs, k, tensors, self.max_graphs), fresh
