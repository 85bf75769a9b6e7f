"""OpenAI-compatible images API: POST /v1/images/generations, POST /v1/images/edits and GET /v1/models.

    client = openai.OpenAI(base_url="http://127.0.0.1:8188/v1", api_key="<token or anything>")
    img = client.images.generate(model="stable-diffusion-3.5-fp8", prompt="a red cube", size="64x64",
                                 response_format="b64_json")

A request is translated into a ComfyUI API-format prompt graph (CheckpointLoaderSimple -> two
CLIPTextEncode -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage) and put on the server's own
PromptQueue, so it runs on the same engine, with the same cross-prompt batching, history and
WebSocket events as POST /prompt; the route then waits for its history entry.

Fields: `model` (a checkpoint file in models/checkpoints, with or without ".safetensors"; it must hold
the text encoders), `prompt`, `n` (the latent batch: n images from one seed, as ComfyUI's batch_size),
`size` ("WxH"), `response_format` ("b64_json" or "url": a /view URL on this server, the saved PNG),
`output_format` (png, jpeg or webp for b64_json, at `output_compression` quality), `quality`
(low/medium/standard/high/hd/auto: a fraction of the model's default steps, see QUALITY_STEPS),
`steps` (wins over quality), `seed`, `negative_prompt`, and SD3.5's own fields under their own
names: `cfg`, `sampler_name`, `scheduler`, `denoise`, `shift`. Unknown fields are an error; a field sent as
null means its default (the openai client sends `n=None` so). `style`, `moderation`, `user`, `safety_identifier`,
`complexity`, `input_fidelity` are OpenAI's advice, checked against OpenAI's values and otherwise ignored.
The answer is OpenAI's ImagesResponse: `created`, `data` [{b64_json | url, revised_prompt}] and the GPT image
fields `background` ("opaque"), `output_format`, `quality` (its OpenAI name), `size`, `usage` (the prompt's CLIP
tokens as text tokens) and `safety_identifier` (echoed), plus our `prompt_id`. Other /v1 URLs answer 404 (405 for
a known URL with another method) in the same error shape.
Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for the request's
fault (a size larger than the checkpoint's position table covers is refused before queueing; an
InputError raised while the prompt runs is answered 400 too), 500 only for a failed generation.

/v1/images/edits (multipart, as `client.images.edit(image=..., mask=..., prompt=...)` sends it): one `image`
file (or a list of one: `image[]`; several, or a `markup` file, are refused by name) and an optional `mask` file of the same size whose fully transparent pixels mark where to edit (OpenAI's
rule; without a mask the image's own transparent pixels, if it has any). The image is stored under
input/openai/ and the graph is LoadImage -> ImageScale (to `size`, or the image's size rounded down to a
multiple of 16; stretched, so the mask stays aligned) -> VAEEncode [-> SetLatentNoiseMask] [-> RepeatLatentBatch
for n] -> KSampler -> VAEDecode -> SaveImage. `denoise` (img2img strength) defaults to 1.0 where a mask says what
to repaint and to 0.6 for a whole-image edit (diffusers' SD3 img2img strength). The same other fields and errors
as generations; the upload is bounded as POST /upload/image (bytes, pixels, a readable image).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import safe_open

from sd35fp8.defaults import GenerationDefaults, defaults_for
from sd35fp8.errors import InputError
from sd35fp8.models.mmdit import LATENT_DOWNSCALE
from sd35fp8.server.files import (DEFAULT_MAX_UPLOAD_PIXELS, FORM_OVERHEAD, bounded_decode, decode_rgba, image_error,
                                  read_bounded, write_atomic)
from sd35fp8.server.validation import RequestError, check_prompt_work

# quality -> fraction of the model's default steps (OpenAI: dall-e-3 standard/hd, gpt-image low/medium/high/xhigh/max)
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "standard": 1.0, "auto": 1.0, "high": 1.5, "hd": 1.5, "xhigh": 2.0,
                 "max": 2.5}
# the quality named in stream events (OpenAI's event types know no dall-e-3 names)
EVENT_QUALITY = {"standard": "medium", "hd": "high", None: "auto"}
# ... and in a response body (ImagesResponse.quality: low/medium/high/xhigh/max; auto is QUALITY_STEPS' medium)
RESPONSE_QUALITY = {**EVENT_QUALITY, None: "medium", "auto": "medium"}
MAX_N = 10  # OpenAI's bound on n
POLL_S = 0.02  # how often the route looks for its history entry
OWNER = "sd35fp8"
INPUT_ERRORS = {"sd35fp8.errors.InputError"}  # execution errors answered 400 (invalid_value), not 500


EDIT_DENOISE = {"masked": 1.0, "whole": 0.6}  # /v1/images/edits' default denoise (module docstring)
EDIT_FIELDS = 32  # multipart fields an edit request may have
EDIT_FILES = 18  # file parts: OpenAI's up to 16 images + mask + markup (so that more images are refused by name)
EDIT_SUBFOLDER = "openai"  # the edits' images, under the input folder
DEFAULT_EDIT_BYTES = 100 * 1024 * 1024  # without app.state.max_upload_bytes (the server sets it)


class ImageRequest(BaseModel):
    """The body of POST /v1/images/generations (OpenAI's fields + SD3.5's own)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_omitted(cls, data: Any) -> Any:
        """A field sent as null means its default, as OpenAI reads it (the openai client sends `n=None` as
        "n": null; every OpenAI field is Optional)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: Literal["low", "medium", "standard", "high", "hd", "xhigh", "max", "auto"] | None = None
    style: Literal["vivid", "natural"] | None = None  # dall-e-3's; accepted and ignored (SD3.5 has no such switch)
    user: str | None = None
    safety_identifier: str | None = None  # accepted and ignored, as `user`
    complexity: Literal["low", "medium", "high"] | None = None  # gpt-image's planning effort; accepted, no effect
    # b64_json: the image re-encoded (url: the PNG); gif / svg and their options are refused (`unsupported`)
    output_format: Literal["png", "jpeg", "webp", "gif", "svg"] | None = None
    frame_count: int | None = None
    frame_duration_ms: int | None = None
    svg: dict | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    moderation: Literal["low", "auto"] | None = None  # OpenAI's own content filter: accepted, no effect
    output_compression: int | None = Field(None, ge=0, le=100)  # jpeg / webp quality (default 100); png: no effect
    stream: bool | None = None  # True: server-sent events (partial images, then each image: see `stream_events`)
    partial_images: int | None = Field(None, ge=0, le=3)
    steps: int | None = Field(None, ge=1, le=1000)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)
    negative_prompt: str = ""
    cfg: float | None = Field(None, ge=0.0, le=100.0)
    sampler_name: str | None = None
    scheduler: str | None = None
    denoise: float = Field(1.0, ge=0.0, le=1.0)
    shift: float | None = Field(None, gt=0.0)


class EditRequest(ImageRequest):
    """The fields of POST /v1/images/edits besides its files (multipart: numbers arrive as text)."""

    denoise: float | None = Field(None, ge=0.0, le=1.0)  # None: EDIT_DENOISE
    input_fidelity: Literal["low", "high"] | None = None  # gpt-image-1's; accepted, no effect


class VariationRequest(EditRequest):
    """The fields of POST /v1/images/variations besides its image: an edit whose prompt may be empty (dall-e-2's
    variations take none) and which does not stream."""

    prompt: str = ""


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


def check_size(width: int, height: int, max_side: int | None) -> None:
    """InputError when the request's image is larger than the model's position table covers (the
    MMDiT would refuse it at sampling time: a request error, not a failed generation)."""
    if max_side is not None and (width > max_side or height > max_side):
        raise InputError(f"size {width}x{height} is too large for this model: its position table covers at most "
                         f"{max_side}x{max_side} px")


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


def edit_image(image: bytes, mask: bytes | None, max_pixels: int) -> tuple[bytes, bool, tuple[int, int]]:
    """An edit's upload -> (the PNG to store: RGB, or RGBA whose alpha marks what to keep, whether it has a
    mask, (width, height)). The mask's alpha replaces the image's; transparent pixels are repainted (LoadImage's
    MASK = 1 - alpha). InputError naming the field for an unreadable or oversized file, or a size mismatch."""

    def decode(field: str, data: bytes) -> Any:  # a PIL image, RGBA
        got = image_error(data, max_pixels, decode=False) or decode_rgba(data)
        if isinstance(got, str):
            raise InputError(f"{field}: not a readable image: {got}")
        return got[0]

    rgba = decode("image", image)
    if mask is not None:
        alpha = decode("mask", mask).getchannel("A")
        if alpha.size != rgba.size:
            raise InputError(f"mask is {alpha.size[0]}x{alpha.size[1]}, the image {rgba.size[0]}x{rgba.size[1]}: "
                             "they must be the same size")
        rgba.putalpha(alpha)
    masked = rgba.getchannel("A").getextrema()[0] < 255
    out = io.BytesIO()
    (rgba if masked else rgba.convert("RGB")).save(out, format="PNG", compress_level=4)
    return out.getvalue(), masked, rgba.size


def build_edit_graph(req: EditRequest, ckpt_name: str, defaults: GenerationDefaults, prefix: str, image_name: str,
                     masked: bool, image_size: tuple[int, int]) -> tuple[dict, int, int]:
    """The ComfyUI API-format prompt of an edit (module docstring) -> (graph, width, height)."""
    if req.size not in (None, "auto"):
        width, height = parse_size(req.size, image_size)
    else:
        width, height = (max(16, side // 16 * 16) for side in image_size)
    denoise = req.denoise if req.denoise is not None else EDIT_DENOISE["masked" if masked else "whole"]
    graph = build_graph(req.model_copy(update={"denoise": denoise, "size": f"{width}x{height}"}), ckpt_name,
                        defaults, prefix)
    del graph["5"]  # the empty latent: the image's instead
    graph["11"] = {"class_type": "LoadImage", "inputs": {"image": image_name}}
    graph["12"] = {"class_type": "ImageScale", "inputs": {"image": ["11", 0], "upscale_method": "bicubic",
                                                          "width": width, "height": height, "crop": "disabled"}}
    graph["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["4", 2]}}
    latent: list = ["13", 0]
    if masked:
        graph["14"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": latent, "mask": ["11", 1]}}
        latent = ["14", 0]
    if req.n > 1:
        graph["15"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": latent, "amount": req.n}}
        latent = ["15", 0]
    graph["3"]["inputs"]["latent_image"] = latent
    return graph, width, height


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

    async def model_defaults(req: ImageRequest) -> tuple[str, GenerationDefaults, int | None]:
        """(checkpoint file, its generation defaults, its largest side in px); LookupError for an unknown model."""
        ckpt = _resolve_model(folders, req.model)
        if ckpt not in defaults_cache:
            path = Path(folders.get_full_path("checkpoints", ckpt))
            defaults_cache[ckpt] = (await asyncio.to_thread(checkpoint_defaults, path),
                                    await asyncio.to_thread(checkpoint_max_side, path))
        return (ckpt, *defaults_cache[ckpt])

    @r.post("/images/generations")
    async def generate(request: Request) -> Response:
        try:
            req = ImageRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return _validation_error(e)
        refused = unsupported(req)
        if refused is not None:
            return openai_error(refused[1], param=refused[0], code="unsupported_value")
        try:
            ckpt, defaults, max_side = await model_defaults(req)
        except LookupError as e:
            return openai_error(str(e), param="model", code="model_not_found", status=404)
        try:
            graph = build_graph(req, ckpt, defaults, "openai/img")
        except InputError as e:
            return openai_error(str(e), param="size", code="invalid_value")
        latent = graph["5"]["inputs"]
        return await run(request, req, graph, latent["width"], latent["height"], max_side)

    @r.post("/images/edits")
    async def edit(request: Request) -> Response:
        return await from_image(request, EditRequest, "openai/edit", "image_edit")

    @r.post("/images/variations")
    async def variation(request: Request) -> Response:
        return await from_image(request, VariationRequest, "openai/variation", "image_generation")

    async def from_image(request: Request, model: type[EditRequest], prefix: str, kind: str) -> Response:
        """An edit or a variation: its multipart form, image (and mask) checked and stored, its graph run."""
        max_bytes = getattr(request.app.state, "max_upload_bytes", None) or DEFAULT_EDIT_BYTES
        body = await read_bounded(request, max_bytes + FORM_OVERHEAD)
        if body is None:
            return openai_error(f"upload larger than the limit of {max_bytes} bytes", code="payload_too_large",
                                status=413)
        try:
            fields, files = await _edit_form(request, body)
            req = model.model_validate(fields)
        except FormError as e:
            return openai_error(str(e), param=e.param, code=e.code)
        except InputError as e:
            return openai_error(str(e), code="invalid_value")
        except ValidationError as e:
            return _validation_error(e)
        refused = unsupported(req)
        if refused is None and model is VariationRequest and "mask" in files:
            refused = ("mask", "a variation takes no mask (an edit does: /v1/images/edits)")
        if refused is None and model is VariationRequest and req.stream:  # "false" (a form's False) is fine
            refused = ("stream", "variations do not stream (OpenAI's neither): use /v1/images/edits or generations")
        if refused is not None:
            return openai_error(refused[1], param=refused[0], code="unsupported_value")
        try:
            ckpt, defaults, max_side = await model_defaults(req)
        except LookupError as e:
            return openai_error(str(e), param="model", code="model_not_found", status=404)
        max_pixels = getattr(request.app.state, "max_upload_pixels", None) or DEFAULT_MAX_UPLOAD_PIXELS
        try:
            png, masked, image_size = await asyncio.to_thread(bounded_decode, edit_image, files["image"],
                                                              files.get("mask"), max_pixels)
        except InputError as e:
            return openai_error(str(e), param="mask" if str(e).startswith("mask") else "image",
                                code="invalid_value")
        name = f"{uuid.uuid4().hex}.png"
        try:
            graph, width, height = build_edit_graph(req, ckpt, defaults, prefix, f"{EDIT_SUBFOLDER}/{name}",
                                                    masked, image_size)
        except InputError as e:
            return openai_error(str(e), param="size", code="invalid_value")
        target = Path(folders.input_dir) / EDIT_SUBFOLDER
        try:
            await asyncio.to_thread(_store, target, name, png)
        except OSError as e:
            return openai_error(f"could not store the image in input/{EDIT_SUBFOLDER}: {e.strerror or e}",
                                type_="server_error", code="storage_failed", status=507 if e.errno == 28 else 500)
        return await run(request, req, graph, width, height, max_side, kind)

    async def run(request: Request, req: ImageRequest, graph: dict, width: int, height: int,
                  max_side: int | None, kind: str = "image_generation") -> Response:
        """Validate the graph and its cost, queue it, then answer with its images: as one JSON body, or
        (req.stream) as server-sent events. kind: the events' prefix (image_generation, image_edit)."""
        max_text = limits.max_text_chars if limits is not None else None
        ok, error, outputs, node_errors = validate_prompt(graph, executor.classes, folders, None, max_text)
        if not ok:
            detail = "; ".join(f"{e.get('message')}: {e.get('details')}" for ne in node_errors.values()
                               for e in ne.get("errors", [])) or f"{error.get('message')}: {error.get('details')}"
            return openai_error(f"invalid request: {detail}", code="invalid_value")
        if limits is not None:
            steps = graph["3"]["inputs"]["steps"]
            try:  # the image's pixels x n x steps, whatever node makes the latent
                check_prompt_work({"work": {"inputs": {"width": width, "height": height, "batch_size": req.n,
                                                       "steps": steps}}}, limits)
            except RequestError as e:
                return openai_error(f"{e.message}: {e.details}", param="size", code=e.type, status=e.status)
        try:
            check_size(width, height, max_side)
        except InputError as e:
            return openai_error(str(e), param="size", code="invalid_value")
        prompt_id = str(uuid.uuid4())
        extra: dict[str, Any] = {"create_time": int(time.time() * 1000), "openai": True}
        if req.stream and req.partial_images:
            extra["partial_images"] = req.partial_images  # workflow/previews.py decodes them while sampling
        budget = getattr(request.app.state, "text_budget", None)
        if budget is not None:  # the prompt text cut to --max-prompt-tokens (prompt_text.py)
            warnings = budget.apply(graph)
            if warnings:
                extra["warnings"] = warnings
        hub = getattr(request.app.state, "hub", None) if req.stream else None
        partials = hub.subscribe(prompt_id) if hub is not None else None  # before queueing: nothing missed
        try:
            queue.put([queue.next_number(), prompt_id, graph, extra, outputs])
        except InputError as e:  # QueueFullError
            if hub is not None:
                hub.unsubscribe(prompt_id)
            return openai_error(str(e), type_="rate_limit_exceeded", code="queue_full", status=429)
        usage = _usage(budget, req.prompt)
        if req.stream:
            events = stream_events(request, req, prompt_id, partials, kind, f"{width}x{height}", usage)
            return StreamingResponse(_unsubscribing(events, hub, queue, prompt_id), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        entry = await _wait_for(queue, prompt_id, request)
        if entry is None:
            return openai_error("the request was cancelled", type_="server_error", code="cancelled", status=499)
        failed = _failure(entry)
        if failed is not None:
            return failed
        data = []
        for img in _output_images(entry):
            if req.response_format == "url":
                query = urlencode({"filename": img["filename"], "subfolder": img["subfolder"], "type": img["type"]})
                data.append({"url": f"{request.base_url}view?{query}", "revised_prompt": req.prompt})
            else:
                raw = await asyncio.to_thread(encode_output, _output_path(img), req.output_format,
                                              req.output_compression)
                data.append({"b64_json": base64.b64encode(raw).decode("ascii"), "revised_prompt": req.prompt})
        # the fields ImagesResponse declares for GPT image models: the image as made (SD3.5's are opaque; a URL
        # is the saved PNG), the quality's OpenAI name, the token usage; safety_identifier echoed as OpenAI does
        body = {"created": int(time.time()), "data": data, "background": "opaque",
                "output_format": "png" if req.response_format == "url" else req.output_format or "png",
                "quality": RESPONSE_QUALITY.get(req.quality, req.quality), "size": f"{width}x{height}",
                "usage": {**usage, "output_tokens_details": {"image_tokens": 0, "text_tokens": 0}},
                **_safety_identifier(req), "prompt_id": prompt_id}
        return JSONResponse(body)

    async def stream_events(request: Request, req: ImageRequest, prompt_id: str, partials: asyncio.Queue | None,
                            kind: str, size: str, usage: dict) -> AsyncIterator[bytes]:
        """OpenAI's image stream: `{kind}.partial_image` events while sampling (req.partial_images of them, the
        step's prediction of the clean image decoded by the model's VAE, for the batch's first image), then one
        `{kind}.completed` per image; a failure is an `error` event ({"error": {...}}, as the openai client
        raises it); the prompt is taken off the queue if the client leaves first."""
        common = {"background": req.background or "auto", "output_format": req.output_format or "png",
                  "quality": EVENT_QUALITY.get(req.quality, req.quality), "size": size}
        pending: list[tuple[str, dict]] = []
        while True:
            entry = queue.history(prompt_id).get(prompt_id)
            if entry is not None:
                await asyncio.sleep(0)  # a partial the worker sent before finishing may still wait in the loop
            while partials is not None and not partials.empty():
                pending.append(partials.get_nowait())
            for _, data in pending:
                raw = await asyncio.to_thread(encode_bytes, data["image"], req.output_format, req.output_compression)
                yield _sse(f"{kind}.partial_image", {
                    "type": f"{kind}.partial_image", "b64_json": base64.b64encode(raw).decode("ascii"),
                    "created_at": int(time.time()), "partial_image_index": int(data["index"]), **common})
            pending.clear()
            if entry is not None:
                break
            if await request.is_disconnected():  # _unsubscribing takes a still pending prompt off the queue
                return
            if partials is None:
                await asyncio.sleep(POLL_S)
                continue
            try:
                pending.append(await asyncio.wait_for(partials.get(), POLL_S))
            except TimeoutError:
                pass
        failed = _failure(entry)
        if failed is not None:
            yield _sse("error", json.loads(failed.body))
            return
        for img in _output_images(entry):
            raw = await asyncio.to_thread(encode_output, _output_path(img), req.output_format, req.output_compression)
            yield _sse(f"{kind}.completed", {"type": f"{kind}.completed", "b64_json": base64.b64encode(raw).decode(
                "ascii"), "created_at": int(time.time()), **common, "usage": usage, **_safety_identifier(req)})

    def _output_path(img: dict) -> Path:
        return Path(folders.output_dir) / img["subfolder"] / img["filename"]

    routes = list(r.routes)  # the API's own routes (the catch-all below is added after)

    @r.api_route("/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"], include_in_schema=False)
    async def invalid_url(request: Request, rest: str) -> JSONResponse:
        """Any other /v1 request, answered in OpenAI's error shape (not FastAPI's {"detail"}): 405 for a known URL
        asked with another method, else 404 "Invalid URL", as OpenAI answers them."""
        asked = f"{request.method} {request.url.path}"
        allowed = sorted({m for route in routes if route.path_regex.match(request.url.path)
                          for m in getattr(route, "methods", ())})
        if allowed:
            response = openai_error(f"Invalid method for URL ({asked}); use {', '.join(allowed)}",
                                    code="method_not_allowed", status=405)
            response.headers["Allow"] = ", ".join(allowed)
            return response
        return openai_error(f"Invalid URL ({asked})", code="invalid_url", status=404)

    return r


def _failure(entry: dict) -> JSONResponse | None:
    """The OpenAI error answer for a history entry that did not succeed (None when it did)."""
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return None
    errors = [m[1] for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
    msg = errors[0].get("exception_message", "interrupted") if errors else "generation failed"
    if errors and errors[0].get("exception_type") in INPUT_ERRORS:  # the request's fault, found while running
        return openai_error(f"invalid request: {msg}", code="invalid_value")
    return openai_error(f"generation failed: {msg}", type_="server_error", code="generation_failed", status=500)


def _output_images(entry: dict) -> list[dict]:
    return [img for ui in entry.get("outputs", {}).values() for img in ui.get("images", [])
            if img.get("type") == "output"]


def _usage(budget: Any, prompt: str) -> dict:
    """A stream's `usage`: the prompt's CLIP tokens as its text tokens (no image tokens: a diffusion model
    emits none)."""
    try:
        text = budget.count(prompt, ["clip"])["clip"] if budget is not None else 0
    except Exception:  # noqa: BLE001 - a count is informative only; never fail a finished image over it
        text = 0
    return {"input_tokens": text, "input_tokens_details": {"image_tokens": 0, "text_tokens": text},
            "output_tokens": 0, "total_tokens": text}


def _safety_identifier(req: ImageRequest) -> dict:
    """{"safety_identifier": ...} as OpenAI echoes it: the request's non-empty safety_identifier, else its non-empty
    (deprecated) user; {} when neither."""
    value = req.safety_identifier or req.user
    return {"safety_identifier": value} if value else {}


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def _unsubscribing(events: AsyncIterator[bytes], hub: Any, queue: Any, prompt_id: str) -> AsyncIterator[bytes]:
    """The stream's events; whatever ends it (the last event, or the client leaving, which cancels the response),
    the prompt's subscription goes, and a prompt still pending leaves the queue (nobody would hear its images)."""
    try:
        async for chunk in events:
            yield chunk
    finally:
        if hub is not None:
            hub.unsubscribe(prompt_id)
        queue.delete_queue_item(prompt_id)  # a no-op once it runs or ran


def unsupported(req: ImageRequest) -> tuple[str, str] | None:
    """(param, message) for what SD3.5 cannot make (transparent backgrounds, GIF, SVG); None when all is fine."""
    if req.background == "transparent":
        return "background", "background 'transparent' is not supported: SD3.5 makes opaque images (use auto or opaque)"
    if req.output_format in ("gif", "svg"):
        return "output_format", f"output_format {req.output_format!r} is not supported (png, jpeg or webp)"
    for name in ("frame_count", "frame_duration_ms", "svg"):
        if getattr(req, name) is not None:
            return name, f"{name} is for gif / svg output, which this server does not make"
    return None


def encode_output(path: Path, output_format: str | None, compression: int | None) -> bytes:
    """A saved PNG's bytes as `output_format` asks (encode_bytes)."""
    return encode_bytes(path.read_bytes(), output_format, compression)


def encode_bytes(png: bytes, output_format: str | None, compression: int | None) -> bytes:
    """PNG bytes as `output_format` asks: themselves for png, else re-encoded by Pillow at quality
    `compression` (OpenAI's output_compression, 0-100, default 100)."""
    if output_format in (None, "png"):
        return png
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        out = io.BytesIO()
        quality = 100 if compression is None else compression
        im.convert("RGB").save(out, format="JPEG" if output_format == "jpeg" else "WEBP", quality=quality)
    return out.getvalue()


def _validation_error(e: ValidationError) -> JSONResponse:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return openai_error(f"{param}: {first['msg']}" if param else first["msg"], param=param, code="invalid_value")


class FormError(InputError):
    """An edit's multipart body refused for one named field (`param`), with OpenAI's error `code`."""

    def __init__(self, message: str, param: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


async def _edit_form(request: Request, body: bytes) -> tuple[dict, dict[str, bytes]]:
    """An edit's multipart body -> (its text fields, {"image": bytes, "mask": bytes}); InputError when it is not
    multipart or unreadable, FormError naming the field when it has no image, more than one image (OpenAI's
    further reference images: SD3.5's img2img edits one), a `markup` file, another file, or a field given twice.
    Bracketed fields, as the openai client sends a dict (`svg[model]`), nest: {"svg": {"model": ...}}."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request as StarletteRequest

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InputError("images/edits takes multipart/form-data (fields image, prompt, optional mask, ...)")
    try:
        form = await StarletteRequest(request.scope, receive).form(max_files=EDIT_FILES, max_fields=EDIT_FIELDS)
    except Exception as e:  # noqa: BLE001  (starlette's MultiPartException / a malformed body)
        raise InputError(f"unreadable multipart body: {e}") from None
    fields: dict = {}
    files: dict[str, bytes] = {}
    counts: dict[str, int] = {}
    for key, value in form.multi_items():
        name = key.removesuffix("[]")  # the openai client sends image=[...] as image[]
        if isinstance(value, UploadFile):
            if name == "markup":
                raise FormError("markup (GPT Image 2.5's drawn annotations) is not supported: give a mask, whose "
                                "transparent pixels mark where to edit", "markup", "unsupported_value")
            if name not in ("image", "mask"):
                raise FormError(f"unexpected file field {key!r} (image, mask)", name)
            counts[name] = counts.get(name, 0) + 1
            if counts[name] == 1:
                files[name] = await value.read()
        else:
            path = [name.split("[", 1)[0], *(p.rstrip("]") for p in name.split("[")[1:])] if "[" in name else [name]
            node = fields
            for part in path[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise FormError(f"field {path[0]!r} given twice", path[0])
            if path[-1] in node:
                raise FormError(f"field {key!r} given twice", path[0])
            node[path[-1]] = value
    if counts.get("mask", 0) > 1:
        raise FormError("one mask per request", "mask")
    if counts.get("image", 0) > 1:
        raise FormError(f"{counts['image']} images were sent: SD3.5 edits one image (it has no use for OpenAI's "
                        "further reference images); send one", "image", "unsupported_value")
    if "image" not in files:
        raise FormError("multipart field 'image' (a file) is required", "image")
    return fields, files


def _store(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / name, data)


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
