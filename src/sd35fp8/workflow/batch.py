"""Cross-prompt batching: several queued prompts that differ only in texts and seeds share one
sampling call on the GPU, and each still gets its own events, outputs and history entry.

    results = executor.execute_batch([PromptJob(prompt, prompt_id, extra_data, hooks, outputs), ...])

How one batch runs:
1. every prompt's nodes before its sampler, one prompt after the other (loaders come from the
   shared cache; text encoding runs per prompt);
2. one sampling call on the concatenated latents (`generation.sample_rows`): each prompt's
   initial noise is its own `prepare_noise(seed_i, shape_i)` (what it would draw alone),
   conditionings are concatenated along the batch; progress events go to every prompt of the batch;
3. the result is split and every prompt runs its downstream nodes (VAEDecode, SaveImage) alone.

Exactness. Results equal one-by-one runs because every row of the batch sees exactly what it
would see alone: per-prompt noise, and only *deterministic* samplers (`BATCHABLE_SAMPLERS`): the
ancestral, SDE and lcm samplers draw per-step noise from one seed for the whole batch, so they
cannot reproduce several seeds at once and are never batched. Prompts whose contexts differ in
length sample in separate sub-batches (ComfyUI's lcm-repeat would batch them but changes float
rounding). Per-row arithmetic is batch-invariant: the MMDiT (and its fused engine) computes the
conditioning vectors row by row (models.mmdit.per_row) and the patch embedding image by image
(per_image), whose small GEMMs would otherwise round by the batch size (the FP8 per-token scales
amplified that to 162 uint8 levels). The token GEMMs run with the batch in M: float32 on the CPU was
measured M-invariant (batched rows bit-equal to rows alone, tests/test_engine.py,
test_server_load.py); a BLAS that rounds them by M may move a pixel by 1 uint8 level (issue 22), the
tolerance tests/test_roads.py states (<= 1 level on <= 1 % of values). Not guaranteed on CUDA.

Interrupts: an interrupt naming one prompt of a batch stops that prompt; the others re-run the
sampler without it (same results: the rows are independent). An interrupt without a prompt id
stops every prompt of the batch.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from sd35fp8.errors import SD35Error
from sd35fp8.workflow.lists import NodeList
from sd35fp8.workflow.prompt_run import ExecutionResult, InterruptProcessing, PromptJob, PromptRun

log = logging.getLogger(__name__)

SAMPLER_CLASSES = ("KSampler", "KSamplerAdvanced")
# samplers whose steps use no random numbers: a batch of seeds gives each row its lone result
BATCHABLE_SAMPLERS = frozenset({"euler", "heun", "heunpp2", "dpm_2", "lms", "dpm_fast", "dpmpp_2m", "ipndm",
                                "ipndm_v", "deis", "res_multistep", "gradient_estimation", "ddim", "uni_pc",
                                "uni_pc_bh2", "euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp",
                                "gradient_estimation_cfg_pp"})  # not dpm_adaptive: its step control reads the batch
# inputs that may differ between prompts of one batch (everything else must be identical)
VARYING_INPUTS = {"KSampler": ("seed",), "KSamplerAdvanced": ("noise_seed",), "CLIPTextEncode": ("text",),
                  "CLIPTextEncodeSD3": ("clip_l", "clip_g", "t5xxl"), "SaveImage": ("filename_prefix",)}
# engine.sample arguments that must be equal for rows to share one sampling call
_SHARED_ARGS = ("steps", "cfg", "sampler_name", "scheduler", "denoise", "disable_noise", "start_step",
                "last_step", "force_full_denoise")


class NotBatchable(SD35Error):
    """The prompts' sampler inputs cannot share one sampling call (reason in the message)."""


def sampler_node(prompt: dict) -> str | None:
    """The id of the prompt's one KSampler / KSamplerAdvanced; None when there are none or several."""
    found = [nid for nid, n in prompt.items() if n.get("class_type") in SAMPLER_CLASSES]
    return found[0] if len(found) == 1 else None


def batch_key(prompt: dict) -> str | None:
    """Prompts with equal keys may share one sampling batch: the same graph with the same inputs
    except texts, seeds and filename prefixes, one sampler, and a deterministic sampler.
    None = never batched."""
    nid = sampler_node(prompt)
    if nid is None or prompt[nid].get("inputs", {}).get("sampler_name") not in BATCHABLE_SAMPLERS:
        return None
    canonical = {}
    for i, node in prompt.items():
        drop = VARYING_INPUTS.get(node.get("class_type"), ())
        canonical[i] = [node.get("class_type"), {k: v for k, v in node.get("inputs", {}).items() if k not in drop}]
    return json.dumps(canonical, sort_keys=True, default=str)


# ---- sampling several prompts at once ---------------------------------------------------------
def _conds(args: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sd35fp8.sampling import Conditioning
    from sd35fp8.workflow.engine import conditioning_of

    cond, ucond = conditioning_of(args["positive"], "positive"), conditioning_of(args["negative"], "negative")
    if not isinstance(cond, Conditioning) or not isinstance(ucond, Conditioning):  # a CondSet: its own passes
        raise NotBatchable("combined or timestep-ranged conditioning is not batched across prompts")
    return cond.context, cond.pooled, ucond.context, ucond.pooled  # [1, L, C], [1, P] each


def _batch_coupled(model: Any) -> str | None:
    """The MODEL's sampling patch whose arithmetic spans the batch (a mean or std over all rows, as ComfyUI's
    node computes it), or None: Mahiro's similarity mean, SkipLayerGuidanceDiT's rescaling std."""
    if getattr(model, "step_cache", None) is not None:  # its skips are decided on the batch's first rows
        return model.step_cache.kind
    for entry in getattr(model, "post_cfg", ()):
        if entry[0] == "mahiro":
            return "Mahiro"
        if entry[0] == "slg" and len(entry) > 1 and getattr(entry[1], "rescale", 0) != 0:
            return "SkipLayerGuidanceDiT's rescaling_scale"
    return None


def check_batchable(calls: Sequence[dict]) -> None:
    """Raise NotBatchable unless the engine.sample arguments differ only in seed and conditioning."""
    first = calls[0]
    for c in calls:
        if c["sampler_name"] not in BATCHABLE_SAMPLERS:
            raise NotBatchable(f"sampler {c['sampler_name']!r} draws per-step noise from one seed")
        if "batch_index" in c["latent"]:
            raise NotBatchable("latents with batch_index are not batched")
        if c["latent"].get("noise_mask") is not None:
            raise NotBatchable("latents with a noise_mask (inpainting) are not batched")
        if any(extra.get("control") is not None for key in ("positive", "negative") for _, extra in c[key]):
            raise NotBatchable("ControlNet conditionings are not batched across prompts")
        if c["model"] is not first["model"]:
            raise NotBatchable("the prompts use different model objects")
        if (coupled := _batch_coupled(c["model"])) is not None:
            raise NotBatchable(f"{coupled} reads the whole batch: prompts batched together would change each other")
        for name in _SHARED_ARGS:
            if c.get(name) != first.get(name):
                raise NotBatchable(f"sampler input {name} differs ({first.get(name)!r} vs {c.get(name)!r})")
        a, b = first["latent"]["samples"], c["latent"]["samples"]
        if a.shape != b.shape or not torch.equal(a, b):
            raise NotBatchable("the prompts' latent images differ")


def sample_group(ctx: Any, calls: Sequence[dict], progress: Sequence[Callable[..., None]],
                 check_interrupt: Callable[[], None]) -> list[dict[str, torch.Tensor]]:
    """One sampling call (the generation core's `sample_rows`: each prompt's rows with the noise it
    draws alone) for prompts whose contexts have equal shapes -> each call's {"samples"} (CPU)."""
    from sd35fp8 import generation, sampling
    from sd35fp8.workflow.engine import fix_empty_latent_channels, lora_active, sample_settings

    first = calls[0]
    rows = []
    for c in calls:
        cond, pooled, ucond, upooled = _conds(c)  # [1, L, C], [1, P]
        rows.append(generation.Rows(latent=fix_empty_latent_channels(c["latent"]["samples"]), seed=c["seed"],
                                    cond=sampling.Conditioning(cond, pooled),
                                    uncond=sampling.Conditioning(ucond, upooled),
                                    add_noise=not c.get("disable_noise")))
    settings = sample_settings(first["model"], first["steps"], first["cfg"], first["sampler_name"],
                               first["scheduler"], first.get("denoise", 1.0), first.get("start_step"),
                               first.get("last_step"), first.get("force_full_denoise", False))

    ends = torch.tensor([r.latent.shape[0] for r in rows]).cumsum(0).tolist()  # each call's rows of the batch

    def callback(step: int, total: int, denoised: torch.Tensor) -> None:  # denoised [sum B_i, 16, h, w]
        for p, start, end in zip(progress, [0, *ends[:-1]], ends):
            p(step, total, denoised[start:end])

    with lora_active(first["model"]):  # one model object per batch (check_batchable): one LoRA set
        outs = generation.sample_rows(first["model"].mmdit, rows, settings, device=torch.device(ctx.device),
                                      dtype=ctx.dtype, callback=callback, interrupt=check_interrupt)
    if outs[0] is rows[0].latent:  # nothing left to sample: each prompt gets its latent back, as engine.sample
        return [dict(c["latent"]) for c in calls]
    return [{**c["latent"], "samples": part} for c, part in zip(calls, outs)]  # the LATENT's other keys stay


def _context_shapes(args: dict) -> tuple:
    cond, pooled, ucond, upooled = _conds(args)
    return tuple(tuple(t.shape[1:]) for t in (cond, pooled, ucond, upooled))


# ---- executing a batch ------------------------------------------------------------------------
class _BatchInterrupt(Exception):
    def __init__(self, prompt_ids: set[str]):
        self.prompt_ids = prompt_ids


def execute_batch(ex: Any, jobs: Sequence[PromptJob],
                  on_result: Callable[[int, ExecutionResult], None] | None = None) -> list[ExecutionResult]:
    """Run `jobs`; see the module docstring. Validation errors raise before anything runs, like
    `execute`. `on_result(index, result)` as soon as a prompt is finished."""
    runs = [PromptRun(ex, j.prompt, j.prompt_id, j.extra_data, j.hooks, j.execute_outputs, batched=True)
            for j in jobs]
    ex._start_interrupts(j.prompt_id for j in jobs)
    for run in runs:
        try:
            run.begin()
        except SD35Error as e:
            run.fail_early(e)
    ex.drop_cache_except(set().union(*(r.wanted for r in runs if not r.stopped)))
    for run in runs:
        if not run.stopped:
            run.announce_cached()
    results: list[ExecutionResult | None] = [None] * len(runs)

    def finish(i: int) -> None:
        results[i] = runs[i].finish()
        if on_result is not None:
            on_result(i, results[i])

    with torch.inference_mode():
        samplers = {i: sampler_node(r.prompt) for i, r in enumerate(runs)}
        for i, run in enumerate(runs):  # 1. upstream of the sampler, per prompt
            nid = samplers[i]
            if run.stopped or nid is None or nid not in run.order:
                continue
            for n in run.order[: run.order.index(nid)]:
                if not run.step(n):
                    break
        group = [i for i, r in enumerate(runs) if not r.stopped and samplers[i] in r.order
                 and not r.cached(samplers[i])]
        _sample_together(ex, [runs[i] for i in group], [samplers[i] for i in group])
        for i, run in enumerate(runs):  # 3. the rest (downstream nodes; whole prompts that were not batched)
            for n in run.order:
                if n in run.visited:
                    continue
                if not run.step(n):
                    break
            finish(i)
    return [r for r in results if r is not None]


def _sample_together(ex: Any, runs: list[PromptRun], nids: list[str]) -> None:
    """Step 2: the sampler nodes of `runs` in as few exact sampling calls as possible. A prompt
    that fits no group is left for step 3 (where it samples alone and reports its own errors)."""
    if len(runs) < 2 or not all(hasattr(ex.classes[r.prompt[n]["class_type"]], "sample_args")
                                for r, n in zip(runs, nids)):
        return
    calls: list[dict] = []
    inputs: list[dict] = []
    groups: list[tuple[tuple, list[int]]] = []  # (context shapes, members); members[0] is the reference
    for k, (run, nid) in enumerate(zip(runs, nids)):
        inputs.append(run.inputs(nid))
        if any(isinstance(v, NodeList) for v in inputs[-1].values()):  # sampled once per item: step 3
            log.info("prompt %s samples alone: its sampler maps over a list", run.prompt_id)
            calls.append({})
            continue
        calls.append(ex.classes[run.prompt[nid]["class_type"]].sample_args(**inputs[-1]))
        try:
            check_batchable([calls[k]])
            shapes = _context_shapes(calls[k])
        except SD35Error as e:  # NotBatchable, or bad conditioning: step 3 samples it alone and reports it
            log.info("prompt %s samples alone: %s", run.prompt_id, e)
            continue
        for g_shapes, members in groups:
            try:
                if g_shapes == shapes:
                    check_batchable([calls[members[0]], calls[k]])
                    members.append(k)
                    break
            except NotBatchable:
                continue
        else:
            groups.append((shapes, [k]))
    for _, members in groups:
        _run_group(ex, runs, nids, inputs, calls, members)


def _run_group(ex: Any, runs: list[PromptRun], nids: list[str], inputs: list[dict], calls: list[dict],
               members: list[int]) -> None:
    if len(members) < 2:
        return  # samples alone in step 3
    ids = {runs[k].prompt_id: k for k in members}

    def check_interrupt() -> None:
        if ex.interrupt_pending():
            hit = ex.interrupted_among(ids)
            if hit:
                raise _BatchInterrupt(hit)

    live = list(members)
    for k in live:
        runs[k].executing(nids[k])
    while len(live) > 1:
        first = runs[live[0]]
        ctx = ex.node_context(nids[live[0]], first.prompt_id, first.send)
        progress = [ex.node_context(nids[k], runs[k].prompt_id, runs[k].send,
                                    preview=partial(runs[k].preview, nids[k])).progress for k in live]
        try:
            outs = sample_group(ctx, [calls[k] for k in live], progress, check_interrupt)
        except _BatchInterrupt as stop:
            for k in [k for k in live if runs[k].prompt_id in stop.prompt_ids]:
                runs[k].interrupted(nids[k])
            live = [k for k in live if not runs[k].stopped]
            continue  # the rest sample again without them
        except InterruptProcessing:
            for k in live:
                runs[k].interrupted(nids[k])
            return
        except Exception as e:  # noqa: BLE001 - the node error boundary, as PromptRun.step: reported per prompt
            for k in live:
                runs[k].fail(nids[k], e, inputs[k])
            return
        for k, out in zip(live, outs):
            runs[k].result.sampled_with = len(live)
            runs[k].store(nids[k], (out,), None)
        log.info("sampled %d prompts as one batch", len(live))
        return
