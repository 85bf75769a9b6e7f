"""CUDA graphs for the fast MMDiT step: one captured graph per fixed shape.

A generation runs one shape for all its steps (batch, H, W, context length, skip_layers), so the
first call per key warms up (this is when torch.compile compiles), captures the whole step into a
CUDA graph with static input buffers, and every later call copies the inputs in and replays: no
Python, no per-kernel launch cost. All graphs share one memory pool, so several shapes (cond-only
and cfg batches, skip-layer passes) cost little extra memory.

The returned tensor is a fresh copy (a graph's output buffer is overwritten by the next replay).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

WARMUP_CALLS = 2  # eager calls before capture: compile, cuDNN/cuBLAS plans, allocator warm


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class GraphCache:
    """`cache(x, sigma, context, pooled, skip) -> (out, fresh)`; fresh: this call compiled/captured."""

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None

    @staticmethod
    def key(tensors: tuple[torch.Tensor, ...], skip: tuple[int, ...], where: tuple[int, ...] = ()) -> tuple:
        """Shapes, dtypes and devices of the inputs, the skipped blocks and the blocks given a
        ControlNet residual (`where`: a prompt with ControlNet gets its own graph)."""
        return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors) + (skip, where)

    @staticmethod
    def _call(fn, static: tuple[torch.Tensor, ...], skip: tuple[int, ...], where: tuple[int, ...], depth: int):
        if not where:
            return fn(*static, skip)
        control: list[torch.Tensor | None] = [None] * depth
        for i, r in zip(where, static[4:]):
            control[i] = r
        return fn(*static[:4], skip, control=control)

    def clear(self) -> None:
        self.graphs.clear()

    def capture(self, tensors: tuple[torch.Tensor, ...], skip: tuple[int, ...], where: tuple[int, ...] = (),
                depth: int = 0) -> _Graph:
        static = tuple(t.detach().clone() for t in tensors)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                self._call(self.fn, static, skip, where, depth)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._call(self.fn, static, skip, where, depth)
        logger.info("captured CUDA graph for %s", self.key(tensors, skip, where))
        return _Graph(graph, static, out)

    def __call__(self, x, sigma, context, pooled, skip: tuple[int, ...],
                 control: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, bool]:
        """control: per joint block a residual or None (None: no ControlNet); present residuals are
        inputs of the graph, copied in like x."""
        where = tuple(i for i, r in enumerate(control) if r is not None) if control is not None else ()
        tensors = (x, sigma, context, pooled, *(control[i] for i in where))
        k = self.key(tensors, skip, where)
        fresh = k not in self.graphs
        if fresh:
            self.graphs[k] = self.capture(tensors, skip, where, len(control) if control is not None else 0)
        g = self.graphs[k]
        for dst, src in zip(g.inputs, tensors):
            dst.copy_(src)
        g.graph.replay()
        return g.output.clone(), fresh
