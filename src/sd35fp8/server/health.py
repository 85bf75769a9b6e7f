"""GET /health (liveness), GET /ready (readiness), GET /metrics (Prometheus), as orchestrators probe them.

    /health   200 {"status": "ok"} while the process answers HTTP
    /ready    200 {"ready": true, "checks": {...}} when warmed up, the worker alive and responsive and
              not draining; else 503 with the same body (lifecycle.Lifecycle.checks)
    /metrics  Prometheus text format (metrics.ServerMetrics)

Kubernetes: livenessProbe on /health, readinessProbe on /ready (README, "Health and metrics").
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from sd35fp8.server.lifecycle import Lifecycle
from sd35fp8.server.metrics import ServerMetrics


def health_routes(lifecycle: Lifecycle, queue: Any, metrics: ServerMetrics) -> APIRouter:
    r = APIRouter()

    @r.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @r.get("/ready")
    async def ready() -> JSONResponse:
        ok, checks = lifecycle.ready()
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    @r.get("/metrics")
    async def prometheus() -> Response:
        running = len(queue.running_ids())
        body = metrics.render(pending=queue.tasks_remaining() - running, running=running,
                              ready=lifecycle.ready()[0])
        return Response(body, media_type=metrics.content_type)

    return r
