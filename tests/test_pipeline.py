"""End-to-end pipeline on a random tiny checkpoint, against diffusers' StableDiffusion3Pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sd35fp8.errors import InputError
from sd35fp8.pipeline import SD35Pipeline
from sd35fp8.sampling import get_sigmas, prepare_noise


@pytest.fixture(scope="module")
def pipe(tiny_random_checkpoint):
    path, _ = tiny_random_checkpoint
    return SD35Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32)


def _diffusers_pipeline(modules, pipe):
    pytest.importorskip("diffusers")  # the [test] extra has it; a bare GPU machine may not
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, convert_sd3_transformer_checkpoint_to_diffusers

    cfg = pipe.mmdit.config
    transformer = SD3Transformer2DModel(
        sample_size=cfg.pos_embed_max_size, patch_size=2, in_channels=16, num_layers=cfg.depth,
        attention_head_dim=64, num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_dim,
        caption_projection_dim=cfg.hidden_size, pooled_projection_dim=cfg.pooled_dim, out_channels=16,
        pos_embed_max_size=cfg.pos_embed_max_size, qk_norm="rms_norm" if cfg.qk_norm else None)
    sd = {k: v.clone() for k, v in modules["mmdit"].state_dict().items()}
    transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(sd), strict=True)
    vcfg = pipe.vae.config
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        block_out_channels=[vcfg.ch * m for m in vcfg.ch_mult],
                        down_block_types=["DownEncoderBlock2D"] * len(vcfg.ch_mult),
                        up_block_types=["UpDecoderBlock2D"] * len(vcfg.ch_mult),
                        layers_per_block=vcfg.num_res_blocks, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    vsd = {k: v.clone() for k, v in modules["vae"].state_dict().items()}
    vae.load_state_dict(convert_ldm_vae_checkpoint(vsd, vae.config), strict=True)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)  # σs are passed shifted
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)


def test_matches_diffusers_pipeline(pipe, tiny_random_checkpoint):
    """Same weights, text embeddings, initial noise and σs: euler, cfg 4 -> same latents and image."""
    _, modules = tiny_random_checkpoint
    prompt, negative, steps, seed, size = "a red circle above a blue square", "blurry", 4, 7, 64
    ours = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=4.0, width=size,
                height=size, seed=seed, sampler="euler", scheduler="normal", progress=False)

    ref_pipe = _diffusers_pipeline(modules, pipe)
    cond, uncond = pipe.encode_prompt([prompt]), pipe.encode_prompt([negative])
    sigmas = get_sigmas("normal", steps, shift=3.0)[:-1].tolist()
    noise = prepare_noise(seed, (1, 16, size // 8, size // 8))
    with torch.no_grad():
        latents = ref_pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled,
                           negative_prompt_embeds=uncond.context, negative_pooled_prompt_embeds=uncond.pooled,
                           guidance_scale=4.0, num_inference_steps=steps, sigmas=sigmas, latents=noise.clone(),
                           height=size, width=size, output_type="latent").images
        ref_vae_latents = latents / 1.5305 + 0.0609
        ref_image = ref_pipe.vae.decode(ref_vae_latents).sample
    scale = ref_vae_latents.abs().max()
    assert (ours.latents - ref_vae_latents).abs().max() / scale <= 1e-3
    ref_uint8 = np.clip(255.0 * torch.clamp((ref_image[0] + 1) / 2, 0, 1).permute(1, 2, 0).numpy(), 0, 255).astype(np.uint8)
    diff = np.abs(np.asarray(ours.images[0]).astype(int) - ref_uint8.astype(int))
    assert diff.max() <= 2  # 1e-3 of the latent scale moves a pixel by at most a level or two


def test_batch_seeds_and_callback(pipe):
    calls = []
    out = pipe(["a small green triangle", "a yellow star"], num_inference_steps=3, guidance_scale=2.0, width=32,
               height=48, seed=3, sampler="dpmpp_2m", num_images_per_prompt=2, progress=False,
               callback=lambda i, n, x0: calls.append((i, n, tuple(x0.shape))))
    assert len(out.images) == 4 and out.images[0].size == (32, 48)
    assert calls == [(i, 3, (4, 16, 6, 4)) for i in (1, 2, 3)]
    again = pipe("a small green triangle", num_inference_steps=3, guidance_scale=2.0, width=32, height=48, seed=3,
                 sampler="dpmpp_2m", num_images_per_prompt=2, progress=False)
    # The first prompt's two images equal a run of that prompt alone: one noise draw for the batch
    # (up to float32 rounding: a different batch size takes other matmul kernels).
    assert torch.allclose(again.latents, out.latents[:2], atol=1e-4)
    assert not torch.allclose(out.latents[0], out.latents[1], atol=1e-2)


def test_cfg_one_skips_uncond(pipe, monkeypatch):
    seen = []
    original = pipe.mmdit.forward
    monkeypatch.setattr(pipe.mmdit, "forward", lambda x, *a, **k: (seen.append(x.shape[0]), original(x, *a, **k))[1])
    pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, width=32, height=32, progress=False)
    assert seen == [1, 1]


def test_batched_encode_close_to_separate(pipe):
    """batch_encode (the compiled path's default): prompts and negatives in one encoder batch, the same
    conditioning up to rounding; each list keeps its own rows."""
    cond, uncond = pipe.encode_prompt(["a red circle", "a blue star"]), pipe.encode_prompt(["", "ugly"])
    c2, u2 = pipe.encode_prompt_groups(["a red circle", "a blue star"], ["", "ugly"])
    for a, b in ((cond, c2), (uncond, u2)):
        assert a.context.shape == b.context.shape and a.pooled.shape == b.pooled.shape
        assert torch.allclose(a.context, b.context, atol=1e-4) and torch.allclose(a.pooled, b.pooled, atol=1e-4)
    try:
        pipe.batch_encode = True
        out = pipe("a red circle", num_inference_steps=2, width=32, height=32, progress=False)
    finally:
        pipe.batch_encode = False
    ref = pipe("a red circle", num_inference_steps=2, width=32, height=32, progress=False)
    assert torch.allclose(out.latents, ref.latents, atol=1e-3)


def test_bad_parameters(pipe):
    with pytest.raises(InputError, match="multiple of 16"):
        pipe("x", width=40, height=32)
    with pytest.raises(InputError, match="unknown sampler"):
        pipe("x", sampler="eulerr")
    with pytest.raises(InputError, match="position grid"):
        pipe("x", width=1024, height=1024)


def test_img2img_one_image_or_one_per_prompt(pipe):
    """`image` is one picture for every prompt or one per prompt (image i goes with prompt i, as a
    ComfyUI latent batch from VAEEncode); image i's result keeps its noise row."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 3, 32, 32, generator=g)

    def run(image, prompts=("a red circle", "a blue square")):
        out = pipe(list(prompts), image=image, num_inference_steps=3, width=32, height=32, seed=5, denoise=0.6,
                   progress=False)
        return [np.asarray(im) for im in out.images]

    pair = run(torch.cat([a, b]))
    same = run(torch.cat([a, a]))
    shared = run(a)
    assert np.array_equal(pair[0], same[0])
    for x, y in zip(same, shared):  # a batch of 2 encodes vs 1 encode repeated: equal up to batch-size numerics
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 2
    assert not np.array_equal(pair[1], same[1])  # the second prompt got image b
    with pytest.raises(InputError, match="3 init images for 2 prompts"):
        run(torch.cat([a, a, b]))


def test_arguments_checked_before_work(pipe):
    """Zero is not "the default", types are checked, the init image must agree with width/height."""
    small = dict(width=32, height=32, num_inference_steps=2, progress=False)
    for kw, match in ((dict(num_inference_steps=0), "steps 0"), (dict(width=0, height=32), "width must be"),
                      (dict(num_images_per_prompt=1.5), "num_images_per_prompt must be an integer"),
                      (dict(width=32.0), "width must be an integer"), (dict(seed=2**64), "seed must be in"),
                      (dict(seed=-1), "seed must be in"), (dict(negative_prompt=3), "negative_prompt must be")):
        with pytest.raises(InputError, match=match):
            pipe("x", **{**small, **kw})
    for bad, match in ((None, "prompt must be"), (5, "prompt must be"), ([], "no prompt")):
        with pytest.raises(InputError, match=match):
            pipe(bad, **small)
    img = Image.new("RGB", (48, 32))
    with pytest.raises(InputError, match="init image is 48x32 but width/height are 32x32"):
        pipe.generate("x", image=img, denoise=0.5, **small)  # pipe(...) resizes a PIL image, as diffusers
    assert pipe("x", image=img, denoise=0.5, **small).images[0].size == (32, 32)
    for bad, match in ((torch.rand(1, 4, 32, 32), "must be \\[3, H, W\\]"), (torch.ones(1, 3, 32, 32, dtype=torch.uint8), "floating point"),
                       (torch.rand(1, 3, 32, 32) * 2 - 1, "values must lie in"), ([img, Image.new("RGB", (32, 32))], "differ in size"),
                       ("x.png", "image must be")):
        with pytest.raises(InputError, match=match):
            pipe("x", image=bad, denoise=0.5, num_inference_steps=2, progress=False)
    out = pipe("x", image=[Image.new("RGB", (48, 32))], denoise=0.5, num_inference_steps=2, progress=False)
    assert out.images[0].size == (48, 32)  # the image sets the size
    out = pipe("x", seed=2**64 - 1, sampler="euler_ancestral", **small)  # ComfyUI's largest seed
    assert len(out.images) == 1


def test_prompts_that_cannot_share_a_batch_run_in_passes(pipe):
    """A long prompt among short ones: contexts ComfyUI would not concatenate run in one pass each,
    each on its rows of the batch's single noise draw (so with a deterministic sampler image k is
    the image k of a batch of that prompt alone)."""
    long = "a red circle above a blue square and a small green triangle " * 12
    kw = dict(width=32, height=32, num_inference_steps=2, seed=7, progress=False, sampler="euler")
    steps = []
    both = pipe(["a red circle", long], callback=lambda i, total, x: steps.append(total), **kw)
    assert len(both.images) == 2 and steps == [2, 2, 2, 2]  # two passes of 2 steps
    first = pipe(["a red circle", "a blue square"], **kw)  # batchable: one pass, same noise rows
    # equal up to a pixel level: a pass of 1 prompt and one of 2 split the matmuls over threads differently
    # (seen on a 16-core machine: one value 86 against 87)
    diff = np.abs(np.asarray(both.images[0], np.int16) - np.asarray(first.images[0], np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert [p["prompt"] for p in both.params] == ["a red circle", long]


def test_save_adds_png_suffix(pipe, tmp_path):
    out = pipe("x", width=32, height=32, num_inference_steps=1, progress=False)
    assert out.save(tmp_path / "picture") == [tmp_path / "picture.png"]
    assert Image.open(tmp_path / "picture.png").format == "PNG"


def test_save_png_metadata(pipe, tmp_path):
    out = pipe("a blue ring", num_inference_steps=2, width=32, height=32, seed=11, progress=False)
    (path,) = out.save(tmp_path / "img.png")
    meta = Image.open(path).text
    params = json.loads(meta["sd35fp8"])
    assert params["seed"] == 11 and params["prompt"] == "a blue ring" and "Negative prompt" in meta["parameters"]


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_modes_same_image(tiny_random_checkpoint, pipe, offload):
    path, _ = tiny_random_checkpoint
    other = SD35Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32, offload=offload)
    kw = dict(num_inference_steps=2, guidance_scale=3.0, width=32, height=32, seed=5, progress=False)
    assert torch.equal(other("a red circle", **kw).latents, pipe("a red circle", **kw).latents)


def test_compile_needs_cuda(tiny_random_checkpoint):
    path, _ = tiny_random_checkpoint
    with pytest.raises(InputError, match="compile needs a CUDA device"):
        SD35Pipeline.from_pretrained(path, device="cpu", compile=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_pipeline_close_to_plain_gpu(tiny_random_checkpoint):
    path, _ = tiny_random_checkpoint
    kw = dict(num_inference_steps=4, guidance_scale=3.0, width=64, height=64, seed=5, progress=False)
    plain = SD35Pipeline.from_pretrained(path, device="cuda", fp8="dynamic")
    fast = SD35Pipeline.from_pretrained(path, device="cuda", fp8="dynamic", compile=True)
    ra, rb = plain("a red circle", **kw), fast("a red circle", **kw)
    a, b = ra.latents.float(), rb.latents.float()
    assert "MMDiTEngine" in fast.summary() and "compile=True" in fast.summary()
    assert "compile=False" in plain.summary() and "cuda_graphs=True" in plain.summary()
    from sd35fp8.fp8.scaling import sqnr

    assert sqnr(a, b) > 20
    # the compiled road decodes through the compiled VAE decoder (models/vae.py compile_decoder): the same
    # image as the eager decoder of the same latents, to bf16 rounding
    assert "_compiled_decoder" in fast.vae.__dict__ and "_compiled_decoder" not in plain.vae.__dict__
    with torch.inference_mode():
        z = rb.latents.to("cuda", fast.vae.dtype)
        assert sqnr(fast.vae.decoder(z).float(), fast.vae.decode(z).float()) > 30
    assert fast.warmup([(64, 64, 2)]) > 0


def test_prompt_embeds_and_latents_match_diffusers(pipe, tiny_random_checkpoint):
    """diffusers' habits: prompt_embeds / pooled_prompt_embeds (+ negatives) and latents (the initial noise, here
    not from any seed) given to our StableDiffusion3Pipeline call -> the latents diffusers makes from them."""
    _, modules = tiny_random_checkpoint
    steps, size = 3, 48
    cond = pipe.encode_prompt(["a red circle", "a blue square"])
    uncond = pipe.encode_prompt(["blurry", "dark"])
    noise = torch.randn(2, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(123))
    ours = pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.context,
                negative_pooled_prompt_embeds=uncond.pooled, latents=noise.clone(), guidance_scale=3.0,
                num_inference_steps=steps, sampler="euler", scheduler="normal", output_type="latent", progress=False)
    ref_pipe = _diffusers_pipeline(modules, pipe)
    sigmas = get_sigmas("normal", steps, shift=3.0)[:-1].tolist()
    with torch.no_grad():
        ref = ref_pipe(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled,
                       negative_prompt_embeds=uncond.context, negative_pooled_prompt_embeds=uncond.pooled,
                       guidance_scale=3.0, num_inference_steps=steps, sigmas=sigmas, latents=noise.clone(),
                       height=size, width=size, output_type="latent").images  # model space, as ours
    got = ours.images
    assert got.shape == ref.shape == (2, 16, size // 8, size // 8)
    assert (got - ref).abs().max() / ref.abs().max() <= 1e-3
    # without negative embeddings the negative text ("" unless given) is encoded, as diffusers does
    plain = pipe(prompt_embeds=cond.context[:1], pooled_prompt_embeds=cond.pooled[:1], latents=noise[:1],
                 guidance_scale=3.0, num_inference_steps=steps, sampler="euler", output_type="latent", progress=False)
    by_text = pipe("a red circle", guidance_scale=3.0, num_inference_steps=steps, sampler="euler", width=size,
                   height=size, output_type="latent", progress=False, latents=noise[:1])
    assert torch.allclose(plain.images, by_text.images, atol=1e-5)
    for bad, msg in (({"prompt": "x"}, "not both"), ({"pooled_prompt_embeds": None}, "pooled_prompt_embeds"),
                     ({"latents": noise[:, :8]}, "latents must be"), ({"height": 64}, "latents are for")):
        kw = dict(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled, latents=noise, num_inference_steps=1,
                  progress=False)
        with pytest.raises(InputError, match=msg):
            pipe(**{**kw, **bad})
    with pytest.raises(InputError, match=r"prompt_embeds must be \[2, tokens"):
        pipe(prompt_embeds=cond.context[..., :8], pooled_prompt_embeds=cond.pooled, num_inference_steps=1,
             progress=False)


def test_custom_sigmas_match_diffusers(pipe, tiny_random_checkpoint):
    """sigmas= as diffusers' FlowMatchEulerDiscreteScheduler takes it (shifted by the scheduler's shift, 3.0 for
    SD3.5, then a final 0): the same latents as diffusers with that scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, modules = tiny_random_checkpoint
    size, custom = 32, [1.0, 0.75, 0.4, 0.1]
    cond, uncond = pipe.encode_prompt(["a red circle"]), pipe.encode_prompt([""])
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(5))
    kw = dict(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.context,
              negative_pooled_prompt_embeds=uncond.pooled, guidance_scale=2.0, latents=noise.clone(),
              output_type="latent")
    seen = []
    ours = pipe(**kw, sigmas=custom, sampler="euler", progress=False,
                callback_on_step_end=lambda p, i, t, k: seen.append(float(t)) or k)
    ref_pipe = _diffusers_pipeline(modules, pipe)
    ref_pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    with torch.no_grad():
        ref = ref_pipe(**kw, sigmas=custom, height=size, width=size).images
    assert (ours.images - ref).abs().max() / ref.abs().max() <= 1e-3
    shifted = [3 * s / (1 + 2 * s) for s in custom]
    assert seen == pytest.approx([s * 1000 for s in shifted], rel=1e-5)  # diffusers' timesteps
    with pytest.raises(InputError, match="sigmas must decrease"):
        pipe("x", sigmas=[0.5, 0.9], progress=False)
    with pytest.raises(InputError, match="are 2 steps, num_inference_steps is 5"):
        pipe.generate("x", sigmas=[1.0, 0.5, 0.0], num_inference_steps=5, progress=False)


def test_skip_guidance_layers_match_diffusers(pipe, tiny_random_checkpoint):
    """diffusers' skip_guidance_layers / skip_layer_guidance_* (its SLG: a cond pass without those joint blocks
    on the steps i with start < i / steps < stop): the same latents as diffusers."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, modules = tiny_random_checkpoint
    size, steps = 32, 5
    cond, uncond = pipe.encode_prompt(["a red circle"]), pipe.encode_prompt(["blurry"])
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(9))
    kw = dict(prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled, negative_prompt_embeds=uncond.context,
              negative_pooled_prompt_embeds=uncond.pooled, guidance_scale=3.0, latents=noise.clone(),
              output_type="latent", num_inference_steps=steps, skip_guidance_layers=[1],
              skip_layer_guidance_scale=2.5, skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.7)
    ours = pipe(**kw, sampler="euler", scheduler="normal", progress=False)
    without = pipe(**{**kw, "skip_guidance_layers": None}, sampler="euler", scheduler="normal", slg=False,
                   progress=False)
    ref_pipe = _diffusers_pipeline(modules, pipe)
    ref_pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    with torch.no_grad():
        ref = ref_pipe(**kw, height=size, width=size).images
    assert (ours.images - ref).abs().max() / ref.abs().max() <= 1e-3
    assert (ours.images - without.images).abs().max() / ref.abs().max() > 1e-2  # the guidance did something
