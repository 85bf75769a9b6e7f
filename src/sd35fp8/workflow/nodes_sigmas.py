"""ComfyUI's schedulers and SIGMAS tools as nodes (comfy_extras/nodes_custom_sampler.py): same names, inputs,
defaults and outputs. BasicScheduler, SplitSigmas and SetFirstSigma are with the custom-sampling nodes
(nodes_sampling.py).

    KarrasScheduler / ExponentialScheduler / PolyexponentialScheduler / LaplaceScheduler / VPScheduler
        k-diffusion's schedules over the node's own sigma bounds (sampling/schedulers.py *_sigmas)
    BetaSamplingScheduler / SDTurboScheduler        schedules over the MODEL's flow sigmas (its shift)
    SplitSigmasDenoise / FlipSigmas / ExtendIntermediateSigmas / ManualSigmas / SamplingPercentToSigma

SIGMAS are float32 [n] tensors on the CPU. A schedule may hold at most MAX_SIGMAS values (ComfyUI's steps
bound is 10000), so a pasted ManualSigmas string or an extended schedule cannot ask for unbounded work.
"""

from __future__ import annotations

import math
import re

import torch

from sd35fp8.errors import InputError
from sd35fp8.workflow.node_base import Node

MAX_SIGMAS = 10001  # steps + 1 at ComfyUI's largest steps input
_BOUND = {"min": 0.0, "max": 5000.0, "step": 0.01, "round": False}
_NUMBER = re.compile(r"[-+]?(?:\d*\.*\d+)")  # ComfyUI ManualSigmas' pattern


def manual_sigma_count(text: str) -> int:
    """How many sigmas a ManualSigmas string holds (the server's work budget counts them as steps)."""
    return sum(1 for _ in _NUMBER.finditer(text))


def checked(sigmas: torch.Tensor, node: str) -> torch.Tensor:
    """A schedule within MAX_SIGMAS values and finite, or InputError naming the node."""
    if sigmas.numel() > MAX_SIGMAS:
        raise InputError(f"{node}: {sigmas.numel()} sigmas; a schedule may have at most {MAX_SIGMAS}")
    if not torch.isfinite(sigmas).all():
        raise InputError(f"{node}: the schedule has non-finite sigmas ({sigmas.tolist()[:8]}...)")
    return sigmas


def _log_bounds(node: str, sigma_min: float, sigma_max: float) -> None:
    if sigma_min <= 0 or sigma_max <= 0:
        raise InputError(f"{node}: sigma_min and sigma_max must be > 0 (the schedule is in log sigma), "
                         f"got {sigma_min}, {sigma_max}")


class _Scheduler(Node):
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/schedulers"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"


class KarrasScheduler(_Scheduler):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                             "sigma_max": ("FLOAT", {"default": 14.614642, **_BOUND}),
                             "sigma_min": ("FLOAT", {"default": 0.0291675, **_BOUND}),
                             "rho": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.01, "round": False})}}

    def get_sigmas(self, steps, sigma_max, sigma_min, rho):
        from sd35fp8.sampling.schedulers import karras_sigmas

        if rho <= 0:
            raise InputError(f"KarrasScheduler: rho must be > 0, got {rho}")
        return (checked(karras_sigmas(steps, sigma_min, sigma_max, rho), "KarrasScheduler"),)


class ExponentialScheduler(_Scheduler):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                             "sigma_max": ("FLOAT", {"default": 14.614642, **_BOUND}),
                             "sigma_min": ("FLOAT", {"default": 0.0291675, **_BOUND})}}

    def get_sigmas(self, steps, sigma_max, sigma_min):
        from sd35fp8.sampling.schedulers import exponential_sigmas

        _log_bounds("ExponentialScheduler", sigma_min, sigma_max)
        return (checked(exponential_sigmas(steps, sigma_min, sigma_max), "ExponentialScheduler"),)


class PolyexponentialScheduler(_Scheduler):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                             "sigma_max": ("FLOAT", {"default": 14.614642, **_BOUND}),
                             "sigma_min": ("FLOAT", {"default": 0.0291675, **_BOUND}),
                             "rho": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "round": False})}}

    def get_sigmas(self, steps, sigma_max, sigma_min, rho):
        from sd35fp8.sampling.schedulers import polyexponential_sigmas

        _log_bounds("PolyexponentialScheduler", sigma_min, sigma_max)
        return (checked(polyexponential_sigmas(steps, sigma_min, sigma_max, rho), "PolyexponentialScheduler"),)


class LaplaceScheduler(_Scheduler):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                             "sigma_max": ("FLOAT", {"default": 14.614642, **_BOUND}),
                             "sigma_min": ("FLOAT", {"default": 0.0291675, **_BOUND}),
                             "mu": ("FLOAT", {"default": 0.0, "min": -10.0, "max": 10.0, "step": 0.1, "round": False}),
                             "beta": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.1, "round": False})}}

    def get_sigmas(self, steps, sigma_max, sigma_min, mu, beta):
        from sd35fp8.sampling.schedulers import laplace_sigmas

        return (checked(laplace_sigmas(steps, sigma_min, sigma_max, mu, beta), "LaplaceScheduler"),)


class VPScheduler(_Scheduler):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                             "beta_d": ("FLOAT", {"default": 19.9, **_BOUND}),
                             "beta_min": ("FLOAT", {"default": 0.1, **_BOUND}),
                             "eps_s": ("FLOAT", {"default": 0.001, "min": 0.0, "max": 1.0, "step": 0.0001,
                                                 "round": False})}}

    def get_sigmas(self, steps, beta_d, beta_min, eps_s):
        from sd35fp8.sampling.schedulers import vp_sigmas

        return (checked(vp_sigmas(steps, beta_d, beta_min, eps_s), "VPScheduler"),)


class BetaSamplingScheduler(_Scheduler):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                             "alpha": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 50.0, "step": 0.01, "round": False}),
                             "beta": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 50.0, "step": 0.01, "round": False})}}

    def get_sigmas(self, model, steps, alpha, beta):
        from sd35fp8.sampling import FlowMatching
        from sd35fp8.sampling.schedulers import beta as beta_schedule

        if alpha <= 0 or beta <= 0:
            raise InputError(f"BetaSamplingScheduler: alpha and beta must be > 0, got {alpha}, {beta}")
        return (beta_schedule(FlowMatching(model.shift), steps, alpha, beta),)


class SDTurboScheduler(_Scheduler):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "steps": ("INT", {"default": 1, "min": 1, "max": 10}),
                             "denoise": ("FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01})}}

    def get_sigmas(self, model, steps, denoise):
        from sd35fp8.sampling import FlowMatching

        start = 10 - int(10 * denoise)
        timesteps = torch.flip(torch.arange(1, 11) * 100 - 1, (0,))[start:start + steps]
        sigmas = FlowMatching(model.shift).sigma(timesteps)
        return (torch.cat([sigmas, sigmas.new_zeros([1])]),)


class _SigmasTool(Node):
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/sigmas"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"


class SplitSigmasDenoise(_SigmasTool):
    RETURN_TYPES = ("SIGMAS", "SIGMAS")
    RETURN_NAMES = ("high_sigmas", "low_sigmas")

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"sigmas": ("SIGMAS",),
                             "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    def get_sigmas(self, sigmas, denoise):
        steps = max(sigmas.shape[-1] - 1, 0)
        total = round(steps * denoise)
        return (sigmas[:-total], sigmas[-(total + 1):])  # ComfyUI's slices, also at denoise 0 (high empty)


class FlipSigmas(_SigmasTool):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"sigmas": ("SIGMAS",)}}

    def get_sigmas(self, sigmas):
        if len(sigmas) == 0:
            return (sigmas,)
        sigmas = sigmas.flip(0)
        if sigmas[0] == 0:
            sigmas[0] = 0.0001
        return (sigmas,)


class ExtendIntermediateSigmas(_SigmasTool):
    FUNCTION = "extend"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "sigmas": ("SIGMAS",),
            "steps": ("INT", {"default": 2, "min": 1, "max": 100}),
            "start_at_sigma": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 20000.0, "step": 0.01, "round": False}),
            "end_at_sigma": ("FLOAT", {"default": 12.0, "min": 0.0, "max": 20000.0, "step": 0.01, "round": False}),
            "spacing": (["linear", "cosine", "sine"],),
        }}

    def extend(self, sigmas, steps, start_at_sigma, end_at_sigma, spacing):
        start = float("inf") if start_at_sigma < 0 else start_at_sigma
        x = torch.linspace(0, 1, steps + 1)[1:-1]  # the points between two sigmas
        frac = {"linear": lambda t: t, "cosine": lambda t: torch.sin(t * math.pi / 2),
                "sine": lambda t: 1 - torch.cos(t * math.pi / 2)}[spacing](x)
        out: list[float] = []
        for cur, nxt in zip(sigmas[:-1], sigmas[1:]):
            out.append(float(cur))
            if end_at_sigma <= cur <= start:
                out.extend((frac * (nxt - cur) + cur).tolist())
            if len(out) > MAX_SIGMAS:
                break
        if len(sigmas) > 0:
            out.append(float(sigmas[-1]))
        return (checked(torch.FloatTensor(out), "ExtendIntermediateSigmas"),)


class ManualSigmas(_SigmasTool):
    CATEGORY = "_for_testing/custom_sampling"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"sigmas": ("STRING", {"default": "1, 0.5", "multiline": False})}}

    def get_sigmas(self, sigmas):
        try:
            values = [float(v) for v in _NUMBER.findall(sigmas)[:MAX_SIGMAS + 1]]
        except ValueError as e:  # "1..5" matches the pattern, as in ComfyUI, and is no number
            raise InputError(f"ManualSigmas: {e}; write the sigmas as numbers separated by commas") from e
        return (checked(torch.FloatTensor(values), "ManualSigmas"),)


class SamplingPercentToSigma(Node):
    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("sigma_value",)
    FUNCTION = "get_sigma"
    CATEGORY = "sampling/custom_sampling/sigmas"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",),
                             "sampling_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.0001}),
                             "return_actual_sigma": ("BOOLEAN", {"default": False, "tooltip": (
                                 "Return the actual sigma value instead of the value used for interval checks.\n"
                                 "This only affects results at 0.0 and 1.0.")})}}

    def get_sigma(self, model, sampling_percent, return_actual_sigma):
        from sd35fp8.sampling import FlowMatching

        ms = FlowMatching(model.shift)
        sigma = ms.percent_to_sigma(sampling_percent)
        if return_actual_sigma:
            if sampling_percent == 0.0:
                sigma = float(ms.sigma_max)
            elif sampling_percent == 1.0:
                sigma = float(ms.sigma_min)
        return (float(sigma),)


SIGMAS_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    KarrasScheduler, ExponentialScheduler, PolyexponentialScheduler, LaplaceScheduler, VPScheduler,
    BetaSamplingScheduler, SDTurboScheduler, SplitSigmasDenoise, FlipSigmas, ExtendIntermediateSigmas, ManualSigmas,
    SamplingPercentToSigma,
)}
