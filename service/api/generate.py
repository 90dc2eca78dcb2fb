"""POST /generate: one prompt in, one ensemble answer out, with its evidence."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from service.api.deps import MetricsDep, PipelineDep
from service.errors import GatewayError
from service.protocol import ErrorResponse, GenerateRequest, GenerateResponse

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (400, "Invalid request (bad JSON, wrong types, out-of-range values)."),
        (404, "Unknown ensemble."),
        (500, "Ranker or fuser failure."),
        (502, "Too few members answered."),
        (503, "Not ready."),
        (504, "Too few members answered before the deadline."),
    ]
}


@router.post(
    "/generate", response_model=GenerateResponse, response_model_exclude_none=True, responses=_ERRORS
)
async def generate(body: GenerateRequest, pipeline: PipelineDep, metrics: MetricsDep) -> GenerateResponse:
    """Fan the prompt out to the ensemble's members, rank the candidates, fuse the best."""
    ensemble = body.ensemble or pipeline.config.default
    label = ensemble if ensemble in pipeline.config.ensembles else "-"
    start = time.perf_counter()
    metrics.in_flight.inc()
    try:
        response = await pipeline.run(body)
    except GatewayError as e:
        metrics.requests.labels(label, str(e.status)).inc()
        raise
    finally:
        metrics.in_flight.dec()
        metrics.request_latency.labels(label).observe(time.perf_counter() - start)
    metrics.requests.labels(label, "200").inc()
    return response
