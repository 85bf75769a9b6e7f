"""What one request may sample, metered while it runs.

The server refuses a prompt whose widths, heights, batch sizes and steps promise more than its budget
(server/validation.py check_prompt_work: width x height x batch x steps, read from the graph before it
runs). A graph can grow its latents after that check: LatentUpscaleBy, RepeatLatentBatch, an image
resized and encoded again, SamplerLCMUpscale's scale_ratio. So the executor also meters what the
samplers really do: every sampling run (generation.sample, which every road calls) charges
(latent height x 8) x (latent width x 8) x batch x steps to the meter of the running request, and the
run that would pass the budget stops before its first step with WorkBudgetExceeded, the node's
execution error (an InputError: a 400-class failure, never a 500).

    with metered(WorkMeter(budget)):   # the executor, around one prompt (or one cross-prompt batch)
        ...                            # generation.sample -> charge_sampling(x.shape, steps)

Without a meter (the CLI, the Python API) nothing is charged.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

from sd35fp8.errors import InputError

LATENT_SCALE = 8  # SD3's VAE: one latent cell per 8 x 8 pixels

_current: ContextVar["WorkMeter | None"] = ContextVar("sd35fp8_work_meter", default=None)


class WorkBudgetExceeded(InputError):
    """A sampling run would pass the request's budget (the server's --max-pixel-steps)."""


@dataclass
class WorkMeter:
    budget: int  # pixel-steps: width x height x batch x steps, summed over the request's sampling runs
    used: int = 0

    def charge(self, work: int, what: str) -> None:
        """Count `work` pixel-steps for `what`, or raise WorkBudgetExceeded (nothing counted) past the budget."""
        if self.used + work > self.budget:
            raise WorkBudgetExceeded(
                f"{what} would sample {work} pixel-steps (width x height x batch x steps) after {self.used} already "
                f"sampled by this request: past the server's budget of {self.budget} (--max-pixel-steps). The "
                "graph grew its latents after the server checked it (an upscale, a repeated batch): ask for less")
        self.used += work


@contextmanager
def metered(meter: WorkMeter | None) -> Iterator[WorkMeter | None]:
    """Charge the sampling runs inside to `meter` (None: no metering) in this thread."""
    token = _current.set(meter)
    try:
        yield meter
    finally:
        _current.reset(token)


def charge_sampling(latent_shape: tuple[int, ...], steps: int, growth: float = 1.0, what: str = "sampling") -> None:
    """A sampling run of `steps` steps over a latent [B, C, h, w] to the current meter, if any. growth: the
    sampler's own enlargement of the latent's sides (SamplerLCMUpscale's scale_ratio; counted squared as an
    upper bound for every step)."""
    meter = _current.get()
    if meter is None:
        return
    b, h, w = int(latent_shape[0]), int(latent_shape[-2]), int(latent_shape[-1])
    area = max(1.0, float(growth)) ** 2
    meter.charge(int(b * h * LATENT_SCALE * w * LATENT_SCALE * max(int(steps), 1) * area), what)
