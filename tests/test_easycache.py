"""ComfyUI's EasyCache / LazyCache (sampling/easycache.py, workflow/nodes_cache.py) against a transcription of
comfy_extras/nodes_easycache.py's wrappers, on a small random MMDiT (CPU), and the nodes on the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfy_models import tiny_base_prompt, tiny_checkpoint_folder
from sd35fp8 import generation
from sd35fp8.sampling import CFGDenoiser, Conditioning, FlowMatching, get_sigmas
from sd35fp8.sampling import sample as run_sampler
from sd35fp8.sampling.easycache import ComfyCache
from sd35fp8.tiny import SHIPPED_CHECKPOINT
from test_step_cache import Counting, mmdit  # noqa: F401 - the fixture


# ---- ComfyUI's wrappers, transcribed (comfy_extras/nodes_easycache.py) -------------------------------------------
class _RefHolder:
    def __init__(self, thr: float, start: float, end: float, ms: FlowMatching):
        self.reuse_threshold, self.start_t, self.end_t = thr, ms.percent_to_sigma(start), ms.percent_to_sigma(end)
        self.relative_transformation_rate = None
        self.cumulative_change_rate = 0.0
        self.initial_step, self.skip_current_step, self.first_cond_uuid = True, False, None
        self.x_prev_subsampled = self.output_prev_subsampled = self.output_prev_norm = self.cache_diff = None
        self.uuid_cache_diffs: dict = {}
        self.total_steps_skipped = 0

    def is_past_end_timestep(self, t):
        return not (t[0] > self.end_t).item()

    def should_do_easycache(self, t):
        return (t[0] <= self.start_t).item()


def ref_lazy(holder: _RefHolder, executor, x, t, **kw):
    """lazycache_predict_noise_wrapper."""
    e = holder
    if e.is_past_end_timestep(t):
        return executor(x, t, **kw)
    next_x_prev, input_change = x, None
    sub = lambda v: v[..., ::8, ::8]  # noqa: E731
    if e.should_do_easycache(t):
        if e.x_prev_subsampled is not None:
            input_change = (sub(x) - e.x_prev_subsampled).flatten().abs().mean()
            if e.output_prev_norm is not None and e.relative_transformation_rate is not None:
                approx = (e.relative_transformation_rate * input_change) / e.output_prev_norm
                e.cumulative_change_rate += approx
                if e.cumulative_change_rate < e.reuse_threshold:
                    e.total_steps_skipped += 1
                    return x + e.cache_diff
                e.cumulative_change_rate = 0.0
    output = executor(x, t, **kw)
    if e.output_prev_norm is not None:
        output_change = (sub(output) - e.output_prev_subsampled).flatten().abs().mean()
        if input_change is not None:
            e.relative_transformation_rate = output_change / input_change
    e.cache_diff = output - next_x_prev
    e.x_prev_subsampled, e.output_prev_subsampled = sub(next_x_prev).clone(), sub(output).clone()
    e.output_prev_norm = output.flatten().abs().mean()
    return output


def ref_easy(holder: _RefHolder, executor, x, t, *args, uuids, **kw):
    """easycache_forward_wrapper (one tensor, no audio), uuids: the conditionings of the call."""
    e = holder
    if e.is_past_end_timestep(t):
        return executor(x, t, *args, **kw)

    def sub(v):
        off = v.shape[0] // len(uuids)
        i = uuids.index(e.first_cond_uuid)
        return v[i * off:(i + 1) * off, ..., ::8, ::8]

    has_first = e.first_cond_uuid in uuids
    next_x_prev, input_change = x, None
    if e.should_do_easycache(t):
        can_apply = all(u in e.uuid_cache_diffs for u in uuids)
        if e.skip_current_step and can_apply:
            return x + torch.cat([e.uuid_cache_diffs[u] for u in uuids])
        if e.initial_step:
            e.first_cond_uuid, e.initial_step = uuids[0], False
            has_first = True
        if has_first:
            if e.x_prev_subsampled is not None:
                input_change = (sub(x) - e.x_prev_subsampled).flatten().abs().mean()
            if e.output_prev_norm is not None and e.relative_transformation_rate is not None:
                approx = (e.relative_transformation_rate * input_change) / e.output_prev_norm
                e.cumulative_change_rate += approx
                if e.cumulative_change_rate < e.reuse_threshold and can_apply:
                    e.skip_current_step = True
                    e.total_steps_skipped += 1
                    return x + torch.cat([e.uuid_cache_diffs[u] for u in uuids])
                e.cumulative_change_rate = 0.0
    output = executor(x, t, *args, **kw)
    if has_first and e.output_prev_norm is not None:
        output_change = (sub(output) - e.output_prev_subsampled).flatten().abs().mean()
        if input_change is not None:
            e.relative_transformation_rate = output_change / input_change
    diff = output - next_x_prev
    off = diff.shape[0] // len(uuids)
    for i, u in enumerate(uuids):
        e.uuid_cache_diffs[u] = diff[i * off:(i + 1) * off]
    if has_first:
        e.x_prev_subsampled, e.output_prev_subsampled = sub(next_x_prev).clone(), sub(output).clone()
        e.output_prev_norm = output.flatten().abs().mean()
    return output


# ---- a small MMDiT: test_step_cache's (its `mmdit` fixture and Counting model) ----------------------------------


def _conds(m):
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 5, m.config.context_dim, generator=g)
    pooled = torch.randn(1, m.config.pooled_dim, generator=g)
    return Conditioning(ctx, pooled), Conditioning(ctx.flip(1), pooled.flip(1))


SHIFT, STEPS = 3.0, 20


def _run(m, cfg, wrap):
    """euler over 20 steps from fixed noise [1, 16, 16, 16] with CFGDenoiser(model) as wrap() makes it."""
    cond, uncond = _conds(m.model)
    ms = FlowMatching(SHIFT)
    sigmas = get_sigmas("simple", STEPS, shift=SHIFT, model_sampling=ms)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return run_sampler("euler", wrap(m, cond, uncond, cfg, ms), x, sigmas)


@pytest.mark.parametrize("thr", [0.05, 0.2, 0.6])
def test_lazycache_is_comfyuis(mmdit, thr):
    ours_m, ref_m = Counting(mmdit), Counting(mmdit)
    stats: dict = {}

    def ours(m, cond, uncond, cfg, ms):
        return ComfyCache("LazyCache", thr, 0.15, 0.95).wrap(CFGDenoiser(m, cond, uncond, cfg=cfg, model_sampling=ms),
                                                           ms, stats)

    def ref(m, cond, uncond, cfg, ms):
        inner, holder = CFGDenoiser(m, cond, uncond, cfg=cfg, model_sampling=ms), _RefHolder(thr, 0.15, 0.95, ms)
        return lambda x, t, **kw: ref_lazy(holder, inner, x, t, **kw)

    a, b = _run(ours_m, 4.0, ours), _run(ref_m, 4.0, ref)
    assert torch.equal(a, b) and ours_m.calls == ref_m.calls
    assert stats["calls"] == STEPS and stats["full"] == ours_m.calls and stats.get("skipped", 0) == STEPS - ours_m.calls
    if thr >= 0.2:
        assert ours_m.calls < STEPS  # it skipped


@pytest.mark.parametrize("thr", [0.05, 0.2, 0.6])
def test_easycache_is_comfyuis_for_one_call_a_step(mmdit, thr):
    """cfg 1: one model call a step (one conditioning), where ComfyUI's per-uuid bookkeeping is ours exactly."""
    ours_m, ref_m = Counting(mmdit), Counting(mmdit)
    stats: dict = {}

    def ours(m, cond, uncond, cfg, ms):
        return ComfyCache("EasyCache", thr, 0.15, 0.95).wrap(CFGDenoiser(m, cond, None, cfg=cfg, model_sampling=ms),
                                                           ms, stats)

    def ref(m, cond, uncond, cfg, ms):
        holder = _RefHolder(thr, 0.15, 0.95, ms)
        wrapped = lambda x, t, *a, **k: ref_easy(holder, m, x, t, *a, uuids=["c"], **k)  # noqa: E731
        inner = CFGDenoiser(wrapped, cond, None, cfg=cfg, model_sampling=ms)

        def step(x, t, **kw):
            holder.skip_current_step = False  # easycache_calc_cond_batch_wrapper
            return inner(x, t, **kw)
        return step

    a, b = _run(ours_m, 1.0, ours), _run(ref_m, 1.0, ref)
    assert torch.equal(a, b) and ours_m.calls == ref_m.calls
    assert stats["calls"] == STEPS and stats.get("skipped", 0) == STEPS - ours_m.calls
    if thr >= 0.2:
        assert ours_m.calls < STEPS


def test_easycache_with_cfg_batches_skips_the_whole_step(mmdit):
    """cond + uncond in one batched call: a skipped step calls nothing, and its prediction is x + the residual of
    the last computed call, both halves."""
    m = Counting(mmdit)
    stats: dict = {}
    seen: list = []

    def ours(mm, cond, uncond, cfg, ms):
        d = ComfyCache("EasyCache", 0.6, 0.15, 0.95).wrap(CFGDenoiser(mm, cond, uncond, cfg=cfg, model_sampling=ms),
                                                        ms, stats)

        def watch(x, t, **kw):
            before = m.calls
            out = d(x, t, **kw)
            seen.append(m.calls - before)
            return out
        return watch

    _run(m, 4.0, ours)
    assert set(seen) == {0, 1} and stats.get("skipped", 0) == seen.count(0) > 0  # one batched call, or none
    ms = FlowMatching(SHIFT)
    sigmas = get_sigmas("simple", STEPS, shift=SHIFT, model_sampling=ms)
    start_t = ms.percent_to_sigma(0.15)
    first_in_window = next(i for i, s in enumerate(sigmas[:-1]) if s <= start_t)
    assert all(n == 1 for n in seen[:first_in_window + 2])  # never before the window, nor its first two calls


def test_threshold_zero_changes_nothing_and_the_core_reports(mmdit):
    m = Counting(mmdit)
    cond, uncond = _conds(mmdit)
    base = generation.SampleSettings(steps=8, cfg=3.0, sampler="euler", scheduler="normal")
    z = torch.zeros(1, 16, 16, 16)
    plain = generation.sample(m, cond, uncond, z, base, seed=3)
    for kind in ("EasyCache", "LazyCache"):
        stats: dict = {}
        from dataclasses import replace

        s = replace(base, comfy_cache=ComfyCache(kind, 0.0), cache_threshold=1.0)  # the node's cache wins
        assert torch.equal(generation.sample(m, cond, uncond, z, s, seed=3, cache_stats=stats), plain)
        assert stats == {"calls": 8, "full": 8}


# ---- the nodes on the shipped model -----------------------------------------------------------------------------
@pytest.mark.skipif(not SHIPPED_CHECKPOINT.exists(), reason="shipped model weights not built")
def test_nodes_on_the_shipped_model(tmp_path):
    from PIL import Image

    from sd35fp8.workflow import ModelFolders, PromptExecutor
    from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, object_info

    info = object_info()
    for kind in ("EasyCache", "LazyCache"):
        assert kind in NODE_CLASS_MAPPINGS and info[kind]["experimental"] and info[kind]["category"] == "advanced/debug"
        assert info[kind]["input"]["required"]["reuse_threshold"][1]["default"] == 0.2
    root = tiny_checkpoint_folder(tmp_path)
    ex = PromptExecutor(ModelFolders(root / "models"), device="cpu", dtype=torch.float32)

    def pixels(model_node: dict | None, steps: int = 20) -> np.ndarray:
        prompt = {**tiny_base_prompt(),
                  "5": {"class_type": "KSampler", "inputs": {
                      "model": ["9", 0] if model_node else ["1", 0], "seed": 4, "steps": steps, "cfg": 4.0,
                      "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0], "negative": ["3", 0],
                      "latent_image": ["4", 0], "denoise": 1.0}},
                  "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
                  "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}}
        if model_node:
            prompt["9"] = model_node
        result = ex.execute(prompt, prompt_id="p")
        assert result.success, result.error
        (img,) = result.outputs["7"]["images"]
        return np.asarray(Image.open(root / "temp" / img["subfolder"] / img["filename"]).convert("RGB")).astype(int)

    plain = pixels(None)
    for kind in ("EasyCache", "LazyCache"):
        node = {"class_type": kind, "inputs": {"model": ["1", 0], "reuse_threshold": 0.0, "start_percent": 0.15,
                                               "end_percent": 0.95, "verbose": False}}
        assert np.array_equal(pixels(node), plain)
        node["inputs"]["reuse_threshold"] = 0.2  # the default: 7-8 of 20 steps skipped here, 50-60 dB
        cached = pixels(node)
        mse = float(((cached - plain) ** 2).mean())
        assert 0 < mse and 10 * np.log10(255 ** 2 / mse) > 35, kind  # skipped some steps, the same picture
