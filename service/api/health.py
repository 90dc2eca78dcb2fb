"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import MetricsDep
from service.members import MemberFailure
from service.pipeline import Pipeline

router = APIRouter()

READY_CACHE_S = 2.0


@dataclass
class Readiness:
    """Cached member probes behind /ready."""

    checked_at: float = 0.0
    members: dict[str, str | None] = field(default_factory=dict)
    pipeline: object = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


async def probe_members(app: FastAPI) -> dict[str, str | None]:
    """Each member's health (None = up), cached for a couple of seconds."""
    state: Readiness = app.state.readiness
    pipeline: Pipeline | None = app.state.runtime.pipeline
    if pipeline is None:
        return {}
    async with state.lock:
        fresh = time.monotonic() - state.checked_at < READY_CACHE_S
        if fresh and state.pipeline is pipeline:
            return state.members
        names = list(pipeline.members)

        async def check(name: str) -> str | None:
            if name in pipeline.unavailable:
                return f"unavailable: {pipeline.unavailable[name]}"
            try:
                await pipeline.members[name].health()
            except MemberFailure as e:
                return str(e)
            return None

        results = await asyncio.gather(*(check(n) for n in names))
        state.members = dict(zip(names, results, strict=True))
        state.checked_at = time.monotonic()
        state.pipeline = pipeline
        return state.members


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process serves HTTP."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready; the body says why."}})
async def ready(request: Request, metrics: MetricsDep) -> JSONResponse:
    """Ready when the models are loaded and every ensemble can reach its quorum of members."""
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
