"""ComfyUI's SamplerEulerAncestralCFGPP, SamplerER_SDE, SamplerSASolver, SamplerSEEDS2 (comfy_extras/
nodes_custom_sampler.py), SamplerEulerCFGpp and SamplerLCMUpscale (nodes_advanced_samplers.py; their samplers in
tests/test_nodes_samplers_advanced.py), ImageColorToMask, MaskPreview
(nodes_mask.py), ImageAddNoise (nodes_images.py) and PreviewAny (nodes_preview_any.py).

The interface of each node is checked against ComfyUI's, written out below as its legacy INPUT_TYPES (the V3
schemas' inputs as ComfyUI's object_info lists them; categories of the comfyanonymous/ComfyUI release this codebase
follows, sampling/custom_sampling/...). The sampler nodes' options are run through our samplers on the toy
denoiser and compared with transcriptions of ComfyUI's node bodies calling transcriptions of ComfyUI's sampler
functions (comfy/k_diffusion/sampling.py, sa_solver.py: tests/test_samplers_rest.py, test_samplers_cfg_pp.py);
the node's defaults through the generation core give the KSampler name's result bit for bit. The image and mask
nodes are compared bit for bit with transcriptions of ComfyUI's bodies on toy tensors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sd35fp8 import generation
from sd35fp8.errors import InputError
from sd35fp8.sampling import Conditioning, get_sigmas, sample
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow.executor import PromptExecutor
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, NodeContext, node_info, object_info
from sd35fp8.workflow.nodes_sampling import Sampler

from comfy_models import tiny_base_prompt, tiny_checkpoint_folder
from comfy_ksampling import Toy, c_sample_er_sde, sample_named, start, tiny_mmdit
from test_samplers_cfg_pp import _ours as cfg_pp_ours, _ref as cfg_pp_ref
from test_samplers_rest import CFlow, c_get_tau_interval_func, c_sample_sa_solver, c_sample_seeds_2

SEED_MAX = 0xFFFFFFFFFFFFFFFF
NOISE = {"min": 0.0, "max": 100.0, "step": 0.01, "round": False}


# ------------------------------------------------------------------ ComfyUI's interfaces
COMFY = {
    "SamplerEulerAncestralCFGPP": dict(
        input={"required": {
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "round": False}),
            "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "round": False})}},
        output=("SAMPLER",), category="sampling/custom_sampling/samplers", display="SamplerEulerAncestralCFG++",
        module="comfy_extras.nodes_custom_sampler"),
    "SamplerER_SDE": dict(
        input={"required": {
            "solver_type": (["ER-SDE", "Reverse-time SDE", "ODE"],),
            "max_stage": ("INT", {"default": 3, "min": 1, "max": 3}),
            "eta": ("FLOAT", {"default": 1.0, **NOISE, "tooltip": (
                "Stochastic strength of reverse-time SDE.\nWhen eta=0, it reduces to deterministic ODE. This "
                "setting doesn't apply to ER-SDE solver type.")}),
            "s_noise": ("FLOAT", {"default": 1.0, **NOISE})}},
        output=("SAMPLER",), category="sampling/custom_sampling/samplers", module="comfy_extras.nodes_custom_sampler"),
    "SamplerSASolver": dict(
        input={"required": {
            "model": ("MODEL",),
            "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "round": False}),
            "sde_start_percent": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.001}),
            "sde_end_percent": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.001}),
            "s_noise": ("FLOAT", {"default": 1.0, **NOISE}),
            "predictor_order": ("INT", {"default": 3, "min": 1, "max": 6}),
            "corrector_order": ("INT", {"default": 4, "min": 0, "max": 6}),
            "use_pece": ("BOOLEAN", {}),
            "simple_order_2": ("BOOLEAN", {})}},
        output=("SAMPLER",), category="sampling/custom_sampling/samplers", module="comfy_extras.nodes_custom_sampler"),
    "SamplerSEEDS2": dict(
        input={"required": {
            "solver_type": (["phi_1", "phi_2"],),
            "eta": ("FLOAT", {"default": 1.0, **NOISE, "tooltip": "Stochastic strength"}),
            "s_noise": ("FLOAT", {"default": 1.0, **NOISE, "tooltip": "SDE noise multiplier"}),
            "r": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01, "round": False,
                            "tooltip": "Relative step size for the intermediate stage (c2 node)"})}},
        output=("SAMPLER",), category="sampling/custom_sampling/samplers", module="comfy_extras.nodes_custom_sampler",
        description=("This sampler node can represent multiple samplers:\n\nseeds_2\n- default setting\n\n"
                     "exp_heun_2_x0\n- solver_type=phi_2, r=1.0, eta=0.0\n\nexp_heun_2_x0_sde\n"
                     "- solver_type=phi_2, r=1.0, eta=1.0, s_noise=1.0")),
    "SamplerEulerCFGpp": dict(
        input={"required": {"version": (["regular", "alternative"],)}},
        output=("SAMPLER",), category="_for_testing", display="SamplerEulerCFG++",
        module="comfy_extras.nodes_advanced_samplers", experimental=True),
    "SamplerLCMUpscale": dict(
        input={"required": {
            "scale_ratio": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 20.0, "step": 0.01}),
            "scale_steps": ("INT", {"default": -1, "min": -1, "max": 1000, "step": 1}),
            "upscale_method": (["bislerp", "nearest-exact", "bilinear", "area", "bicubic"],)}},
        output=("SAMPLER",), category="sampling/custom_sampling/samplers",
        module="comfy_extras.nodes_advanced_samplers"),
    "ImageColorToMask": dict(
        input={"required": {
            "image": ("IMAGE",),
            "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "number"})}},
        output=("MASK",), category="mask", module="comfy_extras.nodes_mask"),
    "MaskPreview": dict(
        input={"required": {"mask": ("MASK",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}},
        output=(), category="mask", display="Preview Mask", module="comfy_extras.nodes_mask", output_node=True,
        description="Saves the input images to your ComfyUI output directory."),
    "ImageAddNoise": dict(
        input={"required": {
            "image": ("IMAGE",),
            "seed": ("INT", {"default": 0, "min": 0, "max": SEED_MAX, "control_after_generate": True,
                             "tooltip": "The random seed used for creating the noise."}),
            "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01})}},
        output=("IMAGE",), category="image", module="comfy_extras.nodes_images"),
    "PreviewAny": dict(
        input={"required": {"source": ("*", {})}},
        output=("STRING",), category="utils", display="Preview as Text", module="comfy_extras.nodes_preview_any",
        output_node=True),
}


@pytest.mark.parametrize("name", sorted(COMFY))
def test_interface_matches_comfyui(name):
    spec, cls = COMFY[name], NODE_CLASS_MAPPINGS[name]
    inputs = cls.INPUT_TYPES(None)
    assert inputs == spec["input"]
    for section in inputs:  # the order the UI lays the widgets out in
        assert list(inputs[section]) == list(spec["input"][section])
    assert cls.RETURN_TYPES == spec["output"]
    assert cls.CATEGORY == spec["category"]
    assert bool(cls.OUTPUT_NODE) == spec.get("output_node", False)
    assert cls.PYTHON_MODULE == spec["module"]
    assert bool(cls.EXPERIMENTAL) == spec.get("experimental", False)
    assert cls.RETURN_NAMES is None and cls.OUTPUT_IS_LIST is None
    info = node_info(name, cls)
    assert info["display_name"] == spec.get("display", name)
    assert info["description"] == spec.get("description", "")
    assert callable(getattr(cls(None), cls.FUNCTION))


def test_object_info_lists_the_new_nodes():
    info = object_info()
    json.dumps(info)  # JSON-ready
    for name in COMFY:
        assert info[name]["output_node"] == COMFY[name].get("output_node", False)
    assert info["PreviewAny"]["input"]["required"]["source"] == ["*", {}]
    assert info["SamplerEulerCFGpp"]["experimental"] is True


def node(name: str, ctx: NodeContext | None = None):
    cls = NODE_CLASS_MAPPINGS[name]
    return getattr(cls(ctx), cls.FUNCTION)


class _Model:  # what SamplerSASolver reads of a MODEL
    def __init__(self, shift=3.0):
        self.shift = shift


# ------------------------------------------------------------------ ComfyUI transcriptions (node bodies, er_sde)
def c_sampler_er_sde_options(solver_type, max_stage, eta, s_noise):
    """ComfyUI SamplerER_SDE.execute: the options it gives comfy.samplers.ksampler("er_sde", ...)."""
    if solver_type == "ODE" or (solver_type == "Reverse-time SDE" and eta == 0):
        eta = 0
        s_noise = 0

    def reverse_time_sde_noise_scaler(x):
        return x ** (eta + 1)

    if solver_type == "ER-SDE":
        noise_scaler = None
    else:
        noise_scaler = reverse_time_sde_noise_scaler
    return {"s_noise": s_noise, "noise_scaler": noise_scaler, "max_stage": max_stage}


def c_sampler_sa_solver_options(model_sampling, eta, sde_start_percent, sde_end_percent, s_noise, predictor_order,
                                corrector_order, use_pece, simple_order_2):
    """ComfyUI SamplerSASolver.execute's options for "sa_solver"."""
    start_sigma = model_sampling.percent_to_sigma(sde_start_percent)
    end_sigma = model_sampling.percent_to_sigma(sde_end_percent)
    tau_func = c_get_tau_interval_func(start_sigma, end_sigma, eta=eta)
    return {"tau_func": tau_func, "s_noise": s_noise, "predictor_order": predictor_order,
            "corrector_order": corrector_order, "use_pece": use_pece, "simple_order_2": simple_order_2}


# ------------------------------------------------------------------ the sampler nodes' options on the toy denoiser
SIGMA_SETS = [get_sigmas("simple", 9, 3.0), get_sigmas("karras", 7, 3.0), get_sigmas("normal", 6, 3.0, 0.6)]


def _ours(sampler: Sampler, sigmas, seed=5):
    x = start(sigmas, seed)
    return sample(sampler.name, Toy(), x.clone(), sigmas, extra_args={"seed": seed}, disable=True,
                  **dict(sampler.options))


@pytest.mark.parametrize("solver_type", ["ER-SDE", "Reverse-time SDE", "ODE"])
def test_er_sde_node_matches_comfyui(solver_type):
    for sigmas in SIGMA_SETS:
        for max_stage, eta, s_noise in ((3, 1.0, 1.0), (2, 0.5, 0.7), (1, 0.0, 1.0), (3, 2.5, 0.0)):
            (s,) = node("SamplerER_SDE")(solver_type, max_stage, eta, s_noise)
            assert s.name == "er_sde"
            x, m = start(sigmas, 5), Toy()
            ref = c_sample_er_sde(m, x.clone(), sigmas.clone(), {"seed": 5}, ms=m.model_sampling,
                                  **c_sampler_er_sde_options(solver_type, max_stage, eta, s_noise))
            torch.testing.assert_close(_ours(s, sigmas), ref, rtol=1e-5, atol=2e-6,
                                       msg=f"{solver_type} {max_stage} {eta} {s_noise}")


def test_er_sde_solver_types_differ_and_ode_draws_no_noise():
    sigmas = SIGMA_SETS[0]
    runs = {t: _ours(node("SamplerER_SDE")(t, 3, 0.5, 1.0)[0], sigmas) for t in ("ER-SDE", "Reverse-time SDE", "ODE")}
    assert not torch.equal(runs["ER-SDE"], runs["Reverse-time SDE"])
    assert not torch.equal(runs["Reverse-time SDE"], runs["ODE"])
    ode = node("SamplerER_SDE")("ODE", 3, 0.5, 1.0)[0]
    assert dict(ode.options)["s_noise"] == 0.0  # the seed does not matter
    assert torch.equal(_ours(ode, sigmas, seed=5), sample("er_sde", Toy(), start(sigmas, 5), sigmas,
                                                           extra_args={"seed": 99}, disable=True, **dict(ode.options)))
    # Reverse-time SDE at eta 0 is the ODE (ComfyUI zeroes s_noise too)
    assert torch.equal(_ours(node("SamplerER_SDE")("Reverse-time SDE", 3, 0.0, 1.0)[0], sigmas), _ours(ode, sigmas))


@pytest.mark.parametrize("shift", [3.0, 1.5])
def test_sa_solver_node_matches_comfyui(shift):
    cases = [
        (1.0, 0.2, 0.8, 1.0, 3, 4, False, False),  # the defaults
        (0.6, 0.0, 1.0, 0.5, 2, 2, False, True),
        (1.5, 0.1, 0.5, 1.0, 4, 3, True, False),
        (1.0, 0.2, 0.8, 1.0, 2, 2, True, True),
        (0.0, 0.2, 0.8, 1.0, 1, 0, False, False),  # eta 0: the ODE
        (1.0, 0.9, 0.1, 1.0, 3, 4, False, False),  # start after end: never stochastic
    ]
    for sigmas in (get_sigmas("simple", 9, shift), get_sigmas("karras", 7, shift)):
        for case in cases:
            (s,) = node("SamplerSASolver")(_Model(shift), *case)
            assert s.name == "sa_solver"
            x, m = start(sigmas, 5), Toy(shift)
            opts = c_sampler_sa_solver_options(CFlow(shift), *case)
            ref = c_sample_sa_solver(m, x.clone(), sigmas.clone(), {"seed": 5}, ms=m.model_sampling, **opts)
            ours = sample(s.name, Toy(shift), x.clone(), sigmas, extra_args={"seed": 5}, disable=True,
                          **dict(s.options))
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6, msg=f"{shift} {case}")


def test_sa_solver_node_reads_the_model_shift():
    """The stochastic interval is the MODEL's: another shift puts other sigmas inside it."""
    tau3 = dict(node("SamplerSASolver")(_Model(3.0), 1.0, 0.2, 0.8, 1.0, 3, 4, False, False)[0].options)["tau_func"]
    tau1 = dict(node("SamplerSASolver")(_Model(1.0), 1.0, 0.2, 0.8, 1.0, 3, 4, False, False)[0].options)["tau_func"]
    assert tau3(torch.tensor(0.9)) == 1.0 and tau1(torch.tensor(0.9)) == 0.0  # 0.8 at shift 1, 0.923 at shift 3
    with pytest.raises(InputError, match="predictor_order"):
        node("SamplerSASolver")(_Model(), 1.0, 0.2, 0.8, 1.0, 0, 4, False, False)
    with pytest.raises(InputError, match="corrector_order"):
        node("SamplerSASolver")(_Model(), 1.0, 0.2, 0.8, 1.0, 3, 7, False, False)
    with pytest.raises(InputError, match="MODEL"):
        node("SamplerSASolver")("not a model", 1.0, 0.2, 0.8, 1.0, 3, 4, False, False)


def test_seeds2_node_matches_comfyui():
    cases = [("phi_1", 1.0, 1.0, 0.5), ("phi_2", 0.5, 0.7, 0.4), ("phi_2", 0.0, 1.0, 1.0), ("phi_2", 1.0, 1.0, 1.0),
             ("phi_1", 2.0, 0.0, 0.01)]
    for sigmas in SIGMA_SETS:
        for solver_type, eta, s_noise, r in cases:
            (s,) = node("SamplerSEEDS2")(solver_type, eta, s_noise, r)
            assert s.name == "seeds_2"
            x, m = start(sigmas, 5), Toy()
            ref = c_sample_seeds_2(m, x.clone(), sigmas.clone(), {"seed": 5}, ms=m.model_sampling, eta=eta,
                                   s_noise=s_noise, r=r, solver_type=solver_type)
            torch.testing.assert_close(_ours(s, sigmas), ref, rtol=1e-5, atol=2e-6, msg=f"{solver_type} {eta} {r}")


def test_euler_ancestral_cfg_pp_node_matches_comfyui():
    sigmas = get_sigmas("simple", 8, 3.0)
    x = start(sigmas, 5)
    for eta, s_noise in ((1.0, 1.0), (0.5, 0.7), (0.0, 1.0), (1.0, 0.0), (0.3, 4.0)):
        (s,) = node("SamplerEulerAncestralCFGPP")(eta, s_noise)
        assert s.name == "euler_ancestral_cfg_pp"
        ours, _ = cfg_pp_ours(s.name, x, sigmas, 4.5, seed=5, **dict(s.options))
        ref, _ = cfg_pp_ref(s.name, x, sigmas, 4.5, seed=5, eta=eta, s_noise=s_noise)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6, msg=f"{eta} {s_noise}")


def test_euler_cfg_pp_node():
    (s,) = node("SamplerEulerCFGpp")("regular")
    assert s == Sampler("euler_cfg_pp")
    assert node("SamplerEulerCFGpp")("alternative") == (Sampler("euler_pp"),)  # tests/test_nodes_samplers_advanced.py


@pytest.mark.parametrize("name, args, option", [
    ("SamplerER_SDE", ("SDE", 3, 1.0, 1.0), "solver_type"),
    ("SamplerSEEDS2", ("phi_3", 1.0, 1.0, 0.5), "solver_type"),
    ("SamplerEulerCFGpp", ("fast",), "version"),
    ("SamplerLCMUpscale", (1.0, -1, "lanczos"), "upscale_method"),
])
def test_unknown_choices_name_the_option(name, args, option):
    with pytest.raises(InputError, match=f"{name}: {option}"):
        node(name)(*args)


# ------------------------------------------------------------------ the generation core: defaults = KSampler names
def _core(mmdit, sampler: Sampler, cfg=3.0, seed=3):
    """sample_named's run with the node's sampler options (comfy_ksampling.sample_named)."""
    g = torch.Generator().manual_seed(1)
    ctx, pooled = torch.randn(1, 5, 32, generator=g), torch.randn(1, 48, generator=g)
    cond, uncond = Conditioning(ctx, pooled), Conditioning(ctx.flip(1), pooled.flip(1))
    settings = generation.SampleSettings(steps=4, cfg=cfg, sampler=sampler.name, scheduler="simple",
                                         sampler_options=sampler.options)
    with torch.no_grad():
        return generation.sample(mmdit, cond, uncond, torch.zeros(1, 16, 8, 8), settings, seed=seed)


@pytest.fixture(scope="module")
def mmdit():
    return tiny_mmdit()


DEFAULTS = {
    "SamplerEulerAncestralCFGPP": ((1.0, 1.0), (0.5, 0.5)),
    "SamplerER_SDE": (("ER-SDE", 3, 1.0, 1.0), ("Reverse-time SDE", 3, 0.5, 1.0)),
    "SamplerSASolver": ((_Model(), 1.0, 0.2, 0.8, 1.0, 3, 4, False, False),
                        (_Model(), 1.0, 0.0, 1.0, 1.0, 2, 2, True, False)),
    "SamplerSEEDS2": (("phi_1", 1.0, 1.0, 0.5), ("phi_2", 1.0, 1.0, 1.0)),
    "SamplerEulerCFGpp": (("regular",), None),
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_generation_core_defaults_equal_ksampler_name(mmdit, name):
    """At its defaults a node's SAMPLER samples as its KSampler name bit for bit; other options change the result
    (they reach the sampler through SampleSettings.sampler_options)."""
    default, other = DEFAULTS[name]
    (s,) = node(name)(*default)
    plain = sample_named(mmdit, s.name)
    assert torch.equal(_core(mmdit, s), plain)
    if other is not None:
        assert not torch.equal(_core(mmdit, node(name)(*other)[0]), plain)


# ------------------------------------------------------------------ through the workflow executor (shipped model)
@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    if not SHIPPED_CHECKPOINT.exists():
        pytest.skip("shipped model weights not built")
    root = tiny_checkpoint_folder(tmp_path_factory.mktemp("samplers_extra"))
    return PromptExecutor(ModelFolders(root), device="cpu", dtype=torch.float32), root


_base = tiny_base_prompt


def _ksampler(sampler: str) -> dict:
    return {"5": {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "seed": 5, "steps": 4, "cfg": 4.0, "sampler_name": sampler, "scheduler": "normal",
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}}


def _custom(sampler_node: dict) -> dict:
    return {
        "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "21": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 4.0}},
        "22": sampler_node,
        "23": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["20", 0], "guider": ["21", 0],
                                                                "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                "latent_image": ["4", 0]}},
    }


def _pixels(ex, root, prompt) -> np.ndarray:
    """The decoded output of node "5" as PreviewImage saves it (uint8 [H, W, 3])."""
    prompt = {**_base(), **prompt, "90": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
              "91": {"class_type": "PreviewImage", "inputs": {"images": ["90", 0]}}}
    result = ex.execute(prompt, prompt_id="s", extra_data={}, execute_outputs=["91"])
    assert result.success, result.error
    (img,) = result.outputs["91"]["images"]
    return np.asarray(Image.open(root / "temp" / img["subfolder"] / img["filename"]).convert("RGB"))


WORKFLOW_CASES = [  # (KSampler name, the node at its defaults, inputs that change the result)
    ("euler_ancestral_cfg_pp", {"class_type": "SamplerEulerAncestralCFGPP", "inputs": {"eta": 1.0, "s_noise": 1.0}},
     {"eta": 0.0}),
    ("er_sde", {"class_type": "SamplerER_SDE", "inputs": {"solver_type": "ER-SDE", "max_stage": 3, "eta": 1.0,
                                                          "s_noise": 1.0}},
     {"solver_type": "ODE"}),
    ("sa_solver", {"class_type": "SamplerSASolver", "inputs": {
        "model": ["1", 0], "eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8, "s_noise": 1.0,
        "predictor_order": 3, "corrector_order": 4, "use_pece": False, "simple_order_2": False}},
     {"sde_start_percent": 0.0, "sde_end_percent": 0.0}),
    ("seeds_2", {"class_type": "SamplerSEEDS2", "inputs": {"solver_type": "phi_1", "eta": 1.0, "s_noise": 1.0,
                                                           "r": 0.5}},
     {"solver_type": "phi_2", "r": 1.0}),
    ("euler_cfg_pp", {"class_type": "SamplerEulerCFGpp", "inputs": {"version": "regular"}}, None),
]


@pytest.mark.parametrize("sampler, sampler_node, other", WORKFLOW_CASES, ids=[c[0] for c in WORKFLOW_CASES])
def test_workflow_sampler_nodes_equal_ksampler(executor, sampler, sampler_node, other):
    """SamplerCustomAdvanced with the node at its defaults = KSampler with its name; other options reach it."""
    ex, root = executor
    custom = _pixels(ex, root, _custom(sampler_node))
    assert np.array_equal(custom, _pixels(ex, root, _ksampler(sampler)))
    if other is not None:
        changed = {**sampler_node, "inputs": {**sampler_node["inputs"], **other}}
        assert not np.array_equal(_pixels(ex, root, _custom(changed)), custom)


def test_workflow_bad_option_is_an_input_error(executor):
    """A linked value skips prompt validation: the node names the option itself."""
    ex, _ = executor
    bad = {"class_type": "SamplerEulerCFGpp", "inputs": {"version": ["30", 0]}}
    prompt = {**_base(), **_custom(bad), "30": {"class_type": "PrimitiveString", "inputs": {"value": "fast"}},
              "90": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}
    result = ex.execute(prompt, prompt_id="b", extra_data={}, execute_outputs=["90"])
    assert not result.success and result.error["node_type"] == "SamplerEulerCFGpp", result.error
    assert "version 'fast'" in json.dumps(result.error)


# ------------------------------------------------------------------ image and mask nodes against ComfyUI's bodies
def c_image_color_to_mask(image, color):
    temp = (torch.clamp(image, 0, 1.0) * 255.0).round().to(torch.int)
    temp = torch.bitwise_left_shift(temp[:,:,:,0], 16) + torch.bitwise_left_shift(temp[:,:,:,1], 8) + temp[:,:,:,2]
    return torch.where(temp == color, 1.0, 0).float()


def c_image_add_noise(image, seed, strength):
    generator = torch.manual_seed(seed)
    return torch.clip((image + strength * torch.randn(image.size(), generator=generator, device="cpu").to(image)),
                      min=0.0, max=1.0)


def _toy_image(seed=0, shape=(2, 5, 7, 3)):
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 4, shape, generator=g) * 85 / 255.0  # few colours, repeated
    return (levels + torch.randn(shape, generator=g) * 0.001 * (torch.rand(shape, generator=g) < 0.2)).clamp(-0.1, 1.1)


def test_image_color_to_mask_matches_comfyui():
    image = _toy_image()
    rgb = (image.clamp(0, 1) * 255).round().int()
    colors = {0, 0xFFFFFF, int((rgb[0, 0, 0, 0] << 16) + (rgb[0, 0, 0, 1] << 8) + rgb[0, 0, 0, 2]), 0x55AAFF}
    for color in colors:
        (got,) = node("ImageColorToMask")(image, color)
        ref = c_image_color_to_mask(image, color)
        assert got.dtype == ref.dtype == torch.float32 and got.shape == (2, 5, 7)
        assert torch.equal(got, ref)
    assert node("ImageColorToMask")(image, colors.pop())[0].sum() >= 0
    rgba = torch.cat([image, torch.rand(2, 5, 7, 1)], dim=-1)  # alpha is ignored
    assert torch.equal(node("ImageColorToMask")(rgba, 0x55AAFF)[0], c_image_color_to_mask(rgba, 0x55AAFF))
    with pytest.raises(InputError, match="ImageColorToMask"):
        node("ImageColorToMask")(torch.rand(1, 4, 4, 1), 0)


def test_image_add_noise_matches_comfyui_rng():
    image = torch.rand(2, 6, 5, 3, generator=torch.Generator().manual_seed(3))
    for seed, strength in ((0, 0.5), (123456789, 1.0), (SEED_MAX, 0.25), (7, 0.0)):
        with torch.random.fork_rng(devices=[]):
            ref = c_image_add_noise(image, seed, strength)
        before = torch.random.get_rng_state()
        (got,) = node("ImageAddNoise")(image, seed, strength)
        assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left alone
        assert got.dtype == image.dtype and torch.equal(got, ref), seed
    a = node("ImageAddNoise")(image, 11, 0.5)[0]
    assert torch.equal(a, node("ImageAddNoise")(image, 11, 0.5)[0])  # seeded: the same every run
    assert not torch.equal(a, node("ImageAddNoise")(image, 12, 0.5)[0])
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    with pytest.raises(InputError, match="ImageAddNoise"):
        node("ImageAddNoise")(torch.rand(4, 4), 0, 0.5)


def test_mask_preview_saves_like_preview_image(tmp_path):
    mask = torch.rand(2, 9, 11, generator=torch.Generator().manual_seed(1)) * 1.2 - 0.1  # out of 0..1 too
    ctx = NodeContext(folders=ModelFolders(tmp_path))
    out = node("MaskPreview", ctx)(mask, prompt={"1": {"class_type": "SolidMask"}},
                                   extra_pnginfo={"workflow": {"a": 1}})
    assert set(out) == {"ui"} and list(out["ui"]["animated"]) == [False]
    images = out["ui"]["images"]
    assert len(images) == 2 and all(i["type"] == "temp" and i["subfolder"] == "" for i in images)
    assert images[0]["filename"].startswith("ComfyUI_temp_") and images[0]["filename"].endswith("_00001_.png")
    assert len(images[0]["filename"]) == len("ComfyUI_temp_abcde_00001_.png")
    preview = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1])).movedim(1, -1).expand(-1, -1, -1, 3)  # ComfyUI
    for b, info in enumerate(images):
        png = Image.open(ctx.folders.temp_dir / info["filename"])
        assert png.mode == "RGB" and png.size == (11, 9)
        assert np.array_equal(np.asarray(png), np.clip(255.0 * preview[b].numpy(), 0, 255).astype(np.uint8))
        assert json.loads(png.text["prompt"]) == {"1": {"class_type": "SolidMask"}}
        assert json.loads(png.text["workflow"]) == {"a": 1}
    two_d = node("MaskPreview", ctx)(torch.ones(4, 6))["ui"]["images"]  # a lone [H, W] mask
    assert len(two_d) == 1
    with pytest.raises(InputError, match="MaskPreview"):
        node("MaskPreview", ctx)("mask")


def test_mask_and_preview_nodes_in_a_workflow(tmp_path):
    folders = ModelFolders(tmp_path)
    ex = PromptExecutor(folders, device="cpu", dtype=torch.float32)
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 6, "batch_size": 1, "color": 0x55AAFF}},
        "2": {"class_type": "ImageColorToMask", "inputs": {"image": ["1", 0], "color": 0x55AAFF}},
        "3": {"class_type": "MaskPreview", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "ImageAddNoise", "inputs": {"image": ["1", 0], "seed": 3, "strength": 0.5}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
        "6": {"class_type": "PrimitiveInt", "inputs": {"value": 42}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}},
        "8": {"class_type": "StringConcatenate", "inputs": {"string_a": ["7", 0], "string_b": "!", "delimiter": ""}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": "typed in"}},  # ComfyUI takes a literal for "*"
    }
    result = ex.execute(prompt, prompt_id="m", extra_data={}, execute_outputs=["3", "5", "7", "9", "10"])
    assert result.success, result.error
    (saved,) = result.outputs["3"]["images"]
    png = np.asarray(Image.open(folders.temp_dir / saved["subfolder"] / saved["filename"]))
    assert png.shape == (6, 8, 3) and (png == 255).all()  # every pixel has the colour: mask 1 -> white
    assert list(result.outputs["3"]["animated"]) == [False]
    assert list(result.outputs["7"]["text"]) == ["42"]
    assert list(result.outputs["9"]["text"]) == ["42!"]  # PreviewAny's STRING output
    assert list(result.outputs["10"]["text"]) == ["typed in"]


def c_preview_any(source=None):
    """ComfyUI PreviewAny.main's text (the print options restored afterwards for the test's sake)."""
    torch.set_printoptions(edgeitems=6)
    value = 'None'
    if isinstance(source, str):
        value = source
    elif isinstance(source, (int, float, bool)):
        value = str(source)
    elif source is not None:
        try:
            value = json.dumps(source, indent=4)
        except Exception:
            try:
                value = str(source)
            except Exception:
                value = 'source exists, but could not be serialized.'
    torch.set_printoptions(edgeitems=3)
    return value


class _Unprintable:
    def __str__(self):
        raise RuntimeError("no")


def test_preview_any_text_matches_comfyui():
    values = ["text", "", 3, -2.5, True, None, [1, 2.5, "a"], {"a": [1, {"b": None}]}, float("nan"),
              torch.arange(40.0).reshape(2, 20), torch.linspace(0, 1, 2000), {"samples": torch.zeros(1, 2, 3)},
              (1, 2), _Unprintable()]
    for v in values:
        out = node("PreviewAny")(v)
        ref = c_preview_any(v)
        assert out == {"ui": {"text": (ref,)}, "result": (ref,)}, v
    assert torch._tensor_str.PRINT_OPTS.edgeitems == 3  # the node leaves torch's print options as it found them
    assert node("PreviewAny")()["result"] == ("None",)
    long = node("PreviewAny")(torch.arange(2000.0))["result"][0]
    assert "..." in long and long.count(",") == 12  # 6 items each side of the ellipsis (3 by default)
