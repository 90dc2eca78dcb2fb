"""Typed access to what ``create_app`` put on ``app.state`` (the runtime, whose pipeline the lifespan
builds and a reload replaces; the metrics) and to the request's account (``EnsembleRoute``), and
each API's serving object, bound to the current pipeline and the request's account.

Async on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
dependency per request (it showed as ~30% of the event loop in the gateway profile).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.serving.accounting import Account
from service.serving.runtime import Runtime
from service.serving.serving_feedback import ServingFeedback
from service.serving.serving_generate import ServingGenerate
from service.serving.serving_openai import ServingChat, ServingCompletion
from service.serving.serving_responses import ServingResponses
from service.telemetry.metrics import Metrics


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


def _account(request: Request) -> Account:
    account: Account = request.state.account
    return account


async def get_generate(request: Request) -> ServingGenerate:
    return ServingGenerate(request.app.state.runtime.current(), _account(request))


async def get_chat(request: Request) -> ServingChat:
    return ServingChat(request.app.state.runtime.current(), _account(request))


async def get_completion(request: Request) -> ServingCompletion:
    return ServingCompletion(request.app.state.runtime.current(), _account(request))


async def get_responses(request: Request) -> ServingResponses:
    return ServingResponses(request.app.state.runtime.current(), _account(request))


async def get_feedback(request: Request) -> ServingFeedback:
    runtime: Runtime = request.app.state.runtime
    return ServingFeedback(runtime.lasting.store, getattr(request.state, "key_id", None), runtime.metrics)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
GenerateDep = Annotated[ServingGenerate, Depends(get_generate)]
ChatDep = Annotated[ServingChat, Depends(get_chat)]
CompletionDep = Annotated[ServingCompletion, Depends(get_completion)]
ResponsesDep = Annotated[ServingResponses, Depends(get_responses)]
FeedbackDep = Annotated[ServingFeedback, Depends(get_feedback)]
