"""The OpenAI-compatible surface: each ensemble is a model."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from service.serving.accounting import EnsembleRoute
from service.serving.api.deps import ChatDep, CompletionDep, RuntimeDep

router = APIRouter(prefix="/v1")
answers = APIRouter(route_class=EnsembleRoute)
STREAMS = {**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}}


@router.get("/models", response_model=ModelList)
async def list_models(runtime: RuntimeDep) -> ModelList:
    """Each ensemble, as a model."""
    created = int(runtime.started_at)
    return ModelList(data=[ModelCard(id=name, created=created) for name in runtime.config.ensembles])


@answers.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAMS)
async def chat_completions(body: ChatCompletionRequest, serving: ChatDep) -> Response:
    """Run the ensemble named by `model` on the conversation."""
    return await serving.create(body)


@answers.post("/completions", response_model=CompletionResponse, responses=STREAMS)
async def completions(body: CompletionRequest, serving: CompletionDep) -> Response:
    """Run the ensemble named by `model` on the prompt."""
    return await serving.create(body)


router.include_router(answers)
