"""Run a validated API-format prompt: only what feeds the outputs, in order, with a cache.

Cache: each node gets a key = hash(class_type, literal inputs, upstream keys + slots, IS_CHANGED).
Outputs are kept by key between prompts, so a prompt that only changes KSampler's seed re-runs
KSampler and what is downstream of it: no checkpoint reload, no text re-encode. Entries whose key
is not in the new prompt are dropped before it runs (frees the old models first, as ComfyUI does).

Events go to `hooks(event, data)` with ComfyUI's websocket names and payloads:
execution_start, execution_cached, executing, progress, executed, execution_success,
execution_error, execution_interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from sd35fp8.errors import CheckpointError, InputError
from sd35fp8.workflow.batch import execute_batch
from sd35fp8.workflow.engine import EngineOptions
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.graph import is_link, parse_prompt
from sd35fp8.work_budget import WorkMeter, metered
from sd35fp8.workflow.lists import call_mapped
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, Node, NodeContext
from sd35fp8.workflow.previews import DEFAULT_PREVIEW_SIZE, TAESD_DECODER_NAME, StepPreview, check_method
from sd35fp8.workflow.prompt_run import (  # noqa: F401 - re-exported: the executor's public values
    ExecutionResult, Hooks, InterruptProcessing, PromptJob, PromptRun, PromptValidationError, early_error,
    explain_error, format_value)

log = logging.getLogger(__name__)

class PromptExecutor:
    """Executes prompts against one models folder on one device; keeps the output cache."""

    sends_previews = True  # False where nobody hears this executor's events (a follower rank of scale/gpus.py)

    def __init__(self, folders: ModelFolders, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 classes: Mapping[str, type[Node]] | None = None, options: dict[str, Any] | None = None, *,
                 compile: bool | None = None, offload: str = "none", attention: str = "auto",
                 cache_threshold: float = 0.0, preview_method: str = "none",
                 preview_size: int = DEFAULT_PREVIEW_SIZE):
        """compile: torch.compile the MMDiT engine's step (None: the device's default for a long-running
        executor, fast.default_compile: on for CUDA); offload: "none" | "model" (MMDiT resident, text
        encoders and VAE visit the device) | "sequential" (MMDiT blocks streamed too). Loaders build
        every MMDiT through sd35fp8.fast.build_engine with these (NodeContext.engine_options).
        attention: build_engine's auto | fp8 | bf16; cache_threshold: step caching for every KSampler
        (sd35fp8.step_cache; 0 = off). preview_method / preview_size: ComfyUI's --preview-method /
        --preview-size, the live previews a sampler sends after each step (workflow/previews.py; a prompt's
        extra_data["preview_method"] overrides the method)."""
        from sd35fp8.fast import OFFLOAD_MODES, default_compile

        self.folders = folders
        self.device = torch.device(device)
        self.dtype = dtype if dtype is not None else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if offload not in OFFLOAD_MODES:
            raise InputError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
        self.offload = offload
        self.compile = default_compile(self.device, offload, serving=True) if compile is None else bool(compile)
        offloader = None
        if offload != "none":
            from sd35fp8.offload import ModelOffload

            offloader = ModelOffload(self.device)
        from sd35fp8.fast.attention import ATTENTION_CHOICES
        from sd35fp8.step_cache import check_threshold

        if attention not in ATTENTION_CHOICES:
            raise InputError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
        self.engine_options = EngineOptions(compile=self.compile, offload=offload, offloader=offloader,
                                            attention=attention, cache_threshold=check_threshold(cache_threshold))
        self.preview_method = check_method(preview_method)
        self.preview_size = int(preview_size)
        self._taesd: tuple[str | None, Any] | None = None  # (file, decoder or None) once looked for
        self.classes = dict(NODE_CLASS_MAPPINGS if classes is None else classes)
        self.options = dict(options or {})
        self._cache: dict[str, tuple[tuple, dict | None]] = {}  # key -> (outputs, ui)
        self._interrupt = threading.Event()
        self._interrupt_lock = threading.Lock()
        self._interrupt_ids: set[str] | None = None  # None: every running prompt
        # (class_type, input_name, text, node_id) -> text within a token budget; the server sets it
        # (server.prompt_text.TextBudget.limit) so linked texts are bounded too. None: texts as given.
        self.text_limit: Callable[[str, str, str, str], str] | None = None
        # pixel-steps (width x height x batch x steps) one prompt may sample, metered while it runs
        # (sd35fp8.work_budget); the server sets it to its --max-pixel-steps. None: unmetered.
        self.work_budget: int | None = None

    # ---- control ---------------------------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> None:
        """Ask the running prompt(s) to stop at the next node or sampler step. With `prompt_id`,
        a cross-prompt batch stops only that prompt (the others go on); a lone prompt always stops."""
        with self._interrupt_lock:
            if prompt_id is None:
                self._interrupt_ids = None
            elif not self._interrupt.is_set():
                self._interrupt_ids = {prompt_id}
            elif self._interrupt_ids is not None:
                self._interrupt_ids.add(prompt_id)
            self._interrupt.set()

    def clear_cache(self) -> None:
        self._cache.clear()

    def _clear_interrupt(self) -> None:
        with self._interrupt_lock:
            self._interrupt.clear()
            self._interrupt_ids = None

    def _start_interrupts(self, prompt_ids: Iterable[str]) -> None:
        """Prompts start: drop the pending interrupt requests, except those naming one of these prompts
        (a server sends them by id: one that came while the prompt waited in the batch window stops it)."""
        with self._interrupt_lock:
            keep = set() if self._interrupt_ids is None else self._interrupt_ids & set(prompt_ids)
            if keep:
                self._interrupt_ids = keep
            else:
                self._interrupt.clear()
                self._interrupt_ids = None

    def interrupt_pending(self) -> bool:
        """Whether an interrupt request waits (for any prompt); a batch then asks `interrupted_among`."""
        return self._interrupt.is_set()

    def _check_interrupt(self) -> None:
        if self._interrupt.is_set():
            self._clear_interrupt()
            raise InterruptProcessing("Processing interrupted")

    def interrupted_among(self, prompt_ids: Iterable[str]) -> set[str]:
        """Consume and return the pending interrupt requests that hit any of `prompt_ids`."""
        ids = set(prompt_ids)
        with self._interrupt_lock:
            if not self._interrupt.is_set():
                return set()
            if self._interrupt_ids is None:
                hit = ids
                self._interrupt.clear()
            else:
                hit = ids & self._interrupt_ids
                self._interrupt_ids -= hit
                if not self._interrupt_ids:
                    self._interrupt.clear()
                    self._interrupt_ids = None
        return hit

    def _check_interrupt_for(self, prompt_id: str) -> None:
        if self._interrupt.is_set() and self.interrupted_among([prompt_id]):
            raise InterruptProcessing("Processing interrupted")

    # ---- keys ------------------------------------------------------------------------------
    def node_keys(self, prompt: dict, order: Iterable[str]) -> dict[str, str]:
        keys: dict[str, str] = {}
        for nid in order:
            node = prompt[nid]
            cls = self.classes[node["class_type"]]
            parts: dict[str, Any] = {}
            literals = {}
            for name, value in node["inputs"].items():
                if is_link(value):
                    # a link outside the execution order points at no node of the prompt; validation checks
                    # declared inputs only, and an undeclared one is ignored when the node runs (_gather_inputs)
                    parts[name] = ["link", keys.get(str(value[0]), f"missing:{value[0]}"), value[1]]
                else:
                    parts[name] = ["value", value]
                    literals[name] = value
            changed = cls.IS_CHANGED(self.folders, **literals)
            blob = json.dumps([node["class_type"], parts, format_value(changed)], sort_keys=True, default=str)
            keys[nid] = hashlib.sha256(blob.encode()).hexdigest()
        return keys

    def drop_cache_except(self, wanted: set[str]) -> None:
        """Free cached outputs no running prompt needs (old models first, as ComfyUI does)."""
        for k in [k for k in self._cache if k not in wanted]:
            del self._cache[k]

    # ---- warm-up ---------------------------------------------------------------------------
    def warmup(self, prompt: dict, shapes: Sequence[tuple[int, int, int]] | None = None) -> float:
        """Prepare for the first queued prompt, e.g. at server start-up: run `prompt`'s loader nodes (the
        nodes that output a MODEL, CLIP or VAE; their outputs stay in the cache, so a later prompt with
        the same loaders reuses them without loading again), compile / capture each MMDiT engine for
        every (width, height, images per prompt) in `shapes` (None: the sizes of the prompt's
        empty-latent nodes; CFG and the model's skip-layer-guidance pass as the sampler calls them),
        and run each text encoder on a dummy text and each VAE decode on a zero latent of those sizes
        (first-use kernel set-up; nothing of that is cached). Returns the seconds spent, loading included."""
        from sd35fp8.workflow import engine as nodes_engine

        t0 = time.perf_counter()
        parsed = parse_prompt(prompt)
        kinds = ("MODEL", "CLIP", "VAE")
        loaders = [nid for nid, node in parsed.items()
                   if any(t in kinds for t in self.classes[node["class_type"]].RETURN_TYPES)]
        if not any("MODEL" in self.classes[parsed[nid]["class_type"]].RETURN_TYPES for nid in loaders):
            raise InputError("warm-up: the prompt has no node that outputs a MODEL")
        if shapes is None:
            shapes = [(int(n["inputs"]["width"]), int(n["inputs"]["height"]), int(n["inputs"].get("batch_size", 1)))
                      for n in parsed.values() if n["class_type"] in ("EmptySD3LatentImage", "EmptyLatentImage")
                      and not any(is_link(n["inputs"].get(k)) for k in ("width", "height", "batch_size"))]
        shapes = list(shapes)
        run = PromptRun(self, parsed, "warmup", execute_outputs=loaders)
        run.begin()
        with torch.inference_mode():
            for nid in run.order:
                if not run.step(nid):
                    break
        result = run.finish()
        if not result.success:
            raise InputError(f"warm-up: loading the models failed: {result.error}")
        with torch.inference_mode():
            for nid in loaders:
                outputs, _ = self._cache[run.keys[nid]]
                for kind, value in zip(self.classes[parsed[nid]["class_type"]].RETURN_TYPES, outputs):
                    if kind == "MODEL" and value is not None:
                        value.mmdit.warmup(shapes)  # a loader's MODEL: no sampling patches (SLG) yet
                    elif kind == "CLIP" and value is not None:
                        nodes_engine.encode_text(value, "warm-up")
                    elif kind == "VAE" and value is not None:
                        for width, height, batch in shapes:  # the batch as VAEDecode gets it (one compiled
                            # decoder graph per latent shape on the compiled road, models/vae.py compile_decoder)
                            latent = {"samples": torch.zeros(batch, nodes_engine.SD3_LATENT_CHANNELS, height // 8,
                                                             width // 8)}
                            nodes_engine.vae_decode(value, latent, self.engine_options.offloader)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        log.info("executor warm-up (%s, shapes %s): %.1f s", ", ".join(loaders), shapes, seconds)
        return seconds

    # ---- run -------------------------------------------------------------------------------
    def execute(self, prompt: dict, prompt_id: str = "", extra_data: dict | None = None,
                hooks: Hooks | None = None, execute_outputs: list[str] | None = None) -> ExecutionResult:
        """Run the prompt. Validates first unless execute_outputs (from validate_prompt) is given."""
        run = PromptRun(self, prompt, prompt_id, extra_data, hooks, execute_outputs)
        self._start_interrupts([prompt_id])
        run.begin()
        self.drop_cache_except(run.wanted)
        run.announce_cached()
        with torch.inference_mode(), metered(self._meter(1)):
            for nid in run.order:
                if not run.step(nid):
                    break
        return run.finish()

    def execute_batch(self, jobs: Sequence[PromptJob],
                      on_result: Callable[[int, ExecutionResult], None] | None = None) -> list[ExecutionResult]:
        """Run several prompts, sampling the compatible ones as one batch (workflow/batch.py): their sampling
        runs share the sum of their budgets (a prompt run alone inside gets its own meter)."""
        with metered(self._meter(len(jobs))):
            return execute_batch(self, jobs, on_result)

    def _meter(self, prompts: int) -> WorkMeter | None:
        """A fresh meter of `prompts` x work_budget pixel-steps (sd35fp8.work_budget); None without a budget."""
        return None if self.work_budget is None else WorkMeter(int(self.work_budget) * max(int(prompts), 1))

    def _gather_inputs(self, prompt: dict, nid: str, keys: dict[str, str], extra_data: dict) -> dict[str, Any]:
        node = prompt[nid]
        spec = self.classes[node["class_type"]].INPUT_TYPES(self.folders)
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        out: dict[str, Any] = {}
        for name, value in node["inputs"].items():
            if name not in declared:
                continue  # ComfyUI ignores inputs the node does not declare
            if is_link(value):
                outputs, _ = self._cache[keys[str(value[0])]]
                out[name] = outputs[value[1]]
            else:
                out[name] = value
        for name, kind in spec.get("hidden", {}).items():
            if kind == "PROMPT":
                out[name] = prompt
            elif kind == "EXTRA_PNGINFO" and "extra_pnginfo" in extra_data:
                out[name] = extra_data["extra_pnginfo"]
            elif kind == "UNIQUE_ID":
                out[name] = nid
        return out

    def taesd_decoder(self) -> Any:
        """The TAESD decoder for "taesd" previews: the first models/vae_approx file named taesd3_decoder*
        (ComfyUI's lookup), on the executor's device; None (a warning, once) when there is none or it does not
        load, and previews fall back to latent2rgb. Looked for again when the folder's file list changes."""
        names = [n for n in self.folders.get_filename_list("vae_approx") if n.startswith(TAESD_DECODER_NAME)]
        name = names[0] if names else None
        if self._taesd is None or self._taesd[0] != name:
            decoder = None
            if name is None:
                log.warning("taesd previews: no models/vae_approx/%s*; previews use latent2rgb", TAESD_DECODER_NAME)
            else:
                try:
                    from sd35fp8.checkpoints.taesd import load_taesd_decoder

                    decoder = load_taesd_decoder(self.folders.get_full_path("vae_approx", name)).to(
                        self.device, self.dtype)
                except CheckpointError as e:
                    log.warning("taesd previews: %s; previews use latent2rgb", e)
            self._taesd = (name, decoder)
        return self._taesd[1]

    def node_context(self, nid: str, prompt_id: str, send: Hooks,
                     check_interrupt: Callable[[], None] | None = None,
                     preview: Callable[[], StepPreview | None] | None = None) -> NodeContext:
        """preview: makes the node's StepPreview (PromptRun.preview), at its first step: only samplers pay for it."""
        made: list[StepPreview | None] = []

        def progress(value: int, total: int, denoised: torch.Tensor | None = None) -> None:
            send("progress", {"value": int(value), "max": int(total), "prompt_id": prompt_id, "node": nid})
            if preview is None or denoised is None:
                return
            if not made:
                made.append(preview())
            if made[0] is not None:
                made[0](int(value), int(total), denoised,
                        lambda event, data: send(event, {**data, "prompt_id": prompt_id, "node": nid}))

        def image_frame(value: int, total: int, image: bytes, fmt: str) -> None:
            send("progress", {"value": int(value), "max": int(total), "prompt_id": prompt_id, "node": nid})
            send("preview_image", {"image": image, "format": fmt, "prompt_id": prompt_id, "node": nid})

        return NodeContext(folders=self.folders, device=self.device, dtype=self.dtype, node_id=nid,
                           progress=progress, image_frame=image_frame, check_interrupt=check_interrupt or self._check_interrupt,
                           options=self.options, engine_options=self.engine_options,
                           text_limit=self.text_limit)

    def _run_node(self, nid: str, class_type: str, inputs: dict, prompt_id: str, send: Hooks,
                  check_interrupt: Callable[[], None] | None = None,
                  preview: Callable[[], StepPreview | None] | None = None) -> tuple[tuple, dict | None]:
        cls = self.classes[class_type]
        ctx = self.node_context(nid, prompt_id, send, check_interrupt, preview)
        # once, or once per item of its list inputs (ComfyUI's list execution, workflow/lists.py)
        return call_mapped(getattr(cls(ctx), cls.FUNCTION), inputs, cls, f"node {nid} ({class_type})",
                           ctx.check_interrupt)


