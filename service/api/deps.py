"""Typed access to what the lifespan put on ``app.state``.

Async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
dependency per request (it showed as ~30% of the event loop in the gateway profile).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReadyError
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.resilience import Admission


async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = request.app.state.runtime.pipeline
    if pipeline is None:
        raise NotReadyError("the gateway is still loading its models")
    return pipeline


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_admission(request: Request) -> Admission:
    admission: Admission = request.app.state.admission
    return admission


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
AdmissionDep = Annotated[Admission, Depends(get_admission)]
