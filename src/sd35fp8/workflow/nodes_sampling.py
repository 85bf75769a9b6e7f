"""ComfyUI's custom-sampling nodes (comfy_extras/nodes_custom_sampler.py): the parts of a KSampler as
separate values, same names, inputs, defaults, outputs and categories.

    NOISE: Noise (a seed, or none)   GUIDER: Guider (model + conditionings + cfg)
    SAMPLER: Sampler (a sampler name and its options: eta, s_noise, ...)   SIGMAS: float32 [n+1]
SamplerCustomAdvanced / SamplerCustom sample through the generation core as KSampler does (run_guider). The
schedulers and the nodes that edit SIGMAS are in nodes_sigmas.py. SamplerEulerCFGpp and SamplerLCMUpscale are
ComfyUI's comfy_extras/nodes_advanced_samplers.py nodes; their samplers (euler_cfg_pp, or euler_pp for "alternative";
lcm_upscale) run as the others do, lcm_upscale returning a larger latent than it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from sd35fp8.errors import InputError
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
    middle: list | None = None  # DualCFGGuider's cond2, with cfg2 (its cfg_cond2_negative) and style
    cfg2: float = 1.0
    nested: bool = False


@dataclass(frozen=True)
class Sampler:
    name: str
    options: tuple[tuple[str, Any], ...] = ()  # the sampler's own arguments (SamplerEulerAncestral's eta, ...)


def _names(kind: str) -> list[str]:
    from sd35fp8.workflow import engine

    return engine.sampler_names() if kind == "sampler" else engine.scheduler_names()


def run_guider(ctx, noise: Noise, guider: Guider, sampler: Sampler, sigmas: torch.Tensor,
               latent: dict, sampler_seed: int | None = None) -> tuple[dict, dict]:
    """SamplerCustomAdvanced: -> (output, denoised_output) LATENTs (raw VAE space), through the generation core
    (generation.sample) as KSampler: ComfyUI's noise draw (by the LATENT's batch_index), an empty latent not
    shifted into model space, noise scaling at sigmas[0], CFG batched, the MODEL's LoRAs and SkipLayerGuidanceSD3,
    the latent's noise_mask (inpainting), the server's step cache. sampler_seed: the seed the sampler's own noise
    (ancestral / SDE samplers) takes, None: the NOISE's (ComfyUI's noise.seed, 0 for DisableNoise); SamplerCustom
    passes its noise_seed even with add_noise off, as ComfyUI's sample_custom(seed=noise_seed) does."""
    from sd35fp8 import generation
    from sd35fp8.models.vae import to_vae_space
    from sd35fp8.sampling.samplers import GLOBAL_RNG_SAMPLERS
    from sd35fp8.workflow.engine import (conditioning_of, fix_empty_latent_channels, lora_active, noise_mask_of,
                                         sample_settings)

    dev = torch.device(ctx.device)
    samples = fix_empty_latent_channels(latent["samples"]).to(dev, torch.float32)
    if len(sigmas) < 2:  # nothing to sample (ComfyUI returns the latent)
        return {"samples": latent["samples"]}, {"samples": latent["samples"]}
    cond = conditioning_of(guider.positive, "positive", dev)  # Conditioning, or CondSet for combined ones
    uncond = None if guider.negative is None else conditioning_of(guider.negative, "negative", dev)
    middle = None if guider.middle is None else conditioning_of(guider.middle, "cond2", dev)
    model = guider.model
    options = sampler.options
    if sampler.name in GLOBAL_RNG_SAMPLERS:  # its noise continues the initial draw's generator (ComfyUI's global one)
        batch_index = latent.get("batch_index")
        options += (("initial_noise", noise.seed is not None),
                    ("noise_inds", None if batch_index is None else tuple(int(i) for i in batch_index)))
    # the MODEL's patches (shift, SLG, post-CFG) as KSampler takes them; the schedule given whole
    settings = replace(sample_settings(model, len(sigmas) - 1, guider.cfg if uncond is not None else 1.0,
                                       sampler.name, "simple"),
                       sigmas=tuple(float(v) for v in sigmas), sampler_options=options,
                       cache_threshold=ctx.engine_options.cache_threshold,
                       dual_cfg=None if middle is None else (guider.cfg2, guider.nested))
    last: dict[str, torch.Tensor] = {}

    def on_step(step: int, total: int, denoised: torch.Tensor) -> None:
        last["x0"] = denoised
        ctx.progress(step, total, denoised)

    with lora_active(model):
        out = generation.sample(model.mmdit, cond, uncond, samples, settings, seed=(noise.seed or 0) if sampler_seed is None else sampler_seed,
                                noise=noise.generate(samples, latent.get("batch_index")), dtype=ctx.dtype,
                                callback=on_step, interrupt=ctx.check_interrupt, mask=noise_mask_of(latent, dev),
                                middle=middle)
    out = out.float().cpu()
    denoised = to_vae_space(last["x0"]).float().cpu() if "x0" in last else out
    return {**latent, "samples": out}, {**latent, "samples": denoised}


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


_NOISE_SCALE = {"min": 0.0, "max": 100.0, "step": 0.01, "round": False}


class _SamplerNode(Node):
    """A KSamplerSelect with the sampler's own arguments (ComfyUI's comfy.samplers.ksampler(name, options))."""

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = "sampling/custom_sampling/samplers"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"


def _options(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(kw.items()))


class SamplerEulerAncestral(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"eta": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
                             "s_noise": ("FLOAT", {"default": 1.0, **_NOISE_SCALE})}}

    def get_sampler(self, eta, s_noise):
        return (Sampler("euler_ancestral", _options(eta=float(eta), s_noise=float(s_noise))),)


class SamplerDPMPP_2S_Ancestral(SamplerEulerAncestral):
    def get_sampler(self, eta, s_noise):
        return (Sampler("dpmpp_2s_ancestral", _options(eta=float(eta), s_noise=float(s_noise))),)


class SamplerLMS(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"order": ("INT", {"default": 4, "min": 1, "max": 100})}}

    def get_sampler(self, order):
        return (Sampler("lms", _options(order=int(order))),)


class SamplerDPMAdaptative(_SamplerNode):
    """dpm_adaptive with its step-size controller's settings (bounded: samplers.DPM_ADAPTIVE_MAX_STEPS)."""

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"order": ("INT", {"default": 3, "min": 2, "max": 3}),
                             "rtol": ("FLOAT", {"default": 0.05, **_NOISE_SCALE}),
                             "atol": ("FLOAT", {"default": 0.0078, **_NOISE_SCALE}),
                             "h_init": ("FLOAT", {"default": 0.05, **_NOISE_SCALE}),
                             "pcoeff": ("FLOAT", {"default": 0.0, **_NOISE_SCALE}),
                             "icoeff": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
                             "dcoeff": ("FLOAT", {"default": 0.0, **_NOISE_SCALE}),
                             "accept_safety": ("FLOAT", {"default": 0.81, **_NOISE_SCALE}),
                             "eta": ("FLOAT", {"default": 0.0, **_NOISE_SCALE}),
                             "s_noise": ("FLOAT", {"default": 1.0, **_NOISE_SCALE})}}

    def get_sampler(self, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise):
        return (Sampler("dpm_adaptive", _options(
            order=int(order), rtol=float(rtol), atol=float(atol), h_init=float(h_init), pcoeff=float(pcoeff),
            icoeff=float(icoeff), dcoeff=float(dcoeff), accept_safety=float(accept_safety), eta=float(eta),
            s_noise=float(s_noise))),)


class SamplerDPMPP_SDE(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"eta": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
                             "s_noise": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
                             "r": ("FLOAT", {"default": 0.5, **_NOISE_SCALE}),
                             "noise_device": (["gpu", "cpu"],)}}

    def get_sampler(self, eta, s_noise, r, noise_device):
        if not r > 0:
            raise InputError(f"SamplerDPMPP_SDE: r must be > 0 (the midpoint's fraction of the step), got {r}")
        name = "dpmpp_sde" if noise_device == "cpu" else "dpmpp_sde_gpu"
        return (Sampler(name, _options(eta=float(eta), s_noise=float(s_noise), r=float(r))),)


class SamplerDPMPP_2M_SDE(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"solver_type": (["midpoint", "heun"],),
                             "eta": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
                             "s_noise": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
                             "noise_device": (["gpu", "cpu"],)}}

    def get_sampler(self, solver_type, eta, s_noise, noise_device):
        name = "dpmpp_2m_sde" if noise_device == "cpu" else "dpmpp_2m_sde_gpu"
        return (Sampler(name, _options(eta=float(eta), s_noise=float(s_noise), solver_type=solver_type)),)


class SamplerDPMPP_3M_SDE(_SamplerNode):
    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"eta": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
                             "s_noise": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
                             "noise_device": (["gpu", "cpu"],)}}

    def get_sampler(self, eta, s_noise, noise_device):
        name = "dpmpp_3m_sde" if noise_device == "cpu" else "dpmpp_3m_sde_gpu"
        return (Sampler(name, _options(eta=float(eta), s_noise=float(s_noise))),)


class SamplerEulerAncestralCFGPP(_SamplerNode):
    """euler_ancestral_cfg_pp with its eta and s_noise (CFG++: steps with the uncond prediction)."""

    DISPLAY_NAME = "SamplerEulerAncestralCFG++"

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "round": False}),
            "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "round": False}),
        }}

    def get_sampler(self, eta, s_noise):
        return (Sampler("euler_ancestral_cfg_pp", _options(eta=float(eta), s_noise=float(s_noise))),)


ER_SDE_SOLVERS = ["ER-SDE", "Reverse-time SDE", "ODE"]


def reverse_time_sde_noise_scaler(x: torch.Tensor, eta: float) -> torch.Tensor:
    """SamplerER_SDE's noise scaler of the reverse-time SDE (and, at eta 0, of the ODE): x ** (eta + 1), on the
    er_lambda = sigma / alpha values the sampler passes (a module function: the option stays picklable)."""
    return x ** (eta + 1)


def _choice(node: str, name: str, value: Any, choices: list[str]) -> str:
    """A combo input's value, or InputError naming the node and the option (a linked value skips validation)."""
    if value not in choices:
        raise InputError(f"{node}: {name} {value!r} is not one of {choices}")
    return value


class SamplerER_SDE(_SamplerNode):  # noqa: N801 (ComfyUI's name)
    """er_sde as ER-SDE (its own noise scaler), a reverse-time SDE of strength eta (noise scaler x^(eta+1)) or the
    ODE (eta and s_noise 0); max_stage caps the solver's order (ComfyUI's SamplerER_SDE)."""

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "solver_type": (ER_SDE_SOLVERS,),
            "max_stage": ("INT", {"default": 3, "min": 1, "max": 3}),
            "eta": ("FLOAT", {"default": 1.0, **_NOISE_SCALE, "tooltip": (
                "Stochastic strength of reverse-time SDE.\nWhen eta=0, it reduces to deterministic ODE. This setting "
                "doesn't apply to ER-SDE solver type.")}),
            "s_noise": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
        }}

    def get_sampler(self, solver_type, max_stage, eta, s_noise):
        _choice("SamplerER_SDE", "solver_type", solver_type, ER_SDE_SOLVERS)
        eta, s_noise = float(eta), float(s_noise)
        if solver_type == "ODE" or (solver_type == "Reverse-time SDE" and eta == 0):
            eta, s_noise = 0.0, 0.0
        opts: dict[str, Any] = {"s_noise": s_noise, "max_stage": int(max_stage)}
        if solver_type != "ER-SDE":  # ER-SDE: sample_er_sde's default scaler
            opts["noise_scaler"] = partial(reverse_time_sde_noise_scaler, eta=eta)
        return (Sampler("er_sde", _options(**opts)),)


class SamplerSASolver(_SamplerNode):
    """sa_solver with its orders, PECE mode and stochastic interval: tau = eta between the MODEL's sigmas at
    sde_start_percent and sde_end_percent (its shift's percent_to_sigma), 0 (the ODE) elsewhere."""

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "model": ("MODEL",),
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "round": False}),
            "sde_start_percent": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.001}),
            "sde_end_percent": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.001}),
            "s_noise": ("FLOAT", {"default": 1.0, **_NOISE_SCALE}),
            "predictor_order": ("INT", {"default": 3, "min": 1, "max": 6}),
            "corrector_order": ("INT", {"default": 4, "min": 0, "max": 6}),
            "use_pece": ("BOOLEAN", {}),
            "simple_order_2": ("BOOLEAN", {}),
        }}

    def get_sampler(self, model, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order, corrector_order,
                    use_pece=False, simple_order_2=False):
        from sd35fp8.sampling import FlowMatching
        from sd35fp8.sampling.samplers import sa_tau_interval_func

        shift = getattr(model, "shift", None)
        if shift is None:
            raise InputError(f"SamplerSASolver: model must be a MODEL, got {type(model).__name__}")
        # below 1 the predictor stacks no prediction, below 0 the corrector none: ComfyUI fails inside the sampler
        for name, value, low in (("predictor_order", predictor_order, 1), ("corrector_order", corrector_order, 0)):
            if not low <= int(value) <= 6:
                raise InputError(f"SamplerSASolver: {name} {value} is outside {low}..6")
        ms = FlowMatching(shift)
        tau_func = sa_tau_interval_func(ms.percent_to_sigma(sde_start_percent), ms.percent_to_sigma(sde_end_percent),
                                        eta=float(eta))
        return (Sampler("sa_solver", _options(
            tau_func=tau_func, s_noise=float(s_noise), predictor_order=int(predictor_order),
            corrector_order=int(corrector_order), use_pece=bool(use_pece), simple_order_2=bool(simple_order_2))),)


SEEDS2_SOLVERS = ["phi_1", "phi_2"]


class SamplerSEEDS2(_SamplerNode):
    DESCRIPTION = ("This sampler node can represent multiple samplers:\n\n"
                   "seeds_2\n"
                   "- default setting\n\n"
                   "exp_heun_2_x0\n"
                   "- solver_type=phi_2, r=1.0, eta=0.0\n\n"
                   "exp_heun_2_x0_sde\n"
                   "- solver_type=phi_2, r=1.0, eta=1.0, s_noise=1.0")

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {
            "solver_type": (SEEDS2_SOLVERS,),
            "eta": ("FLOAT", {"default": 1.0, **_NOISE_SCALE, "tooltip": "Stochastic strength"}),
            "s_noise": ("FLOAT", {"default": 1.0, **_NOISE_SCALE, "tooltip": "SDE noise multiplier"}),
            "r": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01, "round": False,
                            "tooltip": "Relative step size for the intermediate stage (c2 node)"}),
        }}

    def get_sampler(self, solver_type, eta, s_noise, r):
        _choice("SamplerSEEDS2", "solver_type", solver_type, SEEDS2_SOLVERS)
        return (Sampler("seeds_2", _options(eta=float(eta), s_noise=float(s_noise), r=float(r),
                                             solver_type=solver_type)),)


EULER_CFG_PP_VERSIONS = ["regular", "alternative"]


class SamplerEulerCFGpp(_SamplerNode):
    """euler_cfg_pp ("regular"), or "alternative": ComfyUI's sample_euler_pp, a sampler of that node's own, not a
    KSampler name (samplers.NODE_SAMPLERS "euler_pp")."""

    CATEGORY = "_for_testing"
    DISPLAY_NAME = "SamplerEulerCFG++"
    PYTHON_MODULE = "comfy_extras.nodes_advanced_samplers"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"version": (EULER_CFG_PP_VERSIONS,)}}

    def get_sampler(self, version):
        _choice("SamplerEulerCFGpp", "version", version, EULER_CFG_PP_VERSIONS)
        return (Sampler("euler_pp" if version == "alternative" else "euler_cfg_pp"),)


class SamplerLCMUpscale(_SamplerNode):
    """lcm_upscale (samplers.sample_lcm_upscale): lcm resizing the latent after each of its first scale_steps steps
    (-1: half the schedule) up to scale_ratio times its size."""

    PYTHON_MODULE = "comfy_extras.nodes_advanced_samplers"

    @classmethod
    def INPUT_TYPES(cls, folders):
        from sd35fp8.sampling.samplers import LCM_UPSCALE_METHODS

        return {"required": {
            "scale_ratio": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 20.0, "step": 0.01}),
            "scale_steps": ("INT", {"default": -1, "min": -1, "max": 1000, "step": 1}),
            "upscale_method": (list(LCM_UPSCALE_METHODS),),
        }}

    def get_sampler(self, scale_ratio, scale_steps, upscale_method):
        from sd35fp8.workflow.nodes_image import check_widgets

        check_widgets(SamplerLCMUpscale, scale_ratio=scale_ratio, scale_steps=scale_steps,
                      upscale_method=upscale_method)
        steps = int(scale_steps)
        return (Sampler("lcm_upscale", _options(total_upscale=float(scale_ratio),
                                                 upscale_steps=None if steps < 0 else steps,
                                                 upscale_method=upscale_method)),)


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
        if len(sigmas) == 0:
            raise InputError("SetFirstSigma: the schedule is empty (nothing to set)")
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


class DualCFGGuider(Node):
    """Two conditionings against one negative (ComfyUI's Guider_DualCFG; sampling.guidance.DualCFGDenoiser)."""

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    CATEGORY = "sampling/custom_sampling/guiders"
    DISPLAY_NAME = "Dual CFG Guider"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"

    @classmethod
    def INPUT_TYPES(cls, folders):
        cfg = ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})
        return {"required": {"model": ("MODEL",), "cond1": ("CONDITIONING",), "cond2": ("CONDITIONING",),
                             "negative": ("CONDITIONING",), "cfg_conds": cfg, "cfg_cond2_negative": cfg,
                             "style": (["regular", "nested"],)}}

    def get_guider(self, model, cond1, cond2, negative, cfg_conds, cfg_cond2_negative, style="regular"):
        return (Guider(model, cond1, negative, float(cfg_conds), middle=cond2, cfg2=float(cfg_cond2_negative),
                       nested=style == "nested"),)


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
                          latent_image, sampler_seed=int(noise_seed))


class AddNoise(Node):
    """The noise of `sigmas`' span added to a latent (ComfyUI's experimental AddNoise): noise scaling at
    |sigmas[0] - sigmas[-1]| (sigmas[0] alone for one sigma), back in VAE space."""

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "add_noise"
    CATEGORY = "_for_testing/custom_sampling/noise"
    PYTHON_MODULE = "comfy_extras.nodes_custom_sampler"
    EXPERIMENTAL = True

    @classmethod
    def INPUT_TYPES(cls, folders):
        return {"required": {"model": ("MODEL",), "noise": ("NOISE",), "sigmas": ("SIGMAS",),
                             "latent_image": ("LATENT",)}}

    def add_noise(self, model, noise, sigmas, latent_image):
        from sd35fp8.models.vae import to_model_space, to_vae_space
        from sd35fp8.sampling import FlowMatching

        if len(sigmas) == 0:
            return (latent_image,)
        samples = latent_image["samples"]
        noisy = noise.generate(samples, latent_image.get("batch_index"))
        scale = torch.abs(sigmas[0] - sigmas[-1]) if len(sigmas) > 1 else sigmas[0]
        if torch.count_nonzero(samples) > 0:  # ComfyUI: the empty latent is not shifted
            samples = to_model_space(samples.float())
        noisy = to_vae_space(FlowMatching(model.shift).noise_scaling(scale, noisy, samples))
        return ({**latent_image, "samples": torch.nan_to_num(noisy, nan=0.0, posinf=0.0, neginf=0.0)},)


SAMPLING_NODES: dict[str, type[Node]] = {cls.__name__: cls for cls in (
    KSamplerSelect, BasicScheduler, RandomNoise, DisableNoise, SetFirstSigma, SplitSigmas, BasicGuider, CFGGuider,
    SamplerCustomAdvanced, SamplerCustom, SamplerEulerAncestral, SamplerDPMPP_2S_Ancestral, SamplerLMS,
    SamplerDPMAdaptative, SamplerDPMPP_SDE,
    SamplerDPMPP_2M_SDE, SamplerDPMPP_3M_SDE, AddNoise, DualCFGGuider, SamplerEulerAncestralCFGPP, SamplerER_SDE,
    SamplerSASolver, SamplerSEEDS2, SamplerEulerCFGpp, SamplerLCMUpscale,
)}
