"""ComfyUI's custom-sampling nodes (comfy_extras/nodes_custom_sampler.py): the parts of a KSampler as
separate values, same names, inputs, defaults, outputs and categories.

    NOISE: Noise (a seed, or none)   GUIDER: Guider (model + conditionings + cfg)
    SAMPLER: Sampler (a sampler name) SIGMAS: float32 [n+1]
SamplerCustomAdvanced / SamplerCustom run the same sampling arithmetic as KSampler (generation.sample; not yet through it):
ComfyUI's noise draw, an empty latent not shifted into model space, noise scaling at sigmas[0], CFG
batched, ControlNets in the conditionings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sd35fp8.workflow.node_base import SEED_MAX, Node


@dataclass(frozen=True)
class Noise:
    seed: int | None  # None: DisableNoise

    def generate(self, latent: torch.Tensor, batch_index: list | None = None) -> torch.Tensor:
        """ComfyUI's Noise_RandomNoise.generate_noise: the seed's draw, picked by the LATENT's batch_index."""
        from sd35fp8.sampling import prepare_noise

        if self.seed is None:
            return torch.zeros(latent.shape, dtype=torch.float32)
        return prepare_noise(self.seed, tuple(latent.shape), batch_index)


@dataclass(frozen=True)
class Guider:
    model: Any  # engine.SD3Model
    positive: list
    negative: list | None
    cfg: float


@dataclass(frozen=True)
class Sampler:
    name: str


def _names(kind: str) -> list[str]:
    from sd35fp8.workflow import engine

    return engine.sampler_names() if kind == "sampler" else engine.scheduler_names()


def run_guider(ctx, noise: Noise, guider: Guider, sampler: Sampler, sigmas: torch.Tensor,
               latent: dict) -> tuple[dict, dict]:
    """SamplerCustomAdvanced: -> (output, denoised_output) LATENTs (raw VAE space)."""
    from sd35fp8 import sampling
    from sd35fp8.models.vae import to_model_space, to_vae_space
    from sd35fp8.workflow.engine import conditioning_of, fix_empty_latent_channels

    dev = torch.device(ctx.device)
    samples = fix_empty_latent_channels(latent["samples"]).to(dev, torch.float32)
    if len(sigmas) < 2:  # nothing to sample (ComfyUI returns the latent)
        return {"samples": latent["samples"]}, {"samples": latent["samples"]}
    conds = [conditioning_of(guider.positive, "positive", dev)]  # Conditioning, or CondSet for combined ones
    if guider.negative is not None:
        conds.append(conditioning_of(guider.negative, "negative", dev))
    ms = sampling.FlowMatching(guider.model.shift)
    sigmas = sigmas.to(dev, torch.float32)
    x0 = to_model_space(samples) if torch.count_nonzero(samples) > 0 else samples  # ComfyUI: empty not shifted
    x = ms.noise_scaling(sigmas[0], noise.generate(samples, latent.get("batch_index")).to(dev), x0)
    denoiser = sampling.CFGDenoiser(guider.model.mmdit, conds[0], conds[1] if len(conds) > 1 else None,
                                    cfg=guider.cfg if len(conds) > 1 else 1.0, model_sampling=ms, dtype=ctx.dtype)
    last: dict[str, torch.Tensor] = {}
    total = len(sigmas) - 1

    def on_step(info: dict) -> None:
        last["x0"] = info["denoised"]
        ctx.check_interrupt()
        ctx.progress(int(info["i"]) + 1, total, info["denoised"])

    ctx.check_interrupt()
    out = sampling.sample(sampler.name, denoiser, x, sigmas, extra_args={"seed": noise.seed or 0}, callback=on_step,
                          disable=True)
    out = to_vae_space(ms.inverse_noise_scaling(sigmas[-1], out)).float().cpu()
    denoised = to_vae_space(last["x0"]).float().cpu() if "x0" in last else out
    return {"samples": out}, {"samples": denoised}


class KSamplerSelect(Node):
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = "sampling/custom_sampling/samplers"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"sampler_name": (_names("sampler"),)}}

    def get_sampler(self, sampler_name):
        return (Sampler(sampler_name),)


class BasicScheduler(Node):
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/schedulers"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "scheduler": (_names("scheduler"),),
            "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    def get_sigmas(self, model, scheduler, steps, denoise):
        from sd35fp8.sampling import FlowMatching, calculate_sigmas, check_scheduler

        check_scheduler(scheduler)
        total = steps
        if denoise < 1.0:
            if denoise <= 0.0:
                return (torch.FloatTensor([]),)
            total = int(steps / denoise)
        sigmas = calculate_sigmas(FlowMatching(model.shift), scheduler, total).float().cpu()
        return (sigmas[-(steps + 1):],)


class RandomNoise(Node):
    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"
    CATEGORY = "sampling/custom_sampling/noise"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX,
                                                     "control_after_generate": True})}}

    def get_noise(self, noise_seed):
        return (Noise(int(noise_seed)),)


class DisableNoise(Node):
    RETURN_TYPES = ("NOISE",)
    FUNCTION = "get_noise"
    CATEGORY = "sampling/custom_sampling/noise"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {}}

    def get_noise(self):
        return (Noise(None),)


class SetFirstSigma(Node):
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "set_first_sigma"
    CATEGORY = "sampling/custom_sampling/sigmas"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"sigmas": ("SIGMAS",),
                             "sigma": ("FLOAT", {"default": 136.0, "min": 0.0, "max": 20000.0, "step": 0.001,
                                                 "round": False})}}

    def set_first_sigma(self, sigmas, sigma):
        sigmas = sigmas.clone()
        sigmas[0] = sigma
        return (sigmas,)


class SplitSigmas(Node):
    RETURN_TYPES = ("SIGMAS", "SIGMAS")
    RETURN_NAMES = ("high_sigmas", "low_sigmas")
    FUNCTION = "get_sigmas"
    CATEGORY = "sampling/custom_sampling/sigmas"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"sigmas": ("SIGMAS",), "step": ("INT", {"default": 0, "min": 0, "max": 10000})}}

    def get_sigmas(self, sigmas, step):
        return (sigmas[:step + 1], sigmas[step:])


class BasicGuider(Node):
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "conditioning": ("CONDITIONING",)}}

    def get_guider(self, model, conditioning):
        return (Guider(model, conditioning, None, 1.0),)


class CFGGuider(Node):
    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
                             "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                               "round": 0.01})}}

    def get_guider(self, model, positive, negative, cfg):
        return (Guider(model, positive, negative, float(cfg)),)


class SamplerCustomAdvanced(Node):
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"
    CATEGORY = "sampling/custom_sampling"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"noise": ("NOISE",), "guider": ("GUIDER",), "sampler": ("SAMPLER",),
                             "sigmas": ("SIGMAS",), "latent_image": ("LATENT",)}}

    def sample(self, noise, guider, sampler, sigmas, latent_image):
        return run_guider(self.ctx, noise, guider, sampler, sigmas, latent_image)


class SamplerCustom(Node):
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("output", "denoised_output")
    FUNCTION = "sample"
    CATEGORY = "sampling/custom_sampling"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "add_noise": ("BOOLEAN", {"default": True}),
            "noise_seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True}),
            "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "sampler": ("SAMPLER",),
            "sigmas": ("SIGMAS",),
            "latent_image": ("LATENT",),
        }}

    def sample(self, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas, latent_image):
        noise = Noise(int(noise_seed) if add_noise else None)
        return run_guider(self.ctx, noise, Guider(model, positive, negative, float(cfg)), sampler, sigmas,
                          latent_image)


SAMPLING_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    KSamplerSelect, BasicScheduler, RandomNoise, DisableNoise, SetFirstSigma, SplitSigmas, BasicGuider, CFGGuider,
    SamplerCustomAdvanced, SamplerCustom,
)}
