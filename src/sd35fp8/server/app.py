"""ComfyUI's HTTP + WebSocket API on FastAPI (server.py's PromptServer routes), every route also under /api.

    app = create_app("ComfyUI/models", "ComfyUI/output")   # then: uvicorn.run(app) or serve.serve()

One worker thread runs the prompts (worker.PromptWorker); its events reach the sockets through
ws.WebSocketHub. Every request body goes through server.validation (strict JSON, pydantic models,
the Limits); prompts are validated at POST time with the workflow validator, so a bad prompt gets
ComfyUI's 400 `{error, node_errors}` and never enters the queue. Access rules (host, origin, token,
body size) are server.security's middleware.
"""

from __future__ import annotations

import os
import platform
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from sd35fp8.errors import InputError
from sd35fp8.server import files
from sd35fp8.server.batching import DEFAULT_BATCH_WAIT_MS, DEFAULT_MAX_BATCH
from sd35fp8.server.frontend import MAX_USERDATA_BYTES, UserStore, frontend_routes, frontend_version, mount_frontend
from sd35fp8.server.health import health_routes
from sd35fp8.server.internal import LogBuffer, internal_routes
from sd35fp8.server.history import ChunksResponse
from sd35fp8.server.jobs import jobs_routes
from sd35fp8.server.journal import Journal
from sd35fp8.server.lifecycle import (
    DEFAULT_HANG_SECONDS, ON_RESTART, RETRY_AFTER_SECONDS, Lifecycle, recover_queue,
)
from sd35fp8.server.metrics import ServerMetrics
from sd35fp8.server.openai_api import openai_routes
from sd35fp8.server.prompt_text import TextBudget
from sd35fp8.server.queue import PromptQueue, QueueFullError
from sd35fp8.server.security import SecurityMiddleware
from sd35fp8.server.templates import template_routes
from sd35fp8.server.tokens import FailureThrottle, Redactor, install_log_redaction, remove_log_redaction
from sd35fp8.server.validation import (
    ClearOrDelete, FreeRequest, InterruptRequest, Limits, PromptRequest, RequestError, canonical_uuid,
    check_prompt_size, check_prompt_work, error_body, error_response, invalid_prompt_id, read_json, read_model,
    validate_model)
from sd35fp8.server.worker import PromptWorker
from sd35fp8.server.ws import WebSocketHub
from sd35fp8.workflow import ModelFolders, PromptExecutor, object_info, parse_prompt, validate_prompt
from sd35fp8.workflow.nodes import node_info
from sd35fp8.workflow.previews import DEFAULT_PREVIEW_SIZE
from sd35fp8.workflow.progress_bars import ProgressBars
from sd35fp8.workflow.run import load_workflow

SERVER_VERSION = "0.1.0"
DEFAULT_MAX_QUEUE = 100
# ComfyUI execution.SENSITIVE_EXTRA_DATA_KEYS: comfy.org credentials a client puts in extra_data (comfykit sends its
# api key so). ComfyUI moves them out of the queue item (GET /queue and /history never show them) for its API
# nodes; this server has none, so they are dropped.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")
STATE_DIR_NAME = "sd35fp8-state"  # state_dir="auto": beside the output folder
DEFAULT_MAX_UPLOAD_BYTES = 100 * 1024 * 1024  # ComfyUI's --max-upload-size default (100 MB)


def _error(type_: str, message: str, details: str = "", status: int = 400, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(type_, message, details, **extra), status_code=status)


def _clear_or_delete(body: ClearOrDelete, wipe, delete) -> Response:
    """ComfyUI's POST /queue and POST /history body: {"clear": true} and/or {"delete": [ids]}."""
    if body.clear:
        wipe()
    for prompt_id in body.delete:
        delete(prompt_id)
    return Response(status_code=200)


def _workflow_warmup(executor: Any, path: str | os.PathLike, shapes: Sequence[tuple[int, int, int]] | None,
                     given: Callable[[], Any] | None) -> Callable[[], Any]:
    """The warm-up callable of `warmup_workflow` (read and parsed here: a bad file fails the start-up)."""
    if given is not None:
        raise InputError("give either warmup (a callable) or warmup_workflow, not both")
    if not callable(getattr(executor, "warmup", None)):
        raise InputError(f"warm-up workflow {path}: this executor ({type(executor).__name__}) cannot warm up; "
                         "with --replicas each replica loads its models on its first prompt")
    prompt, _ = load_workflow(path, executor.folders)
    shapes = [tuple(int(v) for v in s) for s in shapes] if shapes is not None else None

    def warmup() -> float:
        return executor.warmup(prompt, shapes)

    return warmup


def create_app(models_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None,
               input_dir: str | os.PathLike | None = None, temp_dir: str | os.PathLike | None = None,
               device: str | torch.device | None = None, auth_token: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               user_dir: str | os.PathLike | None = None, executor: Any = None,
               extra_model_paths: str | os.PathLike | None = None, loopback: bool = True,
               serve_frontend: bool = True, max_batch: int = DEFAULT_MAX_BATCH,
               batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, limits: Limits | None = None,
               allow_hosts: Iterable[str] = (), cors_origin: str | None = None,
               max_upload_pixels: int = files.DEFAULT_MAX_UPLOAD_PIXELS,
               state_dir: str | os.PathLike | None = None, on_restart: str = "requeue",
               warmup: Callable[[], Any] | None = None, hang_seconds: float = DEFAULT_HANG_SECONDS,
               check_seconds: float = 1.0, compile: bool | None = None, offload: str = "none",
               attention: str = "auto", cache_threshold: float = 0.0, preview_method: str = "none",
               preview_size: int = DEFAULT_PREVIEW_SIZE, warmup_workflow: str | os.PathLike | None = None,
               warmup_shapes: Sequence[tuple[int, int, int]] | None = None,
               console_progress: bool = False) -> FastAPI:
    """Build the app. `executor` replaces the PromptExecutor (tests, or a pre-loaded one).

    compile / offload: the new PromptExecutor's engine options (None = the device's default for a
    server: compiled on CUDA; offload "none" | "model" | "sequential"; attention auto | fp8 | bf16;
    cache_threshold: step caching for every KSampler, 0 = off; preview_method / preview_size: ComfyUI's
    --preview-method / --preview-size, the samplers' live previews over /ws, workflow/previews.py).

    state_dir: the durable queue + history journal (journal.py) lives there; None = memory only;
    "auto" = sd35fp8-state/ beside the output folder (never inside it: /view serves the output folder).
    on_restart: what to do with prompts a previous process left pending or running: "requeue" them
    or "fail" them (an execution_error history entry each). warmup: called once before the worker
    takes its first prompt (/ready is 503 until it returns). warmup_workflow: a workflow file (API or
    UI JSON, or a PNG carrying one; read now, so a bad file stops the start-up) whose models the
    executor loads and warms up (PromptExecutor.warmup) for `warmup_shapes` ((width, height, batch);
    None: the sizes of its empty-latent nodes); it becomes `warmup`. hang_seconds: a busy worker without
    any event for this long is hung and restarted (lifecycle.py); check_seconds: how often to look.

    console_progress: draw a progress bar per prompt and sampler node on stderr (`sd35fp8 serve`;
    workflow.progress_bars.ProgressBars).

    max_batch / batch_wait_ms: cross-prompt batching (batching.py): up to max_batch queued
    prompts that differ only in texts and seeds sample as one batch; a taken prompt waits at most
    batch_wait_ms for more. max_batch=1 disables it. GET /sd35fp8/worker reports the counts.

    device: None = cuda when available, else cpu. auth_token: required on every request when set
    (never shown: /system_stats, the logs and /internal/logs mask it).
    loopback: the server listens on a loopback address (Host must then be a loopback name or one of
    allow_hosts). cors_origin: ComfyUI's --enable-cors-header (CORS headers instead of the origin
    checks). limits: what one request may cost (validation.Limits). max_upload_pixels: the largest
    image an upload may declare.
    """
    limits = limits if limits is not None else Limits()
    if executor is None:
        folders = ModelFolders(models_dir, output_dir=output_dir, input_dir=input_dir, temp_dir=temp_dir,
                               extra_config=extra_model_paths)
        dev = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        executor = PromptExecutor(folders, device=dev, compile=compile, offload=offload, attention=attention,
                                  cache_threshold=cache_threshold, preview_method=preview_method,
                                  preview_size=preview_size)
    folders = executor.folders
    if warmup_workflow is not None:
        warmup = _workflow_warmup(executor, warmup_workflow, warmup_shapes, warmup)
    elif warmup_shapes is not None:
        raise InputError("warm-up shapes need a warm-up workflow (--warmup WORKFLOW.json): its loaders name the models")
    hub = WebSocketHub()
    metrics = ServerMetrics(executor.device)
    if on_restart not in ON_RESTART:
        raise ValueError(f"on_restart must be one of {ON_RESTART}, got {on_restart!r}")
    if state_dir == "auto":
        state_dir = folders.output_dir.parent / STATE_DIR_NAME
    journal = Journal(state_dir) if state_dir is not None else None
    queue = PromptQueue(max_queue=max_queue, journal=journal)
    # client id -> execution_error messages of its prompts failed at start-up (--on-restart fail): no
    # socket was open to hear them; the client's next /ws connection gets them, once
    unheard: dict[str, list[dict]] = {}

    def _unheard(item: list, entry: dict) -> None:
        client_id = item[3].get("client_id")
        if client_id:
            for event, data in entry["status"]["messages"]:
                unheard.setdefault(client_id, []).append({"type": event, "data": data})

    if journal is not None:
        recover_queue(queue, on_restart, metrics, on_failed=_unheard)
    send = ProgressBars(per_prompt=True).wrap(hub.send) if console_progress else hub.send
    worker = PromptWorker(queue, executor, send, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                          metrics=metrics)
    lifecycle = Lifecycle(worker, metrics, warmup=warmup, hang_seconds=hang_seconds, check_seconds=check_seconds)
    queue.on_change = lambda: hub.send("status", {"status": queue_info(queue)}, None)
    store = UserStore(user_dir if user_dir is not None else folders.output_dir.parent / "user")
    features = {"supports_preview_metadata": True, "max_upload_size": max_upload_bytes}
    logs = LogBuffer(hub.send, lambda: hub.client_ids)
    redactor = Redactor([auth_token])
    text_budget = TextBudget(limits.max_prompt_tokens, folders, max_chars=limits.max_text_chars)
    executor.text_limit = text_budget.limit  # linked texts too: the encoder nodes cut what they receive
    executor.work_budget = limits.max_pixel_steps  # what the samplers really do, after check_prompt_work's estimate

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        import asyncio

        hub.bind(asyncio.get_running_loop())
        redaction = install_log_redaction(redactor, [logs])
        logs.attach()
        lifecycle.start()  # warm-up, then the worker; the supervisor
        try:
            yield
        finally:
            lifecycle.stop()
            worker.stop(timeout=0)  # stop taking prompts; serve.stop_app waits for the running one
            logs.detach()
            remove_log_redaction(redaction, [logs])

    app = FastAPI(title="sd35fp8 ComfyUI API", version=SERVER_VERSION, lifespan=lifespan)
    app.state.queue, app.state.worker, app.state.hub, app.state.executor = queue, worker, hub, executor
    app.state.lifecycle, app.state.metrics, app.state.journal = lifecycle, metrics, journal
    app.state.folders, app.state.user_store, app.state.logs = folders, store, logs
    app.state.limits, app.state.redactor, app.state.text_budget = limits, redactor, text_budget

    app.state.max_upload_bytes, app.state.max_upload_pixels = max_upload_bytes, max_upload_pixels

    def body_limit(path: str) -> int:
        if "/upload/" in path or path.rstrip("/").endswith("/images/edits"):
            return max_upload_bytes + files.FORM_OVERHEAD
        if "/userdata/" in path:
            return MAX_USERDATA_BYTES
        return limits.max_body_bytes

    app.add_middleware(SecurityMiddleware, auth_token=auth_token, loopback=loopback, allow_hosts=allow_hosts,
                       cors_origin=cors_origin, body_limit=body_limit, throttle=FailureThrottle())
    input_error_handler(app)

    r = APIRouter()

    @r.websocket("/ws")
    async def ws_endpoint(ws: WebSocket) -> None:
        client_id = ws.query_params.get("clientId")
        resume = []  # ComfyUI server.websocket_handler: a reconnecting client hears the node now executing
        if client_id:
            for item in queue.current_queue()[0]:
                node = worker.current.get(item[1])
                if item[3].get("client_id") == client_id and node is not None:
                    resume.append({"type": "executing", "data": {"node": node, "display_node": node,
                                                                 "prompt_id": item[1]}})
            resume += unheard.pop(client_id, [])  # its prompts the restart failed (--on-restart fail)
        await hub.serve(ws, client_id, {"status": queue_info(queue)}, features, resume)

    # ---- prompts ----------------------------------------------------------------------------
    @r.get("/prompt")
    async def get_prompt() -> dict:
        return queue_info(queue)

    @r.post("/prompt")
    async def post_prompt(request: Request) -> JSONResponse:
        if lifecycle.draining.is_set():
            metrics.rejected.labels("draining").inc()
            response = _error("server_stopping", "The server is stopping", "it accepts no new prompts while it "
                              "finishes the running one; retry on the restarted server", status=503)
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return response
        if queue.full():  # before the body is parsed and validated: a 429 for a retrying flood is cheap
            return _queue_full(queue, metrics, f"the queue is full ({queue.max_queue} prompts waiting); "
                                               "retry later or raise max_queue")
        data = await read_json(request)
        if not isinstance(data, dict) or "prompt" not in data:
            return _error("no_prompt", "No prompt provided", "No prompt provided")
        if isinstance(data["prompt"], dict):
            check_prompt_size(data["prompt"], limits)
        if data.get("prompt_id") is not None and not canonical_uuid(data["prompt_id"]):
            raise invalid_prompt_id()  # ComfyUI's own error type, not the generic invalid_request
        body = validate_model(PromptRequest, data)
        number = queue.next_number(front=bool(body.front), number=body.number)  # ComfyUI: truthy
        prompt = parse_prompt(data["prompt"])
        extra_data = dict(body.extra_data or {})
        if body.client_id is not None:
            extra_data["client_id"] = body.client_id
        for key in SENSITIVE_EXTRA_DATA_KEYS:  # never in /queue, /history, /api/jobs or the journal
            extra_data.pop(key, None)
        extra_data["create_time"] = _now_ms()
        prompt_id = body.prompt_id or str(uuid.uuid4())
        if prompt_id in queue.history(prompt_id) or prompt_id in queue.running_ids() \
                or any(item[1] == prompt_id for item in queue.pending()):
            return _error("duplicate_prompt_id", "prompt_id is already in use",
                          f"a prompt with id {prompt_id} is queued, running or in the history; omit prompt_id "
                          "to let the server make one", prompt_id=prompt_id)
        targets = body.partial_execution_targets
        ok, error, outputs, node_errors = validate_prompt(
            prompt, executor.classes, folders, None if targets is None else [t for t in targets if isinstance(t, str)],
            limits.max_text_chars)
        if not ok:
            return JSONResponse({"error": error, "node_errors": node_errors}, status_code=400)
        check_prompt_work(prompt, limits)
        warnings = text_budget.apply(prompt)  # texts over --max-prompt-tokens are cut, in place
        answer = {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}
        if warnings:  # ComfyUI clients ignore the extra key; the history entry keeps it in extra_data
            answer["warnings"] = extra_data["warnings"] = warnings
        # the answer is rendered before the prompt is queued: a failure here queues nothing
        response = JSONResponse(answer)
        try:
            queue.put([number, prompt_id, prompt, extra_data, outputs])
        except QueueFullError as e:
            return _queue_full(queue, metrics, str(e))
        return response

    # ---- queue, history, interrupt, free ----------------------------------------------------
    # these answer with JSON bytes rendered once per item and cached (queue.queue_json, history.get_json):
    # FastAPI's jsonable_encoder, or a JSONResponse, would walk and render every entry on every read
    @r.get("/queue")
    async def get_queue() -> Response:
        return ChunksResponse(queue.queue_chunks())

    @r.post("/queue")
    async def post_queue(request: Request) -> Response:
        body = await read_model(request, ClearOrDelete, {})
        # the prompts GET /queue lists as pending although they run in the first one's batch (comfy_queue):
        # deleting them, or clearing the queue, stops them, as it keeps a pending prompt from running in ComfyUI
        batched = set(queue.batched_ids())
        for prompt_id in batched if body.clear else batched & set(body.delete):
            worker.interrupt(prompt_id)
        return _clear_or_delete(body, queue.wipe_queue, queue.delete_queue_item)

    @r.get("/history")
    async def get_history(max_items: int | None = None, offset: int = -1) -> Response:
        if max_items is None and offset <= 0:  # the full dump: cached blocks sent one after another
            return ChunksResponse(queue.histories.full_chunks())
        return Response(queue.history_json(max_items=max_items, offset=offset), media_type="application/json")

    @r.get("/history/{prompt_id}")
    async def get_history_item(prompt_id: str) -> Response:
        return Response(queue.history_json(prompt_id), media_type="application/json")

    @r.post("/history")
    async def post_history(request: Request) -> Response:
        return _clear_or_delete(await read_model(request, ClearOrDelete, {}), queue.wipe_history,
                                queue.delete_history_item)

    @r.post("/interrupt")
    async def interrupt(request: Request) -> Response:
        try:
            body = await read_model(request, InterruptRequest, {})
        except RequestError as e:
            if e.status == 415:
                raise
            body = InterruptRequest()  # ComfyUI: a body that is not JSON interrupts whatever runs
        worker.interrupt(body.prompt_id)
        return Response(status_code=200)

    @r.post("/free")
    async def free(request: Request) -> Response:
        body = await read_model(request, FreeRequest, {})
        worker.request_free(body.unload_models, body.free_memory)
        return Response(status_code=200)

    # ---- nodes and system -------------------------------------------------------------------
    @r.get("/object_info")
    async def get_object_info() -> dict:
        return object_info(folders, executor.classes)

    @r.get("/object_info/{node_class}")
    async def get_object_info_node(node_class: str) -> dict:
        cls = executor.classes.get(node_class)
        return {node_class: node_info(node_class, cls, folders)} if cls is not None else {}

    @r.get("/system_stats")
    async def system_stats() -> dict:
        return system_info(executor.device, redactor)

    @r.get("/sd35fp8/worker")
    async def worker_stats() -> dict:
        return {"max_batch": worker.max_batch, "batch_wait_ms": worker.batch_wait_ms, **worker.stats}

    @r.get("/embeddings")
    async def embeddings() -> list:
        return []

    @r.get("/extensions")
    async def extensions() -> list:
        return []  # the frontend package bundles its core extensions; there are no custom nodes

    @r.get("/features")
    async def get_features() -> dict:
        return features

    @r.get("/models")
    async def model_kinds() -> list:
        return list(folders.kinds)

    @r.get("/models/{kind}")
    async def model_files(kind: str) -> Any:
        if kind not in folders.kinds:
            return JSONResponse({"error": f"unknown model folder {kind!r}"}, status_code=404)
        return folders.get_filename_list(kind)

    @r.get("/experiment/models")
    async def experiment_models() -> list:
        return [{"name": k, "folders": [str(p) for p in folders.folders(k)]} for k in folders.kinds]

    @r.get("/experiment/models/{kind}")
    async def experiment_model_files(kind: str) -> Any:
        if kind not in folders.kinds:
            return JSONResponse({"error": f"unknown model folder {kind!r}"}, status_code=404)
        return [{"name": n, "pathIndex": 0} for n in folders.get_filename_list(kind)]

    files.add_routes(r, folders, max_upload_bytes, max_upload_pixels)
    r.include_router(jobs_routes(queue))
    r.include_router(health_routes(lifecycle, queue, metrics))
    r.include_router(template_routes(folders))
    r.include_router(frontend_routes(store))
    app.include_router(r)
    app.include_router(r, prefix="/api")
    app.include_router(internal_routes(folders, logs))  # /internal only, as ComfyUI
    app.include_router(openai_routes(queue, executor, folders, validate_prompt, limits))  # /v1 only, as OpenAI
    if serve_frontend:
        mount_frontend(app)
    return app


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _queue_full(queue: PromptQueue, metrics: ServerMetrics, details: str) -> JSONResponse:
    metrics.rejected.labels("queue_full").inc()
    response = _error("queue_full", "Queue is full", details, status=429, max_queue=queue.max_queue)
    response.headers["Retry-After"] = "1"
    return response


def queue_info(queue: PromptQueue) -> dict:
    """ComfyUI get_queue_info: the `status` payload."""
    return {"exec_info": {"queue_remaining": queue.tasks_remaining()}}


def _ram() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return 0, 0


def system_info(device: torch.device, redactor: Redactor | None = None) -> dict:
    """GET /system_stats: ComfyUI's {system, devices} shape; argv with the auth token masked."""
    ram_total, ram_free = _ram()
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        reserved = torch.cuda.memory_reserved(index)
        allocated = torch.cuda.memory_allocated(index)
        name = f"cuda:{index} {torch.cuda.get_device_name(index)}"
        vram = (total, free, reserved, reserved - allocated)
    else:
        index, name, vram = dev.index, dev.type, (ram_total, ram_free, ram_total, ram_free)  # ComfyUI: None on cpu
    return {
        "system": {
            "os": sys.platform, "python_version": sys.version, "embedded_python": False,
            "comfyui_version": f"sd35fp8-{SERVER_VERSION}", "pytorch_version": torch.__version__,
            "required_frontend_version": frontend_version() or "", "argv": (redactor or Redactor()).argv(sys.argv), "ram_total": ram_total,
            "ram_free": ram_free, "platform": platform.platform(),
        },
        "devices": [{"name": name, "type": dev.type, "index": index, "vram_total": vram[0], "vram_free": vram[1],
                     "torch_vram_total": vram[2], "torch_vram_free": vram[3]}],
    }


def input_error_handler(app: FastAPI) -> None:
    """Bad input raised inside a route, or query/path parameters FastAPI could not convert, are
    answered in ComfyUI's error shape (400, or the RequestError's own status), never a 500."""

    @app.exception_handler(InputError)
    async def _handle(request: Request, exc: InputError) -> JSONResponse:
        return _error("invalid_request", "Invalid request", str(exc))

    @app.exception_handler(RequestError)
    async def _handle_request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _handle_params(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return _error("invalid_request", "Invalid request", problems)

