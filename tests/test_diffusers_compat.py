"""diffusers' names on SD35Pipeline (diffusers_compat.py): a diffusers SD3 script with only its import
changed runs on the shipped model, and each translation means what diffusers means."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd35fp8 import SD35Pipeline, StableDiffusion3Pipeline
from sd35fp8.errors import InputError
from sd35fp8.models.vae import to_model_space
from sd35fp8.text.tokenizer import EncoderTexts

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "diffusers_style.py"
PROMPT = "a red circle above a blue square"
STEPS = 2


@pytest.fixture(scope="module")
def pipe():
    return SD35Pipeline.from_pretrained(device="cpu", torch_dtype=torch.float32)


def test_script_only_the_import_differs():
    text = SCRIPT.read_text()
    assert "from diffusers import" not in text.replace("# was: from diffusers import", "")
    assert "from sd35fp8 import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, " \
           "StableDiffusion3Pipeline" in text


def test_diffusers_script_runs_and_generator_equals_seed(pipe, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", str(STEPS), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps seen by the callback: 2 first timestep: 1000.0" in proc.stdout
    assert "np (1, 128, 128, 3) float32 pt (1, 3, 128, 128) torch.float32 latent (1, 16, 16, 16)" in proc.stdout
    assert "there is no CUDA device" in proc.stderr  # enable_*_offload on the CPU says what happened
    for name in ("txt2img.png", "prompt_3.png", "img2img.png", "inpaint.png", "low_memory.png", "float16.png"):
        assert (out / name).stat().st_size > 0
    # generator=torch.Generator("cpu").manual_seed(13) gives the image of seed=13
    ref = pipe.generate(PROMPT, num_inference_steps=STEPS, guidance_scale=4.0, height=128, width=128, seed=13,
                        progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(out / "txt2img.png")), np.asarray(ref))
    arr = np.load(out / "txt2img.npy")
    ref_default_cfg = pipe.generate(PROMPT, num_inference_steps=STEPS, height=128, width=128, seed=13,
                                    progress=False).images[0]
    assert np.array_equal(np.round(arr[0] * 255).astype(np.uint8), np.asarray(ref_default_cfg))
    # inpainting kept the upper half (only the lower half was masked for repainting)
    init = np.asarray(Image.open(out / "txt2img.png")).astype(int)
    inp = np.asarray(Image.open(out / "inpaint.png")).astype(int)
    upper, lower = slice(0, 48), slice(80, 128)  # away from the latent mask's blurred edge
    assert np.abs(inp[upper] - init[upper]).mean() < np.abs(inp[lower] - init[lower]).mean()


def test_output_types_and_return_dict(pipe):
    kw = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3))
    pil = pipe(PROMPT, **kw).images[0]
    kw["generator"] = torch.Generator().manual_seed(3)
    (pt,) = pipe(PROMPT, output_type="pt", return_dict=False, **kw)
    assert pt.shape == (1, 3, 128, 128) and pt.dtype == torch.float32
    assert torch.equal((pt[0].permute(1, 2, 0) * 255).round().to(torch.uint8), torch.from_numpy(np.array(pil)))
    kw["generator"] = torch.Generator().manual_seed(3)
    out = pipe(PROMPT, output_type="latent", **kw)
    raw = pipe.generate(PROMPT, num_inference_steps=STEPS, seed=3, progress=False).latents
    assert torch.equal(out.images, to_model_space(raw))  # diffusers' latents are scaled and shifted


def test_generator_rules(pipe):
    g = torch.Generator().manual_seed(7)
    torch.randn(3, generator=g)  # a used generator still counts by its initial seed
    a = pipe(PROMPT, num_inference_steps=STEPS, generator=g, output_type="np").images
    b = pipe(PROMPT, num_inference_steps=STEPS, seed=7, output_type="np").images
    assert np.array_equal(a, b)
    with pytest.raises(InputError, match="not both"):
        pipe(PROMPT, generator=torch.Generator().manual_seed(1), seed=1)
    with pytest.raises(InputError, match="one generator per image"):
        pipe([PROMPT, PROMPT], generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])


def test_unsupported_arguments_are_named(pipe):
    with pytest.raises(InputError, match="ip_adapter_image not supported"):
        pipe(PROMPT, ip_adapter_image=Image.new("RGB", (8, 8)))
    with pytest.raises(InputError, match="prompt or prompt_embeds, not both"):  # diffusers' check_inputs rule
        pipe(PROMPT, prompt_embeds=torch.zeros(1, 4, 8))
    with pytest.raises(InputError, match="unknown argument.*guidance_rescale_typo"):
        pipe(PROMPT, guidance_rescale_typo=1)
    with pytest.raises(InputError, match="output_type 'tensor'"):
        pipe(PROMPT, output_type="tensor")
    with pytest.raises(InputError, match="prompt_embeds"):
        pipe(PROMPT, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with pytest.raises(InputError, match="from_pretrained: unknown argument"):
        StableDiffusion3Pipeline.from_pretrained(revision="main")


def test_callback_timesteps_and_changed_latents_refused(pipe):
    seen = []

    def cb(p, step, timestep, kwargs):
        assert p is pipe and p.num_timesteps == 3 and p.guidance_scale == 4.0 and p.do_classifier_free_guidance
        seen.append((step, round(float(timestep), 3)))
        return kwargs

    pipe(PROMPT, num_inference_steps=3, guidance_scale=4.0, callback_on_step_end=cb)
    from sd35fp8.sampling import get_sigmas

    sig = get_sigmas("normal", 3, shift=3.0)
    assert seen == [(i, round(float(sig[i]) * 1000, 3)) for i in range(3)]
    with pytest.raises(InputError, match="changed latents"):
        pipe(PROMPT, num_inference_steps=1, callback_on_step_end=lambda p, s, t, k: {"latents": k["latents"] * 2})


def test_per_encoder_texts_tokenize(pipe):
    tok = pipe.text_encoder.tokenizer
    same = EncoderTexts(PROMPT, PROMPT, PROMPT)
    assert tok.tokenize(same) == tok.tokenize(PROMPT)
    long_l = " ".join(["red circle"] * 60)  # > 77 CLIP tokens: two chunks for CLIP-L only
    t = tok.tokenize(EncoderTexts(long_l, "blue", "a square", t5_length=256))
    assert len(t["l"]) == len(t["g"]) == 2  # CLIP-G evened out with an empty chunk, as CLIPTextEncodeSD3
    assert t["g"][0] == tok.tokenize("blue")["g"][0] and t["g"][1] == tok.tokenize("")["g"][0]
    assert t["t5"][: len(tok.tokenize("a square")["t5"])][:3] == tok.tokenize("a square")["t5"][:3]
    assert len(t["t5"]) == 256  # diffusers' max_sequence_length: padded to exactly that
    assert len(tok.tokenize(EncoderTexts(long_l, t5_length=16))["t5"]) == 16  # and cut


def test_strength_is_diffusers_tail_of_schedule(pipe):
    init = pipe.generate(PROMPT, num_inference_steps=STEPS, seed=1, progress=False).images[0]
    a = pipe("a red circle", image=init, strength=0.5, num_inference_steps=4, seed=2, output_type="np").images
    b = pipe.generate("a red circle", image=init, denoise=0.5, num_inference_steps=2, seed=2, progress=False)
    assert np.array_equal(np.round(a[0] * 255).astype(np.uint8), np.asarray(b.images[0]))


def test_mask_all_ones_is_img2img_and_zeros_keep_the_image(pipe):
    init = pipe.generate(PROMPT, num_inference_steps=STEPS, seed=1, progress=False)
    kw = dict(image=init.images[0], denoise=0.8, num_inference_steps=STEPS, seed=4, progress=False)
    plain = pipe.generate("a green square", **kw)
    ones = pipe.generate("a green square", mask=torch.ones(1, 1, 128, 128), **kw)
    assert torch.equal(plain.latents, ones.latents)
    zeros = pipe.generate("a green square", mask=torch.zeros(1, 1, 128, 128), **kw)
    encoded = pipe.vae.encode(torch.from_numpy(np.asarray(init.images[0], dtype=np.float32) / 127.5 - 1)
                              .permute(2, 0, 1)[None]).float()
    torch.testing.assert_close(zeros.latents, encoded, atol=1e-4, rtol=1e-4)


def test_placement_and_tiling(pipe, caplog):
    assert pipe.to("cpu") is pipe and pipe.to(torch.float32) is pipe  # nothing changes, nothing reloads
    with caplog.at_level(logging.WARNING, logger="sd35fp8.diffusers_compat"):
        pipe.enable_model_cpu_offload()
    if not torch.cuda.is_available():
        assert "no CUDA device" in caplog.text and pipe.offload == "none"
    pipe.enable_vae_tiling()
    try:
        assert pipe._tiled_decode(128, 128)
    finally:
        pipe.disable_vae_tiling()
    assert not pipe._tiled_decode(128, 128)
    with pytest.raises(InputError, match="sd35fp8 runs on cpu or cuda|no CUDA"):
        pipe.to("mps" if torch.cuda.is_available() else "cuda")


def test_memory_habits(pipe):
    """enable_vae_slicing decodes one image at a time (the same images); the attention / xformers / qkv switches a
    diffusers script calls are accepted and change nothing (diffusers' SD3 has no attention slicing either);
    default_sample_size x vae_scale_factor is the model's default size."""
    batch = dict(prompt=[PROMPT, "a blue circle"], num_inference_steps=STEPS, seed=4, output_type="np")
    whole = pipe(**batch).images
    pipe.enable_vae_slicing()
    try:
        sliced = pipe(**batch).images
    finally:
        pipe.disable_vae_slicing()
    np.testing.assert_allclose(sliced, whole, atol=1 / 255)
    pipe.vae.enable_slicing()  # diffusers' newer spelling, on the VAE
    try:
        np.testing.assert_array_equal(pipe(**batch).images, sliced)
    finally:
        pipe.vae.disable_slicing()
    pipe.vae.enable_tiling()
    try:
        assert pipe._tiled_decode(128, 128)
    finally:
        pipe.vae.disable_tiling()
    assert not pipe._tiled_decode(128, 128)
    for switch in ("enable_attention_slicing", "disable_attention_slicing", "enable_xformers_memory_efficient_attention",
                   "disable_xformers_memory_efficient_attention", "fuse_qkv_projections", "unfuse_qkv_projections",
                   "maybe_free_model_hooks"):
        getattr(pipe, switch)()
    np.testing.assert_array_equal(pipe(**batch).images, whole)
    assert pipe.default_sample_size * pipe.vae_scale_factor == pipe.defaults.width
    assert pipe.patch_size == 2


@pytest.mark.parametrize("name", ["StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                                  "StableDiffusion3InpaintPipeline"])
def test_every_diffusers_argument_and_method_is_known(name):
    """Against diffusers itself: every argument its SD3 pipelines' __call__ take is either translated or
    refused by name (never an 'unknown argument'), and the loading / placement / memory methods a script
    calls exist on our class of the same name."""
    import inspect

    import sd35fp8
    from sd35fp8.diffusers_compat import DiffusersSurface, UNSUPPORTED_CALL_ARGS

    diffusers = pytest.importorskip("diffusers")
    theirs = getattr(diffusers, name)
    ours = set(inspect.signature(DiffusersSurface.__call__).parameters) | set(UNSUPPORTED_CALL_ARGS)
    assert set(inspect.signature(theirs.__call__).parameters) - ours == set()
    for method in ("from_pretrained", "from_single_file", "from_pipe", "to", "enable_model_cpu_offload",
                   "enable_sequential_cpu_offload", "set_progress_bar_config", "enable_vae_tiling",
                   "disable_vae_tiling", "enable_vae_slicing", "disable_vae_slicing", "enable_attention_slicing",
                   "disable_attention_slicing", "enable_xformers_memory_efficient_attention",
                   "disable_xformers_memory_efficient_attention", "fuse_qkv_projections", "unfuse_qkv_projections",
                   "maybe_free_model_hooks", "load_lora_weights", "set_adapters", "fuse_lora", "unfuse_lora",
                   "unload_lora_weights", "delete_adapters", "get_active_adapters", "get_list_adapters",
                   "enable_lora", "disable_lora"):
        # newer diffusers dropped some (enable_vae_tiling: pipe.vae.enable_tiling()); older scripts still call them
        assert callable(getattr(getattr(sd35fp8, name), method)), method
    from diffusers import AutoencoderKL

    from sd35fp8.models.vae import SD3VAE

    for method in ("enable_tiling", "disable_tiling", "enable_slicing", "disable_slicing"):  # pipe.vae.enable_...()
        assert hasattr(AutoencoderKL, method) and callable(getattr(SD3VAE, method)), method


def test_clip_skip(pipe):
    base = pipe(PROMPT, num_inference_steps=1, seed=5, output_type="np").images
    assert np.array_equal(pipe(PROMPT, num_inference_steps=1, seed=5, output_type="np", clip_skip=0).images, base)
    assert not np.array_equal(pipe(PROMPT, num_inference_steps=1, seed=5, output_type="np", clip_skip=1).images, base)
    assert pipe.text_encoder.clip_layer is None  # only for that call
    with pytest.raises(InputError, match="clip_skip must be"):
        pipe(PROMPT, num_inference_steps=1, clip_skip=-1)


def test_skip_layer_knobs_without_layers_are_ignored_as_diffusers_does(pipe):
    a = pipe(PROMPT, num_inference_steps=1, seed=5, output_type="np", skip_layer_guidance_scale=2.8,
             skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.2).images
    assert np.array_equal(a, pipe(PROMPT, num_inference_steps=1, seed=5, output_type="np").images)
    with pytest.raises(InputError, match=r"skip-layer guidance layers \[7, 8, 99\]: the MMDiT has joint blocks"):
        pipe(PROMPT, skip_guidance_layers=[7, 8, 99])


def test_mu_is_ignored_as_diffusers_does(pipe):
    """SD3.5's FlowMatchEulerDiscreteScheduler configs have use_dynamic_shifting off: diffusers ignores mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    plain = sched.sigmas.clone()
    sched.set_timesteps(4, mu=0.7)
    assert torch.equal(sched.sigmas, plain)
    base = pipe(PROMPT, num_inference_steps=1, seed=5, output_type="np").images
    assert np.array_equal(pipe(PROMPT, num_inference_steps=1, seed=5, output_type="np", mu=0.7).images, base)
