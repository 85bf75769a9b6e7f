"""OpenAI-compatible images API: POST /v1/images/generations and GET /v1/models.

    client = openai.OpenAI(base_url="http://127.0.0.1:8188/v1", api_key="<token or anything>")
    img = client.images.generate(model="stable-diffusion-3.5-fp8", prompt="a red cube", size="64x64",
                                 response_format="b64_json")

A request is translated into a ComfyUI API-format prompt graph (CheckpointLoaderSimple -> two
CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage) and put on the server's own
PromptQueue, so it runs on the same engine, with the same cross-prompt batching, history and
WebSocket events as POST /prompt; the route then waits for its history entry.

Fields: `model` (a checkpoint file in models/checkpoints, with or without ".safetensors"; it must hold
the text encoders), `prompt`, `n` (the latent batch: n images from one seed, as ComfyUI's batch_size),
`size` ("WxH"), `response_format` ("b64_json" or "url": a /view URL on this server), `quality`
(low/medium/standard/high/hd/auto: a fraction of the model's default steps, see QUALITY_STEPS),
`steps` (wins over quality), `seed`, `negative_prompt`, and SD3.5's own fields under their own
names: `cfg`, `sampler_name`, `scheduler`, `denoise`, `shift`. Unknown fields are an error.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for the request's
fault (a size larger than the checkpoint's position table covers is refused before queueing; an
InputError raised while the prompt runs is answered 400 too), 500 only for a failed generation.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import time
import uuid
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open

from sd35fp8.defaults import GenerationDefaults, defaults_for
from sd35fp8.errors import InputError
from sd35fp8.models.mmdit import LATENT_DOWNSCALE
from sd35fp8.server.validation import RequestError, check_prompt_work

# quality -> fraction of the model's default steps (OpenAI: dall-e-3 standard/hd, gpt-image low/medium/high)
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 1.5, "hd": 1.5}
MAX_N = 10  # OpenAI's bound on n
POLL_S = 0.02  # how often the route looks for its history entry
OWNER = "sd35fp8"
INPUT_ERRORS = {"sd35fp8.errors.InputError"}  # execution errors answered 400 (invalid_value), not 500


class ImageRequest(BaseModel):
    """The body of POST /v1/images/generations (OpenAI's fields + SD3.5's own)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: Literal["low", "medium", "standard", "high", "hd", "auto"] | None = None
    style: str | None = None  # dall-e-3's; accepted and ignored (SD3.5 has no such switch)
    user: str | None = None
    output_format: Literal["png"] | None = None
    background: Literal["auto", "opaque"] | None = None
    moderation: str | None = None
    output_compression: int | None = Field(None, ge=0, le=100)  # png only: accepted, no effect
    stream: Literal[False] | None = None  # partial images are not streamed
    steps: int | None = Field(None, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    negative_prompt: str = ""
    cfg: float | None = Field(None, ge=0.0, le=100.0)
    sampler_name: str | None = None
    scheduler: str | None = None
    denoise: float = Field(1.0, ge=0.0, le=1.0)
    shift: float | None = Field(None, gt=0.0)


def openai_error(message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def parse_size(size: str | None, default: tuple[int, int]) -> tuple[int, int]:
    """'1024x768' -> (1024, 768); None / 'auto' -> the model's default."""
    if size is None or size == "auto":
        return default
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise InputError(f"size must be 'WIDTHxHEIGHT' (e.g. '1024x1024'), got {size!r}")
    w, h = int(parts[0]), int(parts[1])
    if w < 16 or h < 16 or w % 16 or h % 16:
        raise InputError(f"size {size!r}: width and height must be multiples of 16, at least 16")
    return w, h


def checkpoint_defaults(path: Path) -> GenerationDefaults:
    """The generation defaults of a checkpoint (architecture from its keys, its own metadata)."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        metadata = f.metadata() or {}
    blocks = {k.split("joint_blocks.")[1].split(".")[0] for k in keys if "joint_blocks." in k}
    mmdit_x = any(".x_block.attn2." in k for k in keys)
    return defaults_for(len(blocks), mmdit_x, metadata, path.name)


def checkpoint_max_side(path: Path) -> int | None:
    """Largest image side in pixels that the checkpoint's MMDiT position table covers (pos_embed
    [1, M*M, hidden], patch p: M * p * 8 px), read from the file's header; None when not found."""
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        pos = next((k for k in ("model.diffusion_model.pos_embed", "pos_embed") if k in keys), None)
        proj = pos and pos.replace("pos_embed", "x_embedder.proj.weight")
        if pos is None or proj not in keys:
            return None
        cells, patch = f.get_slice(pos).get_shape()[1], f.get_slice(proj).get_shape()[2]
    side = math.isqrt(cells)
    return side * patch * LATENT_DOWNSCALE if side * side == cells else None


def check_size(graph: dict, max_side: int | None) -> None:
    """InputError when the request's image is larger than the model's position table covers (the
    MMDiT would refuse it at sampling time: a request error, not a failed generation)."""
    if max_side is None:
        return
    latent = graph["5"]["inputs"]
    if latent["width"] > max_side or latent["height"] > max_side:
        raise InputError(f"size {latent['width']}x{latent['height']} is too large for this model: its position "
                         f"table covers at most {max_side}x{max_side} px")


def build_graph(req: ImageRequest, ckpt_name: str, defaults: GenerationDefaults, prefix: str) -> dict:
    """The ComfyUI API-format prompt for one request."""
    width, height = parse_size(req.size, (defaults.width, defaults.height))
    steps = req.steps or max(1, round(defaults.steps * QUALITY_STEPS[req.quality or "auto"]))
    seed = req.seed if req.seed is not None else random.randrange(2**32)
    model_out: list = ["4", 0]
    graph: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": req.prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": req.negative_prompt, "clip": ["4", 1]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": req.n}},
    }
    if req.shift is not None:
        graph["10"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["4", 0], "shift": req.shift}}
        model_out = ["10", 0]
    graph["3"] = {"class_type": "KSampler", "inputs": {
        "model": model_out, "seed": seed, "steps": steps, "cfg": req.cfg if req.cfg is not None else defaults.cfg,
        "sampler_name": req.sampler_name or defaults.sampler, "scheduler": req.scheduler or defaults.scheduler,
        "denoise": req.denoise, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}}
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}}
    return graph


def _model_names(folders: Any) -> list[str]:
    return [n for n in folders.get_filename_list("checkpoints") if n.endswith(".safetensors")]


def _resolve_model(folders: Any, model: str | None) -> str:
    names = _model_names(folders)
    if not names:
        raise LookupError("no checkpoint in the models/checkpoints folder")
    if model is None:
        return names[0]
    for name in names:
        if model in (name, name.removesuffix(".safetensors")):
            return name
    raise LookupError(f"The model '{model}' does not exist (checkpoints: {', '.join(names)})")


def openai_routes(queue: Any, executor: Any, folders: Any, validate_prompt: Any, limits: Any = None) -> APIRouter:
    """The /v1 routes over the server's queue. `validate_prompt(prompt, classes, folders, partial, max_text)`
    is the workflow validator (ok, error, outputs, node_errors), as POST /prompt uses it; `limits`
    (server.validation.Limits) bounds the text length and width x height x n x steps, as for POST /prompt."""
    r = APIRouter(prefix="/v1")
    defaults_cache: dict[str, tuple[GenerationDefaults, int | None]] = {}  # ckpt -> (defaults, max side px)

    @r.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": n.removesuffix(".safetensors"), "object": "model", "created": 0, "owned_by": OWNER}
            for n in _model_names(folders)]}

    @r.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> Any:
        try:
            name = _resolve_model(folders, model_id)
        except LookupError as e:
            return openai_error(str(e), param="model", code="model_not_found", status=404)
        return {"id": name.removesuffix(".safetensors"), "object": "model", "created": 0, "owned_by": OWNER}

    @r.post("/images/generations")
    async def generate(request: Request) -> JSONResponse:
        try:
            req = ImageRequest.model_validate_json(await request.body())
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            return openai_error(f"{param}: {first['msg']}" if param else first["msg"], param=param,
                                code="invalid_value")
        try:
            ckpt = _resolve_model(folders, req.model)
        except LookupError as e:
            return openai_error(str(e), param="model", code="model_not_found", status=404)
        if ckpt not in defaults_cache:
            path = Path(folders.get_full_path("checkpoints", ckpt))
            defaults_cache[ckpt] = (await asyncio.to_thread(checkpoint_defaults, path),
                                    await asyncio.to_thread(checkpoint_max_side, path))
        defaults, max_side = defaults_cache[ckpt]
        prompt_id = str(uuid.uuid4())
        try:
            graph = build_graph(req, ckpt, defaults, "openai/img")
        except InputError as e:
            return openai_error(str(e), param="size", code="invalid_value")
        max_text = limits.max_text_chars if limits is not None else None
        ok, error, outputs, node_errors = validate_prompt(graph, executor.classes, folders, None, max_text)
        if not ok:
            detail = "; ".join(f"{e.get('message')}: {e.get('details')}" for ne in node_errors.values()
                               for e in ne.get("errors", [])) or f"{error.get('message')}: {error.get('details')}"
            return openai_error(f"invalid request: {detail}", code="invalid_value")
        if limits is not None:
            try:
                check_prompt_work(graph, limits)
            except RequestError as e:
                return openai_error(f"{e.message}: {e.details}", param="size", code=e.type, status=e.status)
        try:
            check_size(graph, max_side)
        except InputError as e:
            return openai_error(str(e), param="size", code="invalid_value")
        extra = {"create_time": int(time.time() * 1000), "openai": True}
        budget = getattr(request.app.state, "text_budget", None)
        if budget is not None:  # the prompt text cut to --max-prompt-tokens (prompt_text.py)
            warnings = budget.apply(graph)
            if warnings:
                extra["warnings"] = warnings
        try:
            queue.put([queue.next_number(), prompt_id, graph, extra, outputs])
        except InputError as e:  # QueueFullError
            return openai_error(str(e), type_="rate_limit_exceeded", code="queue_full", status=429)
        entry = await _wait_for(queue, prompt_id, request)
        if entry is None:
            return openai_error("the request was cancelled", type_="server_error", code="cancelled", status=499)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            errors = [m[1] for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
            msg = errors[0].get("exception_message", "interrupted") if errors else "generation failed"
            if errors and errors[0].get("exception_type") in INPUT_ERRORS:  # the request's fault, found while running
                return openai_error(f"invalid request: {msg}", code="invalid_value")
            return openai_error(f"generation failed: {msg}", type_="server_error", code="generation_failed",
                                status=500)
        images = [img for ui in entry.get("outputs", {}).values() for img in ui.get("images", [])
                  if img.get("type") == "output"]
        data = []
        for img in images:
            if req.response_format == "url":
                query = urlencode({"filename": img["filename"], "subfolder": img["subfolder"], "type": img["type"]})
                data.append({"url": f"{request.base_url}view?{query}", "revised_prompt": req.prompt})
            else:
                path = Path(folders.output_dir) / img["subfolder"] / img["filename"]
                raw = await asyncio.to_thread(path.read_bytes)
                data.append({"b64_json": base64.b64encode(raw).decode("ascii"), "revised_prompt": req.prompt})
        return JSONResponse({"created": int(time.time()), "data": data, "prompt_id": prompt_id})

    return r


async def _wait_for(queue: Any, prompt_id: str, request: Request) -> dict | None:
    """The prompt's history entry once it is there; None if the client went away first (the prompt is
    then taken off the queue when still pending)."""
    while True:
        entry = queue.history(prompt_id).get(prompt_id)
        if entry is not None:
            return entry
        if await request.is_disconnected():
            queue.delete_queue_item(prompt_id)
            return None
        await asyncio.sleep(POLL_S)
