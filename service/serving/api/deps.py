"""Typed access to what ``create_app`` put on ``app.state``: the runtime (whose pipeline the
lifespan builds, and a reload replaces) and the metrics.

Async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
dependency per request (it showed as ~30% of the event loop in the gateway profile).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReadyError
from service.pipeline.pipeline import Pipeline
from service.serving.runtime import Runtime
from service.telemetry.metrics import Metrics


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = request.app.state.runtime.pipeline
    if pipeline is None:
        raise NotReadyError("the gateway is still loading its models")
    return pipeline


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
