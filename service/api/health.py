"""Liveness, readiness and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import MetricsDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves HTTP."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready; the body says why."}})
async def ready(request: Request, metrics: MetricsDep) -> JSONResponse:
    """Ready when the models are loaded and every ensemble can reach its quorum of members."""
    from service.app import probe_members

    config = request.app.state.runtime.config
    loaded = request.app.state.runtime.pipeline is not None
    members = await probe_members(request.app) if loaded else {}
    ensembles: dict[str, Any] = {}
    for name, ens in config.ensembles.items():
        up = sum(1 for m in ens.members if members.get(m, "unknown") is None)
        ensembles[name] = {
            "up": up,
            "needed": ens.min_candidates,
            "ready": loaded and up >= ens.min_candidates,
        }
    is_ready = loaded and all(e["ready"] for e in ensembles.values())
    metrics.ready.set(1 if is_ready else 0)
    body = {
        "ready": is_ready,
        "models_loaded": loaded,
        "ensembles": ensembles,
        "members": {n: {"up": err is None, "error": err} for n, err in members.items()},
    }
    return JSONResponse(body, status_code=200 if is_ready else 503)


@router.get("/metrics")
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
