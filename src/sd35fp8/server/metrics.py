"""Prometheus metrics of one server (prometheus-client), served by GET /metrics.

Each app has its own CollectorRegistry (several apps in one process, as in the tests, never
collide). What is measured:

    sd35fp8_queue_pending / sd35fp8_queue_running      prompts waiting / running (gauges, at scrape)
    sd35fp8_prompts_total{outcome}                      finished prompts: success, error, interrupted,
                                                        failed_restart (--on-restart fail), worker_lost
    sd35fp8_prompts_rejected_total{reason}              POST /prompt refused: queue_full, draining
    sd35fp8_step_seconds                                one sampler step (time between progress events)
    sd35fp8_image_seconds                               one prompt, start to history entry
    sd35fp8_batch_size                                  prompts sampled together per run
    sd35fp8_gpu_memory_bytes{kind}                      allocated / reserved / peak (CUDA only)
    sd35fp8_process_resident_bytes                      the server's RSS
    sd35fp8_ready, sd35fp8_worker_restarts_total        readiness (1/0), worker restarts
"""

from __future__ import annotations

import resource
import sys

import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("success", "error", "interrupted", "failed_restart", "worker_lost")
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
IMAGE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; else the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class ServerMetrics:
    """The metric objects; the worker and the routes update them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        r = self.registry = CollectorRegistry()
        self.queue_pending = Gauge("sd35fp8_queue_pending", "Prompts waiting in the queue", registry=r)
        self.queue_running = Gauge("sd35fp8_queue_running", "Prompts running now", registry=r)
        self.prompts = Counter("sd35fp8_prompts", "Finished prompts by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.prompts.labels(outcome)
        self.rejected = Counter("sd35fp8_prompts_rejected", "POST /prompt refused", ["reason"], registry=r)
        for reason in ("queue_full", "draining"):
            self.rejected.labels(reason)
        self.step_seconds = Histogram("sd35fp8_step_seconds", "One sampler step", buckets=STEP_BUCKETS, registry=r)
        self.image_seconds = Histogram("sd35fp8_image_seconds", "One prompt, start to history entry",
                                       buckets=IMAGE_BUCKETS, registry=r)
        self.batch_size = Histogram("sd35fp8_batch_size", "Prompts sampled together per run",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.gpu_memory = Gauge("sd35fp8_gpu_memory_bytes", "CUDA memory of the server's device", ["kind"],
                                registry=r)
        self.rss = Gauge("sd35fp8_process_resident_bytes", "Resident memory of the server process", registry=r)
        self.ready = Gauge("sd35fp8_ready", "1 when /ready answers 200", registry=r)
        self.worker_restarts = Counter("sd35fp8_worker_restarts", "Prompt worker restarts (died or hung)",
                                       registry=r)

    # ---- called by the worker ---------------------------------------------------------------
    def prompt_done(self, outcome: str, seconds: float | None = None) -> None:
        self.prompts.labels(outcome).inc()
        if seconds is not None:
            self.image_seconds.observe(seconds)

    def step(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    # ---- GET /metrics -----------------------------------------------------------------------
    def render(self, pending: int, running: int, ready: bool) -> bytes:
        """The exposition text, with the gauges read now."""
        self.queue_pending.set(pending)
        self.queue_running.set(running)
        self.ready.set(1 if ready else 0)
        self.rss.set(_rss_bytes())
        if self.device.type == "cuda" and torch.cuda.is_available():
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(index))
            self.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved(index))
            self.gpu_memory.labels("peak").set(torch.cuda.max_memory_allocated(index))
        return generate_latest(self.registry)
