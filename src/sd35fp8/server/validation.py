"""One validation layer between the wire and the routes: bounded, strict JSON into pydantic models.

    body = await read_model(request, PromptRequest)   # or raises RequestError (limits: app.state.limits)

- `Limits`: what one request may cost (body bytes, JSON nesting, node count, prompt text, and
  width x height x batch x steps against a per-server budget). Every field is a `serve` flag.
- `parse_json`: JSON without NaN / Infinity (a non-finite number is refused before anything is
  queued), nesting bounded; malformed input is a `RequestError`, never a RecursionError.
- Pydantic models for every JSON route body (ComfyUI's field names and meanings).
- `RequestError` carries (status, type, message, details) and is answered in ComfyUI's error shape
  `{"error": {type, message, details, extra_info}, "node_errors": {}}` by `error_response`.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sd35fp8.workflow.graph import is_link
from sd35fp8.workflow.nodes_merge import MERGE_NODES
from sd35fp8.workflow.nodes_sigmas import manual_sigma_count

JSON_TYPES = ("application/json",)  # and any application/*+json


@dataclass(frozen=True)
class Limits:
    """Bounds on one request. Defaults suit one local user with SD3.5 Large on one GPU."""

    max_body_bytes: int = 16 * 1024 * 1024  # JSON bodies (a UI workflow in extra_data included)
    max_json_depth: int = 64  # nesting of arrays/objects; ComfyUI UI workflows stay under ~20
    max_nodes: int = 2000  # nodes in one API-format prompt
    max_text_chars: int = 8192  # any STRING input (prompt texts); ~2 000 words; the hard cap (400 beyond)
    max_prompt_tokens: int = 512  # per prompt text and encoder; longer texts are cut with a warning (prompt_text.py)
    max_pixel_steps: int = 2048 * 2048 * 8 * 100  # sum over samplers of width*height*batch*steps
    max_model_nodes: int = 2  # model merge / save nodes: each merge holds a new MMDiT, each save writes a model

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")


class RequestError(Exception):
    """A request refused before it reached a route's work: answered in ComfyUI's error shape."""

    def __init__(self, status: int, type_: str, message: str, details: str = "", **extra: Any):
        super().__init__(message)
        self.status, self.type, self.message, self.details, self.extra = status, type_, message, details, extra


def error_body(type_: str, message: str, details: str = "", **extra: Any) -> dict:
    return {"error": {"type": type_, "message": message, "details": details, "extra_info": extra},
            "node_errors": {}}


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(error_body(exc.type, exc.message, exc.details, **exc.extra), status_code=exc.status)


# ---- strict JSON ------------------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise RequestError(400, "invalid_json", "Request body is not valid JSON",
                       f"{name} is not a JSON number (non-finite numbers are refused)")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, walked iteratively; stops past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return d
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(raw: bytes, limits: Limits) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no float overflow to inf, nesting <= limits.max_json_depth."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, "invalid_json", "Request body is not valid JSON", f"not UTF-8: {e}") from e
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise RequestError(400, "invalid_json", "Request body is not valid JSON", str(e)) from e
    except RecursionError as e:  # the C scanner recurses per nesting level
        raise RequestError(400, "json_too_deep", "Request body is nested too deeply",
                           f"more than {limits.max_json_depth} levels", max_depth=limits.max_json_depth) from e
    if _depth(value, limits.max_json_depth) > limits.max_json_depth:
        raise RequestError(400, "json_too_deep", "Request body is nested too deeply",
                           f"more than {limits.max_json_depth} levels", max_depth=limits.max_json_depth)
    if _SURROGATE_ESCAPE.search(raw) and _lone_surrogate(value):
        raise RequestError(400, "invalid_json", "Request body is not valid JSON",
                           "a \\uD800-\\uDFFF escape that is not half of a surrogate pair (no UTF-8 text holds it)")
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # only an escape can put a surrogate into parsed JSON


def _lone_surrogate(value: Any) -> bool:
    """Whether a string (key or value) of the parsed JSON holds a lone surrogate (a pair was joined by json)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        _refuse_constant(text)
    return value


def is_json_type(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


def limits_of(request: Request) -> Limits:
    """The app's Limits (create_app puts them on app.state), or the defaults."""
    limits = getattr(request.app.state, "limits", None)
    return limits if isinstance(limits, Limits) else Limits()


def from_browser(request: Request) -> bool:
    """Browsers send Origin on every POST/PUT/PATCH/DELETE (and Sec-Fetch-* on every request);
    scripts and ComfyUI clients send neither."""
    h = request.headers
    return "origin" in h or "sec-fetch-site" in h or "sec-fetch-mode" in h


async def read_json(request: Request, empty: Any = None) -> Any:
    """The body as strict JSON; an empty body gives `empty`. From a browser, a non-empty body must say
    `Content-Type: application/json`: text/plain, form and type-less bodies are what a page can send
    without a CORS preflight. Scripts (no Origin, no Sec-Fetch-*) may send any type, as ComfyUI's own
    API examples (urllib: form-urlencoded) and clients (requests: no type) do."""
    limits = limits_of(request)
    raw = await request.body()
    if not raw.strip():
        if empty is None:
            raise RequestError(400, "invalid_json", "Request body is empty", "a JSON object is required")
        return empty
    if from_browser(request) and not is_json_type(request.headers.get("content-type")):
        raise RequestError(415, "unsupported_media_type", "Request body must be JSON",
                           f"Content-Type must be application/json, got {request.headers.get('content-type')!r}")
    if len(raw) > limits.max_body_bytes:  # the middleware bounds the stream; this is the route's own check
        raise RequestError(413, "body_too_large", "Request body is too large",
                           f"{len(raw)} bytes; the limit is {limits.max_body_bytes}", limit=limits.max_body_bytes)
    return parse_json(raw, limits)


async def read_model(request: Request, model: type[BaseModel], empty: Any = None) -> Any:
    return validate_model(model, await read_json(request, empty))


def validate_model(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestError(400, "invalid_request", "Invalid request", describe(e),
                           errors=e.errors(include_url=False, include_input=False, include_context=False)) from e


def describe(e: ValidationError) -> str:
    """One line per problem: 'prompt.3.class_type: Input should be a valid string'."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())


# ---- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    """ComfyUI clients send fields this server does not know: they are ignored, as ComfyUI does."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class PromptNode(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    class_type: str | None = None  # missing: ComfyUI's missing_node_type error (the UI's dialog)
    inputs: dict[str, Any] = Field(default_factory=dict)


class PromptRequest(_Body):
    """POST /prompt (ComfyUI server.post_prompt)."""

    prompt: dict[str, PromptNode]
    client_id: str | None = None
    prompt_id: str | None = None  # ComfyUI: a canonical UUID; absent = the server makes one
    number: float | None = None
    front: Any = None  # ComfyUI: truthiness
    extra_data: dict[str, Any] | None = None
    # ComfyUI: `node_id in partial_execution_targets`, so an entry that is not a node id string (comfyui-skill-cli
    # sends [[id], ...]) selects nothing: prompt_no_outputs, not a malformed request
    partial_execution_targets: list[Any] | None = None

    @field_validator("prompt_id")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        if value is not None and not canonical_uuid(value):
            raise ValueError(PROMPT_ID_DETAILS)
        return value


PROMPT_ID_DETAILS = ("prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the "
                     "server generate one")


def canonical_uuid(value: Any) -> bool:
    """ComfyUI comfy_execution/jobs.validate_job_id: a string that is its own canonical UUID spelling (lowercase,
    hyphenated). Another spelling is refused, not rewritten: the client would look for the id it sent."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def invalid_prompt_id() -> RequestError:
    """ComfyUI post_prompt's answer to a client prompt_id that validate_job_id refuses."""
    return RequestError(400, "invalid_prompt_id", "prompt_id must be a valid UUID", PROMPT_ID_DETAILS)


class ClearOrDelete(_Body):
    """POST /queue and POST /history."""

    clear: bool = False
    delete: list[str] = Field(default_factory=list)


class InterruptRequest(_Body):
    prompt_id: str | None = None


class FreeRequest(_Body):
    unload_models: bool = False
    free_memory: bool = False


class LogsSubscribe(_Body):
    clientId: str  # noqa: N815 - ComfyUI's name
    enabled: bool


# ---- what a prompt may cost ----------------------------------------------------------------------
def check_prompt_size(prompt: dict, limits: Limits) -> None:
    """Node count, before any node is looked at."""
    if len(prompt) > limits.max_nodes:
        raise RequestError(413, "too_many_nodes", "Prompt has too many nodes",
                           f"{len(prompt)} nodes; the limit is {limits.max_nodes}", max_nodes=limits.max_nodes)


def _literal_int(inputs: dict, name: str, default: int = 0, prompt: dict | None = None) -> int:
    """An int input's literal value, or the value of the PrimitiveInt it is linked to; `default` otherwise."""
    value = inputs.get(name, default)
    if prompt is not None and is_link(value):
        source = prompt.get(str(value[0]))
        if isinstance(source, dict) and source.get("class_type") == "PrimitiveInt":
            value = (source.get("inputs") or {}).get("value", default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def prompt_work(prompt: dict) -> int:
    """width x height x batch of the largest image any node makes, times the steps of every sampler
    (inputs named width/height/batch_size/steps, literal or linked from a PrimitiveInt, after validation has
    made them ints). A ManualSigmas string counts its numbers as steps, and an ExtendIntermediateSigmas
    multiplies the steps by its own (an upper bound: it may extend only part of a schedule)."""
    pixels, steps, extend = 0, 0, 1
    for node in prompt.values():
        inputs = node.get("inputs", {})
        w, h = _literal_int(inputs, "width", 0, prompt), _literal_int(inputs, "height", 0, prompt)
        pixels = max(pixels, w * h * max(_literal_int(inputs, "batch_size", 1, prompt), 1))
        kind = node.get("class_type")
        if kind == "ExtendIntermediateSigmas":
            extend *= max(_literal_int(inputs, "steps", 1, prompt), 1)
            continue
        if kind == "ManualSigmas" and isinstance(inputs.get("sigmas"), str):
            steps += manual_sigma_count(inputs["sigmas"])
        steps += max(_literal_int(inputs, "steps", 0, prompt), 0)
    return pixels * max(steps * extend, 1)


def check_prompt_work(prompt: dict, limits: Limits) -> None:
    models = sum(1 for node in prompt.values() if isinstance(node, dict) and node.get("class_type") in MERGE_NODES)
    if models > limits.max_model_nodes:
        raise RequestError(400, "prompt_over_budget", "Prompt merges or saves more models than this server allows",
                           f"{models} model merge / save nodes (each merge holds a new copy of the MMDiT, each "
                           f"save writes one to disk); the server allows {limits.max_model_nodes} (--max-model-nodes)",
                           model_nodes=models, budget=limits.max_model_nodes)
    work = prompt_work(prompt)
    if work > limits.max_pixel_steps:
        raise RequestError(400, "prompt_over_budget", "Prompt asks for more work than this server allows",
                           f"width x height x batch x steps = {work}; the server's budget is "
                           f"{limits.max_pixel_steps} (--max-pixel-steps)", work=work, budget=limits.max_pixel_steps)
