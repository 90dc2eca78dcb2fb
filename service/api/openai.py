"""The OpenAI-compatible surface: each ensemble is a model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from service.api.deps import AdmissionDep, MetricsDep, PipelineDep
from service.api.generate import ERROR_RESPONSES
from service.api.requests import run_tracked
from service.api.streaming import answer_events, chat_chunk, now, stream_response, text_chunk
from service.errors import NotFoundError, RequestError
from service.metrics import Metrics
from service.pipeline import Pipeline, Staged
from service.protocol import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
)
from service.resilience import Admission

router = APIRouter(prefix="/v1")


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Each ensemble, as a model."""
    created = int(request.app.state.started_at)
    return ModelList(data=[ModelCard(id=name, created=created) for name in request.app.state.runtime.config.ensembles])


def _prepare(body: ChatCompletionRequest | CompletionRequest, pipeline: Pipeline) -> GenerateRequest:
    field = body.unsupported()
    if field is not None:
        raise RequestError(f"`{field}` is not supported by an ensemble", param=field, code="unsupported_field")
    if body.model not in pipeline.config.ensembles:
        raise NotFoundError(f"the model `{body.model}` does not exist", param="model", code="model_not_found")
    return body.to_generate()


def _finish_reason(staged: Staged) -> str:
    if staged.fuser is None:
        return staged.completions[staged.order[0]].finish_reason or "stop"
    return "stop"


# (id, created, model, finish_reason, response) -> the plain (non-streamed) response body
PlainBody = Callable[[str, int, str, str, GenerateResponse], BaseModel]
# (id, created, model, piece, finish_reason or None) -> one stream chunk
Chunk = Callable[[str, int, str, str, str | None], dict[str, Any]]


async def _serve(
    body: ChatCompletionRequest | CompletionRequest,
    pipeline: Pipeline,
    metrics: Metrics,
    admission: Admission,
    *,
    id_prefix: str,
    chunk_object: str,
    plain: PlainBody,
    chunk: Chunk,
    first: Callable[[str, int, str], dict[str, Any]] | None = None,
) -> JSONResponse | StreamingResponse:
    """Run the ensemble named by ``model``; answer in one body or as OpenAI stream chunks."""
    tracker, staged, response = await run_tracked(
        pipeline, metrics, admission, body.model, lambda: _prepare(body, pipeline)
    )
    created = now()
    cid = staged.id.replace("gen-", id_prefix)
    finish = _finish_reason(staged)
    if response is not None:
        return JSONResponse(plain(cid, created, staged.name, finish, response).model_dump())

    def usage_chunk(r: GenerateResponse) -> list[dict[str, Any]]:
        if body.stream_options is None or not body.stream_options.include_usage:
            return []
        usage = r.usage.model_dump()
        return [
            {"id": cid, "object": chunk_object, "created": created, "model": staged.name, "choices": [], "usage": usage}
        ]

    return stream_response(
        answer_events(
            pipeline,
            staged,
            first=first(cid, created, staged.name) if first is not None else None,
            chunk=lambda piece, last: chunk(cid, created, staged.name, piece, finish if last else None),
            on_done=usage_chunk,
            on_end=tracker.end,
        ),
        tracker.end,
    )


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(
    body: ChatCompletionRequest, pipeline: PipelineDep, metrics: MetricsDep, admission: AdmissionDep
) -> JSONResponse | StreamingResponse:
    """Run the ensemble named by `model` on the conversation."""
    return await _serve(
        body,
        pipeline,
        metrics,
        admission,
        id_prefix="chatcmpl-",
        chunk_object="chat.completion.chunk",
        plain=lambda cid, created, model, finish, r: ChatCompletionResponse(
            id=cid,
            created=created,
            model=model,
            choices=[ChatChoice(message=ChatChoiceMessage(content=r.output), finish_reason=finish)],
            usage=r.usage,
        ),
        chunk=lambda cid, created, model, piece, finish: chat_chunk(
            cid, created, model, {} if finish else {"content": piece}, finish
        ),
        first=lambda cid, created, model: chat_chunk(cid, created, model, {"role": "assistant", "content": ""}, None),
    )


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def completions(
    body: CompletionRequest, pipeline: PipelineDep, metrics: MetricsDep, admission: AdmissionDep
) -> JSONResponse | StreamingResponse:
    """Run the ensemble named by `model` on the prompt."""
    return await _serve(
        body,
        pipeline,
        metrics,
        admission,
        id_prefix="cmpl-",
        chunk_object="text_completion",
        plain=lambda cid, created, model, finish, r: CompletionResponse(
            id=cid,
            created=created,
            model=model,
            choices=[CompletionChoice(text=r.output, finish_reason=finish)],
            usage=r.usage,
        ),
        chunk=text_chunk,
    )
