"""ComfyUI's comfy_extras/nodes_advanced_samplers.py: SamplerEulerCFGpp's "alternative" version (sample_euler_pp) and
SamplerLCMUpscale (sample_lcm_upscale), with comfy.utils.bislerp, its default resampler.

Each sampler runs against its transcription in tests/comfy_ksampling.py: euler_pp through a real CFGDenoiser against
ComfyUI's guider written out in test_samplers_cfg_pp.py (its uncond prediction from a post-CFG function, at cfg 1
too); lcm_upscale on a toy x0-predictor of any size, the transcription drawing torch.randn_like from torch's global
generator after comfy/sample.py prepare_noise seeded it (torch.manual_seed) and drew the initial noise from it,
ours from a private generator put in that state (noise.global_generator): ComfyUI-on-CPU's numbers, bit for bit.
Then through the generation core on a tiny MMDiT, and through the workflow executor on the shipped model, where
the sampler is watched as it runs (its x, seed and batch_index as ComfyUI's SamplerCustomAdvanced would give them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sd35fp8 import generation
from sd35fp8.errors import InputError
from sd35fp8.image_ops import bislerp, common_upscale
from sd35fp8.models.vae import to_vae_space
from sd35fp8.sampling import CFGDenoiser, Conditioning, FlowMatching, get_sigmas, prepare_noise, sample
from sd35fp8.sampling import samplers as samplers_module
from sd35fp8.sampling.inpaint import MaskedDenoiser, prepare_mask
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from sd35fp8.workflow import engine
from sd35fp8.workflow.executor import PromptExecutor
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS
from sd35fp8.workflow.nodes_sampling import Sampler

from comfy_ksampling import (Toy, c_bislerp, c_common_upscale, c_prepare_noise, c_sample_euler_pp,
                             c_sample_lcm_upscale, c_sampler_lcm_upscale_options, tiny_mmdit)
from comfy_models import tiny_base_prompt, tiny_checkpoint_folder
from test_samplers_cfg_pp import COND, UNCOND, ComfyGuided, toy


def node(name: str):
    cls = NODE_CLASS_MAPPINGS[name]
    return getattr(cls(None), cls.FUNCTION)


# ------------------------------------------------------------------ bislerp
def _slerp_cases():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 5, 7, generator=g)
    z[0, :, 1, 2] = 0.0  # a zero vector: its direction is zeros
    z[1, :, 3, :] = z[1, :, 2, :]  # equal neighbours: parallel, kept as they are
    z[0, :, 4, 3] = -z[0, :, 4, 4]  # opposite neighbours: lerped
    return [z, torch.randn(1, 4, 8, 8, generator=g) * 3, torch.randn(1, 16, 1, 3, generator=g)]


@pytest.mark.parametrize("size", [(14, 10), (7, 5), (4, 3), (9, 13), (1, 1), (21, 2)])
def test_bislerp_matches_comfyui(size):
    width, height = size
    for z in _slerp_cases():
        for dtype in (torch.float32, torch.float16):
            got, want = bislerp(z.to(dtype), width, height), c_bislerp(z.to(dtype), width, height)
            assert got.dtype == dtype and got.shape == (z.shape[0], z.shape[1], height, width)
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("method", samplers_module.LCM_UPSCALE_METHODS)
def test_common_upscale_of_a_latent_matches_comfyui(method):
    z = _slerp_cases()[0]
    for width, height in ((14, 10), (5, 4), (7, 5)):
        torch.testing.assert_close(common_upscale(z, width, height, method, "disabled"),
                                   c_common_upscale(z, width, height, method, "disabled"), rtol=0, atol=0,
                                   equal_nan=True)


# ------------------------------------------------------------------ euler_pp (SamplerEulerCFGpp "alternative")
SCHEDULES = [("simple", 8, 1.0), ("normal", 6, 0.6), ("simple", 2, 1.0)]  # sigma 1 start; img2img; two steps


def _start(sigmas, seed=5, shape=(2, 4, 6, 6)):
    latent = torch.linspace(-1, 1, int(np.prod(shape))).reshape(shape) * 0.5
    return FlowMatching(3.0).noise_scaling(sigmas[0], prepare_noise(seed, shape), latent)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[0]}-{s[1]}-{s[2]}")
@pytest.mark.parametrize("cfg, negative", [(4.5, True), (1.0, True), (1.0, False)])
def test_euler_pp_matches_comfyui(schedule, cfg, negative):
    """Against sample_euler_pp fed by ComfyUI's guider: its uncond prediction from the post-CFG function it adds
    (disable_cfg1_optimization: the uncond pass runs at cfg 1 too; zeros without a negative)."""
    sigmas = get_sigmas(schedule[0], schedule[1], 3.0, schedule[2])
    uncond = UNCOND if negative else None
    x = _start(sigmas)
    den = CFGDenoiser(toy, COND, uncond, cfg=cfg, model_sampling=FlowMatching(3.0))
    seen, ref_seen = [], []
    ours = sample("euler_pp", den, x.clone(), sigmas, extra_args={"seed": 1}, disable=True,
                  callback=lambda d: seen.append((d["i"], d["denoised"].clone())))
    guided = ComfyGuided(COND, uncond, cfg)
    ref = c_sample_euler_pp(guided, x.clone(), sigmas.clone(), extra_args={"seed": 1},
                            callback=lambda d: ref_seen.append((d["i"], d["denoised"].clone())))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6)
    assert den.calls == guided.calls == len(sigmas) - 1
    assert [i for i, _ in seen] == [i for i, _ in ref_seen]
    for (_, a), (_, b) in zip(seen, ref_seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)
    # not euler_cfg_pp: another update rule
    assert not torch.allclose(ours, sample("euler_cfg_pp", CFGDenoiser(toy, COND, uncond, cfg=cfg,
                                                                       model_sampling=FlowMatching(3.0)),
                                           x.clone(), sigmas, extra_args={"seed": 1}, disable=True), atol=1e-3)


def test_euler_pp_needs_cfg_guidance():
    sigmas = get_sigmas("simple", 4, 3.0)
    with pytest.raises(InputError, match="euler_pp"):
        sample("euler_pp", Toy(), _start(sigmas), sigmas, disable=True)


# ------------------------------------------------------------------ lcm_upscale (SamplerLCMUpscale)
def _lcm_ref(sigmas, seed, shape, options, batch_index=None, initial_noise=True, callback=None):
    """ComfyUI on the CPU: prepare_noise seeds the global generator and draws the initial noise (DisableNoise:
    zeros, no seeding -- here the generator seeded alone, our stand-in); noise_scaling; sample_lcm_upscale."""
    latent = torch.linspace(-1, 1, int(np.prod(shape))).reshape(shape) * 0.5
    with torch.random.fork_rng(devices=[]):
        if initial_noise:
            noise = c_prepare_noise(latent, seed, batch_index)
        else:
            torch.manual_seed(seed)
            noise = torch.zeros(shape)
        x = sigmas[0] * noise + (1.0 - sigmas[0]) * latent  # CONST noise_scaling
        out = c_sample_lcm_upscale(Toy(), x, sigmas.clone(), extra_args={"seed": seed}, callback=callback,
                                   **options)
    return x, out


def _lcm_ours(x, sigmas, seed, sampler: Sampler, callback=None, **plumbing):
    return sample(sampler.name, Toy(), x.clone(), sigmas, extra_args={"seed": seed}, disable=True, callback=callback,
                  **dict(sampler.options), **plumbing)


LCM_SIGMAS = [get_sigmas("simple", 6, 3.0), get_sigmas("normal", 5, 3.0, 0.6),
              get_sigmas("simple", 8, 3.0)[:5]]  # the last: a high half (SplitSigmas), ending above 0
LCM_NODE_INPUTS = [(1.0, -1), (2.0, -1), (1.5, 2), (2.0, 0), (0.5, -1), (3.0, 100), (1.25, 1)]


@pytest.mark.parametrize("method", samplers_module.LCM_UPSCALE_METHODS)
def test_lcm_upscale_matches_comfyui(method):
    """The node's sampler for each method, ratio and step count against ComfyUI's node body and sampler, bit for
    bit, final latent and every step's denoised prediction as the callback kept it (ComfyUI adds the next noise in
    place to a prediction it did not resize: the kept one changes too)."""
    for sigmas in LCM_SIGMAS:
        for scale_ratio, scale_steps in LCM_NODE_INPUTS:
            (s,) = node("SamplerLCMUpscale")(scale_ratio, scale_steps, method)
            assert s.name == "lcm_upscale"
            kept, ref_kept = [], []
            x, ref = _lcm_ref(sigmas, 7, (2, 3, 6, 5), c_sampler_lcm_upscale_options(scale_ratio, scale_steps, method),
                              callback=lambda d: ref_kept.append(d["denoised"]))
            ours = _lcm_ours(x, sigmas, 7, s, callback=lambda d: kept.append(d["denoised"]))
            msg = f"{method} {scale_ratio} {scale_steps} {sigmas.tolist()}"
            torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True, msg=msg)
            assert len(kept) == len(ref_kept) == len(sigmas) - 1
            for a, b in zip(kept, ref_kept):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=msg)


def test_lcm_upscale_sizes_and_noise_source():
    sigmas = get_sigmas("simple", 6, 3.0)
    x = _lcm_ref(sigmas, 3, (1, 4, 8, 6), {})[0]
    sizes = []
    _lcm_ours(x, sigmas, 3, node("SamplerLCMUpscale")(2.0, -1, "nearest-exact")[0],
              callback=lambda d: sizes.append(tuple(d["x"].shape[-2:])))
    # 6 steps: upscales linspace(1, 2, 4)[1:] after steps 0-2 (rounded sizes of 8x6)
    assert sizes == [(8, 6), (11, 8), (13, 10), (16, 12), (16, 12), (16, 12)]
    # the batch_index and DisableNoise plumbing: the noise continues the generator as ComfyUI's global one
    (s,) = node("SamplerLCMUpscale")(1.5, 2, "bilinear")
    for batch_index in ([2], [0, 3, 3]):
        shape = (len(batch_index), 4, 6, 6)
        x, ref = _lcm_ref(sigmas, 11, shape, dict(s.options), batch_index=batch_index)
        got = _lcm_ours(x, sigmas, 11, s, noise_inds=tuple(batch_index))
        assert torch.equal(got, ref), batch_index
        assert not torch.equal(_lcm_ours(x, sigmas, 11, s), ref)  # without the indices: another draw to skip
    x, ref = _lcm_ref(sigmas, 11, (1, 4, 6, 6), dict(s.options), initial_noise=False)
    assert torch.equal(_lcm_ours(x, sigmas, 11, s, initial_noise=False), ref)
    # the global generator itself is left alone; another seed, other noise
    before = torch.random.get_rng_state()
    a = _lcm_ours(x, sigmas, 11, s)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, _lcm_ours(x, sigmas, 11, s)) and not torch.equal(a, _lcm_ours(x, sigmas, 12, s))


def test_lcm_upscale_errors():
    sigmas = get_sigmas("simple", 4, 3.0)
    x = _lcm_ref(sigmas, 3, (1, 4, 8, 8), {})[0]
    with pytest.raises(InputError, match="upscale_method"):
        node("SamplerLCMUpscale")(2.0, -1, "lanczos")
    with pytest.raises(InputError, match="scale_ratio"):
        node("SamplerLCMUpscale")(0.05, -1, "bislerp")
    with pytest.raises(InputError, match="scale_steps"):
        node("SamplerLCMUpscale")(2.0, -2, "bislerp")
    with pytest.raises(InputError, match="upscale_method"):
        sample("lcm_upscale", Toy(), x, sigmas, upscale_method="lanczos", disable=True)
    # a noise mask (inpainting) is for the latent's own size: ComfyUI fails too once the sampler resizes it
    latent = torch.zeros_like(x)
    mask = prepare_mask(torch.ones(1, 1, 8, 8), tuple(x.shape))
    masked = MaskedDenoiser(Toy(), mask, latent, torch.randn_like(x), FlowMatching(3.0))
    with pytest.raises(InputError, match="noise mask"):
        sample("lcm_upscale", masked, x.clone(), sigmas, disable=True, total_upscale=2.0)
    sample("lcm_upscale", masked, x.clone(), sigmas, disable=True, total_upscale=1.0)  # the size kept: fine


# ------------------------------------------------------------------ nodes and the generation core
def test_nodes_give_node_samplers_not_ksampler_names():
    assert node("SamplerEulerCFGpp")("alternative") == (Sampler("euler_pp"),)
    assert node("SamplerEulerCFGpp")("regular") == (Sampler("euler_cfg_pp"),)
    (s,) = node("SamplerLCMUpscale")(1.0, -1, "bislerp")
    assert dict(s.options) == c_sampler_lcm_upscale_options(1.0, -1, "bislerp")
    for inputs in ((2.5, 3, "area"), (0.1, 0, "nearest-exact"), (20.0, 1000, "bicubic")):
        assert dict(node("SamplerLCMUpscale")(*inputs)[0].options) == c_sampler_lcm_upscale_options(*inputs)
    # ComfyUI's KSampler names do not include them (KSAMPLER(function) samplers of a node)
    for name in ("euler_pp", "lcm_upscale"):
        assert name not in engine.sampler_names() and name in samplers_module.NODE_SAMPLERS
        with pytest.raises(InputError, match="unknown sampler"):
            samplers_module.get_sampler(name)


@pytest.fixture(scope="module")
def mmdit():
    return tiny_mmdit()


def _conds():
    g = torch.Generator().manual_seed(1)
    ctx, pooled = torch.randn(1, 5, 32, generator=g), torch.randn(1, 48, generator=g)
    return Conditioning(ctx, pooled), Conditioning(ctx.flip(1), pooled.flip(1))


def test_generation_core_runs_them(mmdit):
    """Through generation.sample (noise, noise scaling, CFG denoiser, back to VAE space) on a tiny MMDiT: lcm_upscale
    returns the larger latent, equal to the transcription run on the same denoiser; euler_pp to ComfyUI's guider
    written out."""
    cond, uncond = _conds()
    seed, latent = 3, torch.zeros(1, 16, 8, 8)
    (s,) = node("SamplerLCMUpscale")(2.0, -1, "bislerp")
    sigmas = get_sigmas("simple", 4, 3.0)
    settings = generation.SampleSettings(steps=4, cfg=3.0, sampler=s.name, scheduler="simple",
                                         sampler_options=s.options)
    with torch.no_grad():
        out = generation.sample(mmdit, cond, uncond, latent, settings, seed=seed)
        den = CFGDenoiser(mmdit, cond, uncond, cfg=3.0, model_sampling=FlowMatching(3.0))
        with torch.random.fork_rng(devices=[]):
            noise = c_prepare_noise(latent, seed)
            ref = c_sample_lcm_upscale(den, sigmas[0] * noise, sigmas.clone(), extra_args={"seed": seed},
                                       **c_sampler_lcm_upscale_options(2.0, -1, "bislerp"))
    assert out.shape == (1, 16, 16, 16)
    torch.testing.assert_close(out, to_vae_space(ref), rtol=0, atol=0)

    (alt,) = node("SamplerEulerCFGpp")("alternative")
    settings = generation.SampleSettings(steps=4, cfg=3.0, sampler=alt.name, scheduler="simple")
    with torch.no_grad():
        out = generation.sample(mmdit, cond, uncond, latent, settings, seed=seed)
        regular = generation.sample(mmdit, cond, uncond, latent,
                                    generation.SampleSettings(steps=4, cfg=3.0, sampler="euler_cfg_pp",
                                                              scheduler="simple"), seed=seed)
    assert out.shape == latent.shape and torch.isfinite(out).all() and not torch.allclose(out, regular, atol=1e-3)


# ------------------------------------------------------------------ through the workflow executor (shipped model)
@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    if not SHIPPED_CHECKPOINT.exists():
        pytest.skip("shipped model weights not built")
    root = tiny_checkpoint_folder(tmp_path_factory.mktemp("samplers_advanced"))
    return PromptExecutor(ModelFolders(root), device="cpu", dtype=torch.float32), root


def _workflow(sampler_node: dict, noise_node: dict, latent=("4", 0), extra=None) -> dict:
    return {
        **tiny_base_prompt(), **(extra or {}),
        "20": noise_node,
        "21": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 4.0}},
        "22": sampler_node,
        "23": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["20", 0], "guider": ["21", 0],
                                                                "sampler": ["22", 0], "sigmas": ["23", 0],
                                                                "latent_image": list(latent)}},
        "90": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "91": {"class_type": "PreviewImage", "inputs": {"images": ["90", 0]}},
        "92": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 1], "filename_prefix": "denoised"}},
    }


def _execute(ex, root, prompt):
    result = ex.execute(prompt, prompt_id="a", extra_data={}, execute_outputs=["91", "92"])
    assert result.success, result.error
    (img,) = result.outputs["91"]["images"]
    (saved,) = result.outputs["92"]["latents"]
    pixels = np.asarray(Image.open(root / "temp" / img["subfolder"] / img["filename"]).convert("RGB"))
    with safe_open(str(root / "output" / saved["subfolder"] / saved["filename"]), "pt") as f:
        return pixels, f.get_tensor("latent_tensor")


LCM_NODE = {"class_type": "SamplerLCMUpscale", "inputs": {"scale_ratio": 2.0, "scale_steps": -1,
                                                          "upscale_method": "bislerp"}}
RANDOM = {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}}


def test_workflow_lcm_upscale_samples_as_comfyui(executor, monkeypatch):
    """SamplerCustomAdvanced with SamplerLCMUpscale: the image comes out twice the size. The sampler is watched as
    it runs: its x is ComfyUI's (noise of the RandomNoise seed drawn by the LATENT's batch_index, scaled at the first
    sigma), and on that same denoiser it gives what sample_lcm_upscale gives after prepare_noise left the global
    generator seeded and advanced -- with a batch_index (LatentFromBatch) and with DisableNoise (our stand-in: the
    generator seeded with SamplerCustomAdvanced's seed 0, no draw)."""
    ex, root = executor
    watched = []

    def watch(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        ours = samplers_module.sample_lcm_upscale(model, x.clone(), sigmas, extra_args, callback, disable, **options)
        seed, inds = extra_args["seed"], watched_case["batch_index"]
        with torch.random.fork_rng(devices=[]):
            if watched_case["noise"]:
                noise = c_prepare_noise(torch.zeros(x.shape), seed, inds)
            else:
                torch.manual_seed(seed)
                noise = torch.zeros(x.shape)
            start = sigmas[0] * noise + (1.0 - sigmas[0]) * torch.zeros(x.shape)
            ref = c_sample_lcm_upscale(model, start.clone(), sigmas.clone(), extra_args={"seed": seed},
                                       **c_sampler_lcm_upscale_options(2.0, -1, "bislerp"))
        watched.append((seed, torch.equal(x, start), torch.equal(ours, ref)))
        return ours

    monkeypatch.setitem(samplers_module.NODE_SAMPLERS, "lcm_upscale", watch)
    batch = {"4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
             "40": {"class_type": "LatentFromBatch", "inputs": {"samples": ["4", 0], "batch_index": 2, "length": 1}}}
    cases = [(RANDOM, None, ("4", 0), {"noise": True, "batch_index": None}, 5),
             (RANDOM, batch, ("40", 0), {"noise": True, "batch_index": [2]}, 5),
             ({"class_type": "DisableNoise", "inputs": {}}, None, ("4", 0), {"noise": False, "batch_index": None}, 0)]
    images = []
    for noise_node, extra, latent, watched_case, seed in cases:
        pixels, denoised = _execute(ex, root, _workflow(LCM_NODE, noise_node, latent, extra))
        assert watched.pop() == (seed, True, True)
        assert pixels.shape == (128, 128, 3)  # a 64 px latent, scaled 2x over the first steps
        assert denoised.shape == (1, 16, 16, 16)
        images.append(pixels)
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])


def test_workflow_euler_cfg_pp_alternative(executor):
    """SamplerEulerCFGpp "alternative" samples (same size, deterministic) and differs from "regular". A KSampler
    given a node's own sampler name (linked: no validation) refuses it as any name that is not a KSampler one (ComfyUI's
    KSampler would run its first sampler, euler, instead)."""
    ex, root = executor
    prompt = {**tiny_base_prompt(), "30": {"class_type": "PrimitiveString", "inputs": {"value": "euler_pp"}},
              "5": {"class_type": "KSampler", "inputs": {
                  "model": ["1", 0], "seed": 5, "steps": 2, "cfg": 4.0, "sampler_name": ["30", 0],
                  "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                  "denoise": 1.0}},
              "90": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}}
    result = ex.execute(prompt, prompt_id="k", extra_data={}, execute_outputs=["90"])
    assert not result.success and result.error["node_type"] == "KSampler"
    assert "unknown sampler 'euler_pp'" in result.error["exception_message"], result.error
    alt = {"class_type": "SamplerEulerCFGpp", "inputs": {"version": "alternative"}}
    regular = {"class_type": "SamplerEulerCFGpp", "inputs": {"version": "regular"}}
    a, a_denoised = _execute(ex, root, _workflow(alt, RANDOM))
    ex.clear_cache()
    again, _ = _execute(ex, root, _workflow(alt, RANDOM))
    r, _ = _execute(ex, root, _workflow(regular, RANDOM))
    assert a.shape == (64, 64, 3) and a_denoised.shape == (1, 16, 8, 8)
    assert np.array_equal(a, again) and not np.array_equal(a, r)
