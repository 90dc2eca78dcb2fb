"""Liveness, readiness and metrics."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import MetricsDep
from service.pipeline import Pipeline
from service.resilience import OPEN, Guards

router = APIRouter()

READY_CACHE_S = 2.0


async def probe_members(app: FastAPI) -> dict[str, str | None]:
    """Each member's health (None = up): the last active check, or a fresh one when that is
    older than a couple of seconds. A member whose circuit is open counts as down."""
    runtime = app.state.runtime
    pipeline: Pipeline | None = runtime.pipeline
    if pipeline is None:
        return {}
    guards: Guards = runtime.guards
    async with runtime.health_lock:
        if time.monotonic() - guards.last_round > READY_CACHE_S or set(guards.health) != set(pipeline.members):
            await guards.check(pipeline.members, pipeline.unavailable)
    out: dict[str, str | None] = {}
    for name in pipeline.members:
        h = guards.health.get(name)
        b = guards.breaker(name)
        out[name] = h.error if h is not None and h.error else None
        if out[name] is None and b.state == OPEN:
            out[name] = f"circuit_open: {b.reason}"
    return out


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves HTTP."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready; the body says why."}})
async def ready(request: Request, metrics: MetricsDep) -> JSONResponse:
    """Ready when the models are loaded and every ensemble can reach its quorum of members."""
    config = request.app.state.runtime.config
    loaded = request.app.state.runtime.pipeline is not None
    runtime = request.app.state.runtime
    draining = runtime.admission.draining
    members = await probe_members(request.app) if loaded else {}
    ensembles: dict[str, Any] = {}
    for name, ens in config.ensembles.items():
        up = sum(1 for m in ens.members if members.get(m, "unknown") is None)
        ensembles[name] = {
            "up": up,
            "needed": ens.min_candidates,
            "quorum": ens.effective_quorum,
            "ready": loaded and up >= ens.min_candidates,
        }
    is_ready = loaded and not draining and all(e["ready"] for e in ensembles.values())
    metrics.ready.set(1 if is_ready else 0)
    body = {
        "ready": is_ready,
        "models_loaded": loaded,
        "draining": draining,
        "ensembles": ensembles,
        "members": {n: {"up": err is None, "error": err, **runtime.guards.state(n)} for n, err in members.items()},
    }
    return JSONResponse(body, status_code=200 if is_ready else 503)


@router.get("/metrics")
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
