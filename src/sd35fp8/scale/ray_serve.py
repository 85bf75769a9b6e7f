"""Engine replicas on Ray Serve behind the ComfyUI (and OpenAI) API.

    app = create_ray_app("ComfyUI/models", "ComfyUI/output", replicas=2)   # then serve it with uvicorn
    # or, on a cluster where `serve deploy deploy/ray_serve.yaml` started the engines:
    app = create_ray_app("ComfyUI/models", "ComfyUI/output", ray_address="auto", attach=True)

Layout: the front server (this process) keeps the one PromptQueue, history, WebSocket hub, /view and
uploads; Ray Serve runs the `SD35Engine` deployment (replica.EngineReplica: one PromptExecutor per
replica, `num_gpus=1` each when there are GPUs, CPU replicas otherwise) and does the routing, health
checks, restarts and autoscaling. `workers` front threads (default: the most replicas) each take a
prompt (or a cross-prompt batch) from the queue and send it through the deployment handle, so at most
`workers` prompts are with Ray at once and the rest wait in the queue (POST /prompt answers 429 when
it is full); `max_ongoing_requests` (default 1: a replica samples one batch at a time) bounds each
replica, `max_queued_requests` the handle's own queue (a BackPressureError reports the prompt failed).
Autoscaling (`min_replicas`..`max_replicas`) follows Ray Serve's ongoing requests per replica, i.e. the
prompts the front threads have handed over: the queue length up to `workers`.

Events stream back from the replica (a Ray Serve streaming call) into the worker's hooks, so history,
progress and WebSocket messages are the same as in one process, whichever replica ran the prompt; the
images come back as bytes and are stored in the front server's output folder under fresh names. A
replica that dies mid-prompt makes the call raise: its prompts are reported with `execution_error`
(history status "error"), never dropped, and Ray Serve starts a new replica.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from sd35fp8.errors import InputError, SD35Error
from sd35fp8.scale.replica import FILE_TYPES, FILES_KEY, EngineReplica
from sd35fp8.workflow import ModelFolders
from sd35fp8.workflow.engine import save_image_path
from sd35fp8.workflow.executor import ExecutionResult, PromptJob, early_error
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS

log = logging.getLogger(__name__)

APP_NAME = "sd35fp8"
# create_app options that are the replicas' PromptExecutor options (create_app uses them only for its own executor)
REPLICA_ENGINE_OPTIONS = ("attention", "cache_threshold", "preview_method", "preview_size")
DEPLOYMENT_NAME = "SD35Engine"


class ReplicaError(SD35Error):
    """The engine replica refused a batch before running it (the worker then runs the prompts alone)."""


def engine_deployment(replicas: int = 1, *, num_gpus: float | None = None, num_cpus: float = 1,
                      min_replicas: int | None = None, max_replicas: int | None = None,
                      max_ongoing_requests: int = 1, max_queued_requests: int = -1,
                      health_check_period_s: float = 10.0, health_check_timeout_s: float = 30.0):
    """The Ray Serve deployment of EngineReplica. num_gpus None = 1 when this machine has CUDA, else 0.
    min/max_replicas turn on autoscaling (target: one ongoing prompt per replica)."""
    from ray import serve

    gpus = num_gpus if num_gpus is not None else (1 if torch.cuda.is_available() else 0)
    opts: dict[str, Any] = {
        "name": DEPLOYMENT_NAME, "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests, "health_check_period_s": health_check_period_s,
        "health_check_timeout_s": health_check_timeout_s, "graceful_shutdown_timeout_s": 5,
        "ray_actor_options": {"num_gpus": gpus, "num_cpus": num_cpus},
    }
    if min_replicas is not None or max_replicas is not None:
        lo = min_replicas if min_replicas is not None else 1
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": max(lo, max_replicas or lo),
                                      "target_ongoing_requests": 1, "upscale_delay_s": 5, "downscale_delay_s": 60}
    else:
        opts["num_replicas"] = replicas
    return serve.deployment(**opts)(EngineReplica)


def build_app(args: dict) -> Any:
    """Ray Serve application builder for `serve run` / `serve deploy` config files:

        applications: [{name: sd35fp8, import_path: "sd35fp8.scale.ray_serve:build_app",
                        args: {models_dir: /models, replicas: 2}}]
    args: models_dir (required), replicas, num_gpus, min_replicas, max_replicas, max_ongoing_requests,
    max_queued_requests, device, input_dir, extra_model_paths, compile, offload, and the replicas' other
    executor options (REPLICA_ENGINE_OPTIONS: attention, cache_threshold, preview_method, preview_size)."""
    args = dict(args)
    models_dir = args.pop("models_dir")
    ctor = {k: args.pop(k) for k in ("device", "input_dir", "extra_model_paths", "compile", "offload") if k in args}
    engine = {k: args.pop(k) for k in REPLICA_ENGINE_OPTIONS if k in args}
    if engine:
        ctor["engine"] = engine
    return engine_deployment(**args).bind(models_dir, **ctor)


class RemoteExecutor:
    """PromptExecutor's interface (execute, execute_batch, interrupt, clear_cache, folders, classes,
    device) over the Ray Serve deployment handle."""

    def __init__(self, handle: Any, folders: ModelFolders):
        self.handle = handle
        self.folders = folders
        self.classes = dict(NODE_CLASS_MAPPINGS)
        self.device = torch.device("cpu")  # the front server's own (system_stats); the engines are on Ray
        self.options: dict = {}
        self._lock = threading.Lock()
        self._running: dict[str, Any] = {}  # prompt id -> its streaming response
        self._names: dict[tuple, dict] = {}  # (replica id, type, subfolder, filename) -> stored image entry

    # ---- control ------------------------------------------------------------------------------
    def interrupt(self, prompt_id: str | None = None) -> None:
        """Cancel the prompt's call (the replica interrupts it); None = every running prompt."""
        with self._lock:
            calls = list(self._running.values()) if prompt_id is None else [self._running.get(prompt_id)]
        for call in calls:
            if call is not None:
                call.cancel()

    def clear_cache(self) -> None:
        """POST /free: replicas keep their models (Ray Serve owns their lifetime)."""

    # ---- images -------------------------------------------------------------------------------
    def _store(self, replica: str, ui: dict) -> dict:
        """A replica's ui dict -> the same with its images written here under fresh names."""
        files = ui.get(FILES_KEY, {})
        out = {k: v for k, v in ui.items() if k != FILES_KEY}
        if not isinstance(out.get("images"), list):
            return out
        images = []
        for img in out["images"]:
            key = (img.get("type"), img.get("subfolder", ""), img.get("filename"))
            if key[0] not in FILE_TYPES:
                images.append(img)
                continue
            with self._lock:
                stored = self._names.get((replica, *key))
                if stored is None:
                    if key not in files:
                        raise ReplicaError(f"replica {replica} did not send the bytes of {key}")
                    root = self.folders.output_dir if key[0] == "output" else self.folders.temp_dir
                    stem = key[2].rsplit("_", 2)[0]  # "<base>_<counter>_.png" -> "<base>"
                    folder, base, counter, subfolder = save_image_path(os.path.join(key[1], stem), Path(root))
                    name = f"{base}_{counter:05}_.png"
                    (folder / name).write_bytes(files[key])
                    stored = {**img, "filename": name, "subfolder": subfolder}
                    self._names[(replica, *key)] = stored
            images.append(stored)
        out["images"] = images
        return out

    # ---- running ------------------------------------------------------------------------------
    def execute(self, prompt: dict, prompt_id: str = "", extra_data: dict | None = None, hooks: Any = None,
                execute_outputs: list[str] | None = None) -> ExecutionResult:
        return self._run([PromptJob(prompt, prompt_id, extra_data, hooks, execute_outputs)])[0]

    def execute_batch(self, jobs: list[PromptJob], on_result: Any = None) -> list[ExecutionResult]:
        return self._run(list(jobs), on_result)

    def _run(self, jobs: list[PromptJob], on_result: Any = None) -> list[ExecutionResult]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException, RequestCancelledError

        specs = [{"prompt": j.prompt, "prompt_id": j.prompt_id, "extra_data": j.extra_data,
                  "execute_outputs": j.execute_outputs} for j in jobs]
        hooks = [j.hooks or (lambda e, d: None) for j in jobs]
        results: dict[int, ExecutionResult] = {}

        def done(i: int, r: ExecutionResult) -> None:
            results[i] = r
            if on_result is not None:
                on_result(i, r)

        call = self.handle.options(stream=True).run.remote(specs)
        with self._lock:
            self._running.update({j.prompt_id: call for j in jobs})
        try:
            for item in call:
                kind, i = item[0], item[1]
                if kind == "event":
                    _, _, event, data, replica = item
                    if event == "executed" and isinstance(data.get("output"), dict):
                        data = {**data, "output": self._store(replica, data["output"])}
                    hooks[i](event, data)
                elif kind == "result":
                    _, _, r, replica = item
                    done(i, ExecutionResult(
                        prompt_id=r["prompt_id"], success=r["success"], error=r["error"], interrupted=r["interrupted"],
                        sampled_with=r["sampled_with"],
                        outputs={nid: self._store(replica, ui) for nid, ui in r["outputs"].items()}))
                else:  # "raised": refused before running
                    raise ReplicaError(item[2])
        except (RayError, RayServeException) as ex:
            cancelled = isinstance(ex, RequestCancelledError)
            log.warning("engine call for %s %s: %s", [j.prompt_id for j in jobs],
                        "cancelled" if cancelled else "failed", ex)
            for i, job in enumerate(jobs):
                if i in results:
                    continue
                if cancelled:
                    hooks[i]("execution_interrupted", {"prompt_id": job.prompt_id, "node_id": None, "node_type": None,
                                                       "executed": [], "timestamp": early_error("", ex)["timestamp"]})
                else:
                    hooks[i]("execution_error", early_error(job.prompt_id, RuntimeError(
                        f"engine replica failed ({type(ex).__name__}): {ex}")))
                hooks[i]("executing", {"node": None, "prompt_id": job.prompt_id})
                done(i, ExecutionResult(prompt_id=job.prompt_id, success=False, interrupted=cancelled))
        finally:
            with self._lock:
                for j in jobs:
                    self._running.pop(j.prompt_id, None)
        return [results[i] for i in range(len(jobs))]




def start_engines(models_dir: str | os.PathLike, *, replicas: int = 1, ray_address: str | None = None,
                  attach: bool = False, app_name: str = APP_NAME, input_dir: str | os.PathLike | None = None,
                  device: str | None = None, extra_model_paths: str | os.PathLike | None = None,
                  compile: bool | None = None, offload: str = "none", engine: dict | None = None,
                  **deployment: Any) -> Any:
    """Connect to (or start) Ray, run the engine deployment (or attach to a deployed one); its handle.
    compile / offload: every replica's engine options (EngineReplica); engine: its other PromptExecutor
    options (attention, cache_threshold, preview_method, preview_size); with attach the deployed config's
    args decide, and giving compile / offload here is an InputError."""
    import ray
    from ray import serve

    if attach and (compile is not None or offload != "none"):
        raise InputError(f"compile={compile}, offload={offload!r} with attach: the replicas were started by "
                         "`serve deploy`; put compile / offload in that config's args (deploy/ray_serve.yaml)")
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
    if attach:
        return serve.get_app_handle(app_name)
    serve.start(proxy_location="Disabled")
    ctor = {"input_dir": str(input_dir) if input_dir is not None else None, "device": device,
            "extra_model_paths": str(extra_model_paths) if extra_model_paths is not None else None,
            "compile": compile, "offload": offload, "engine": dict(engine or {})}
    app = engine_deployment(replicas, **deployment).bind(str(models_dir), **ctor)
    return serve.run(app, name=app_name, route_prefix=None)


def create_ray_app(models_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None, *,
                   replicas: int = 1, workers: int | None = None, ray_address: str | None = None,
                   attach: bool = False, app_name: str = APP_NAME, input_dir: str | os.PathLike | None = None,
                   temp_dir: str | os.PathLike | None = None, device: str | None = None,
                   extra_model_paths: str | os.PathLike | None = None, deployment: dict | None = None,
                   compile: bool | None = None, offload: str = "none", **app_kwargs: Any) -> Any:
    """The ComfyUI (+ OpenAI) FastAPI app with its prompts run by Ray Serve replicas.
    compile / offload: the replicas' engine options (`sd35fp8 serve --compile --offload`).
    app_kwargs go to server.create_app (max_queue, auth_token, max_batch, ...)."""
    from sd35fp8.server import create_app
    from sd35fp8.server.worker import PromptWorker

    folders = ModelFolders(models_dir, output_dir=output_dir, input_dir=input_dir, temp_dir=temp_dir,
                           extra_config=extra_model_paths)
    deployment = dict(deployment or {})
    engine = {k: app_kwargs[k] for k in REPLICA_ENGINE_OPTIONS if k in app_kwargs}  # the replicas' executors'
    handle = start_engines(models_dir, replicas=replicas, ray_address=ray_address, attach=attach, app_name=app_name,
                           input_dir=folders.input_dir, device=device, extra_model_paths=extra_model_paths,
                           compile=compile, offload=offload, engine=engine, **deployment)
    executor = RemoteExecutor(handle, folders)
    app = create_app(models_dir, executor=executor, **app_kwargs)
    main = app.state.worker
    n = workers if workers is not None else max(replicas, deployment.get("max_replicas") or 0, 1)
    extra = [PromptWorker(app.state.queue, executor, main.send, max_batch=main.max_batch,
                          batch_wait_ms=main.batch_wait_ms) for _ in range(n - 1)]
    for w in extra:
        w.current, w.batch_stats = main.current, main.batch_stats  # one map for WebSocket resumes, one count
    app.state.extra_workers, app.state.ray_handle = extra, handle
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any):
        async with inner(a):
            for w in extra:
                w.start()
            try:
                yield
            finally:
                for w in extra:
                    w.stop(timeout=0)

    app.router.lifespan_context = lifespan
    return app


def shutdown(app_name: str = APP_NAME) -> None:
    """Delete the engine application (its replicas) and leave Ray."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    serve.delete(app_name)
    ray.shutdown()
