"""The generation core (sd35fp8.generation) on a random tiny checkpoint: its pieces chain to what the
pipeline returns, per-row noise, interrupt, shared negatives, skip-layer guidance defaults."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from sd35fp8 import generation
from sd35fp8.defaults import MEDIUM
from sd35fp8.models.vae import image_to_uint8
from sd35fp8.pipeline import SD35Pipeline
from sd35fp8.sampling import prepare_noise


@pytest.fixture(scope="module")
def pipe(tiny_random_checkpoint):
    path, _ = tiny_random_checkpoint
    return SD35Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32)


def _settings(**kw):
    base = dict(steps=3, cfg=3.0, sampler="euler", scheduler="normal")
    return generation.SampleSettings(**{**base, **kw})


def test_pieces_chain_to_the_pipeline(pipe):
    """encode -> sample -> decode by hand equals the pipeline's call, bit for bit."""
    out = pipe(["a red circle", "a blue star"], negative_prompt=["", "ugly"], num_inference_steps=3, guidance_scale=3.0,
               sampler="euler_ancestral", width=32, height=32, seed=4, progress=False)
    (group,) = generation.encode(pipe.text_encoder, ["a red circle", "a blue star"], ["", "ugly"], use_cfg=True,
                                 device=pipe.device, dtype=pipe.dtype)
    latent = torch.zeros(2, 16, 4, 4)
    z = generation.sample(pipe.mmdit, group.cond, group.uncond, latent, _settings(sampler="euler_ancestral"), seed=4,
                          dtype=pipe.dtype)
    assert torch.equal(z, out.latents)
    pixels = image_to_uint8(generation.decode(pipe.vae, z))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(pixels, out.images))


def test_sample_rows_gives_each_prompt_its_own_noise(pipe):
    """Cross-prompt batch: each row group starts from the draw its seed makes alone; with a deterministic
    sampler the result equals the lone run up to the batch size's effect on float32 kernel rounding."""
    conds = [generation.encode(pipe.text_encoder, [t], [""], use_cfg=True, device=pipe.device, dtype=pipe.dtype)[0]
             for t in ("a red circle", "a blue square")]
    latents = [torch.zeros(1, 16, 4, 4), torch.zeros(2, 16, 4, 4)]
    noise = generation.row_noise([7, 8], latents)
    assert torch.equal(noise[:1], prepare_noise(7, (1, 16, 4, 4)))
    assert torch.equal(noise[1:], prepare_noise(8, (2, 16, 4, 4)))
    rows = [generation.Rows(z, s, g.cond, g.uncond) for z, s, g in zip(latents, (7, 8), conds)]
    together = generation.sample_rows(pipe.mmdit, rows, _settings(), device=pipe.device, dtype=pipe.dtype)
    for r, got in zip(rows, together):
        alone = generation.sample(pipe.mmdit, r.cond, r.uncond, r.latent, _settings(), seed=r.seed, dtype=pipe.dtype)
        torch.testing.assert_close(got, alone, atol=1e-4, rtol=0)
    nothing = generation.sample_rows(pipe.mmdit, rows, _settings(denoise=0.0), device=pipe.device)
    assert all(a is r.latent for a, r in zip(nothing, rows))


def test_interrupt_stops_before_and_between_steps(pipe):
    class Stop(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 3:  # before sampling, before step 1, then stop before step 2
            raise Stop

    steps = []
    with pytest.raises(Stop):
        pipe("a red circle", num_inference_steps=4, width=32, height=32, progress=False, interrupt=interrupt,
             callback=lambda i, n, d: steps.append(i))
    assert steps == [1]


def test_shared_negative_is_encoded_once(pipe):
    """negatives as one string (the tiny trainer's evaluation): encoded once (batch 1) and broadcast; the
    rows equal per-prompt negatives up to the encoder's batch-size rounding."""
    shared = generation.encode(pipe.text_encoder, ["a", "b", "c"], "", use_cfg=True, device=pipe.device,
                               dtype=pipe.dtype)
    listed = generation.encode(pipe.text_encoder, ["a", "b", "c"], ["", "", ""], use_cfg=True, device=pipe.device,
                               dtype=pipe.dtype)
    assert shared[0].uncond.context.shape[0] == 1 and listed[0].uncond.context.shape[0] == 3
    torch.testing.assert_close(shared[0].uncond.context.expand(3, -1, -1), listed[0].uncond.context, atol=1e-5, rtol=0)
    no_cfg = generation.encode(pipe.text_encoder, ["a"], "", use_cfg=False, device=pipe.device, dtype=pipe.dtype)
    assert no_cfg[0].uncond is None


def test_medium_defaults_cfg_follows_slg(pipe, monkeypatch):
    """Medium's defaults: skip-layer guidance on at the reference's cfg 4.0; slg=False gives cfg 5.0 and
    no skip pass; an explicit guidance_scale wins."""
    seen = []
    original = pipe.mmdit.forward
    monkeypatch.setattr(pipe.mmdit, "forward",
                        lambda x, *a, **k: (seen.append(tuple(k.get("skip_layers", ()))), original(x, *a, **k))[1])
    monkeypatch.setattr(pipe, "defaults", replace(MEDIUM, slg_layers=(1,), steps=10, width=32, height=32,
                                                  sampler="euler"))
    out = pipe("a red circle", progress=False)
    assert out.params[0]["cfg"] == 4.0
    assert seen.count((1,)) == 1  # the skip pass at call 1 of 10 only (0.01*10 < call < 0.20*10)
    seen.clear()
    out = pipe("a red circle", progress=False, slg=False)
    assert out.params[0]["cfg"] == 5.0 and (1,) not in seen
    assert pipe("a red circle", progress=False, guidance_scale=2.0).params[0]["cfg"] == 2.0
