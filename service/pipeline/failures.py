"""The one rule for a router, ranker or fuser that fails: the answer comes without it, and says why.

Routing, ranking and fusion are optional work on the way to an answer: when one raises or overruns
the deadline, the request is answered from what it has (every member, member order, or the top
candidate), the failure is counted (``gateway_model_errors`` by stage, ``gateway_degraded`` by
ensemble) and named in the answer's ``degraded_reasons``. Only a fuser that fails after its first streamed piece ends
the request with an error: its answer has already begun.
"""

from __future__ import annotations

import logging
from typing import Literal

from service.errors import GatewayError, ModelError
from service.telemetry.metrics import Metrics

logger = logging.getLogger("service.pipeline")

Stage = Literal["route", "rank", "fuse"]
ROLE: dict[Stage, str] = {"route": "router", "rank": "ranker", "fuse": "fuser"}  # the stage's model, as reasons name it


def as_model_error(stage: Stage, model: str, error: BaseException) -> GatewayError:
    """The error a client sees for a model failure: a ``GatewayError`` as it is, anything else as
    ``ModelError`` naming the model."""
    if isinstance(error, GatewayError):
        return error
    if isinstance(error, TimeoutError):
        return ModelError(f"{ROLE[stage]} {model}: no result before the deadline")
    return ModelError(f"{ROLE[stage]} {model} failed: {type(error).__name__}: {error}")


def degrade(
    reasons: list[str], ensemble: str, stage: Stage, model: str, error: BaseException, metrics: Metrics
) -> None:
    """Count the failure and add to ``reasons`` (the answer's) that it comes without this stage."""
    metrics.model_errors.labels(stage, model).inc()
    detail = (
        "no result before the deadline"
        if isinstance(error, TimeoutError)
        else as_model_error(stage, model, error).message
    )
    role = ROLE[stage]
    logger.warning("%s %s failed; answering without it: %s", role, model, detail)
    reasons.append(f"{role}_failed: {detail}")
    metrics.degraded.labels(ensemble, f"{role}_failed").inc()
