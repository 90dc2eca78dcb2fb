"""Liveness, readiness and metrics. /ready is for operators: a member's reason may quote its server."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.serving.api.deps import MetricsDep, RuntimeDep

router = APIRouter()


@router.get("/health", tags=["probes"])
async def health() -> dict[str, str]:
    """Liveness: the process serves HTTP."""
    return {"status": "ok"}


@router.get("/ready", tags=["probes"], responses={503: {"description": "Not ready; the body says why."}})
async def ready(
    runtime: RuntimeDep,
    metrics: MetricsDep,
    scope: Literal["members", "gateway"] = Query(
        "members",
        description="members (default): ready when the models are loaded and every ensemble can reach its "
        "quorum of members. gateway: ready when the gateway itself can take requests (models loaded, not "
        "draining), whatever its members do; for a load balancer's readiness probe, so that a member outage "
        "does not take every replica out of service: requests then get the gateway's JSON 503 or a "
        "degraded answer instead of connection errors. The body reports the members either way.",
    ),
) -> JSONResponse:
    """Ready when the models are loaded and every ensemble can reach its quorum of members (``scope=
    gateway``: when the gateway itself can serve, whatever its members do)."""
    config = runtime.config
    loaded = runtime.pipeline is not None
    draining = runtime.admission.draining
    members = await runtime.probe_members() if loaded else {}
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
    metrics.ready.set(1 if is_ready else 0)  # the operators' view: with the members
    serving = loaded and not draining
    body = {
        "ready": is_ready,
        "scope": scope,
        "serving": serving,
        "models_loaded": loaded,
        "draining": draining,
        "ensembles": ensembles,
        "members": {n: {"up": err is None, "error": err, **runtime.guards.state(n)} for n, err in members.items()},
    }
    ok = serving if scope == "gateway" else is_ready
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", tags=["metrics"])
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
