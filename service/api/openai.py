"""The OpenAI-compatible surface: each ensemble is a model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from service.api.deps import MetricsDep, PipelineDep
from service.api.generate import ERROR_RESPONSES
from service.api.requests import Tracker
from service.api.streaming import answer_events, chat_chunk, now, stream_response, text_chunk
from service.errors import GatewayError, NotFoundError, RequestError
from service.pipeline import Pipeline, Staged
from service.protocol import (
    ChatChoice,
    ChatChoiceMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    GenerateResponse,
    ModelCard,
    ModelList,
)

router = APIRouter(prefix="/v1")


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Each ensemble, as a model."""
    created = int(request.app.state.started_at)
    return ModelList(data=[ModelCard(id=name, created=created) for name in request.app.state.runtime.config.ensembles])


def _check(body: ChatCompletionRequest | CompletionRequest, pipeline: Pipeline) -> None:
    field = body.unsupported()
    if field is not None:
        raise RequestError(f"`{field}` is not supported by an ensemble", param=field, code="unsupported_field")
    if body.model not in pipeline.config.ensembles:
        raise NotFoundError(f"the model `{body.model}` does not exist", param="model", code="model_not_found")


def _usage(r: GenerateResponse) -> CompletionUsage:
    return CompletionUsage(**r.usage.model_dump())


def _finish_reason(staged: Staged) -> str:
    if staged.fuser is None:
        return staged.completions[staged.order[0]].finish_reason or "stop"
    return "stop"


async def _run(
    body: ChatCompletionRequest | CompletionRequest, pipeline: Pipeline, metrics: Any
) -> tuple[Tracker, Staged, GenerateResponse | None]:
    tracker = Tracker(metrics, pipeline, body.model)
    try:
        _check(body, pipeline)
        staged = await pipeline.stage(body.to_generate())
        if body.stream:
            return tracker, staged, None
        response = pipeline.finish(staged, await pipeline.fuse(staged))
        tracker.end(200)
        return tracker, staged, response
    except GatewayError as e:
        tracker.end(e.status)
        raise
    except BaseException:
        tracker.end(500)
        raise


def _usage_events(body: ChatCompletionRequest | CompletionRequest, kind: str, staged: Staged, created: int) -> Any:
    def on_done(r: GenerateResponse) -> list[dict[str, Any]]:
        if body.stream_options is None or not body.stream_options.include_usage:
            return []
        return [
            {
                "id": staged.id,
                "object": kind,
                "created": created,
                "model": staged.name,
                "choices": [],
                "usage": _usage(r).model_dump(),
            }
        ]

    return on_done


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(
    body: ChatCompletionRequest, pipeline: PipelineDep, metrics: MetricsDep
) -> ChatCompletionResponse | StreamingResponse | JSONResponse:
    """Run the ensemble named by `model` on the conversation."""
    tracker, staged, response = await _run(body, pipeline, metrics)
    created = now()
    cid = staged.id.replace("gen-", "chatcmpl-")
    if response is not None:
        return JSONResponse(
            ChatCompletionResponse(
                id=cid,
                created=created,
                model=staged.name,
                choices=[
                    ChatChoice(message=ChatChoiceMessage(content=response.output), finish_reason=_finish_reason(staged))
                ],
                usage=_usage(response),
            ).model_dump()
        )
    finish = _finish_reason(staged)
    return stream_response(
        answer_events(
            pipeline,
            staged,
            first=chat_chunk(cid, created, staged.name, {"role": "assistant", "content": ""}, None),
            chunk=lambda piece, last: chat_chunk(
                cid, created, staged.name, {} if last else {"content": piece}, finish if last else None
            ),
            on_done=_usage_events(body, "chat.completion.chunk", staged, created),
            on_end=tracker.end,
        )
    )


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def completions(
    body: CompletionRequest, pipeline: PipelineDep, metrics: MetricsDep
) -> CompletionResponse | StreamingResponse | JSONResponse:
    """Run the ensemble named by `model` on the prompt."""
    tracker, staged, response = await _run(body, pipeline, metrics)
    created = now()
    cid = staged.id.replace("gen-", "cmpl-")
    if response is not None:
        return JSONResponse(
            CompletionResponse(
                id=cid,
                created=created,
                model=staged.name,
                choices=[CompletionChoice(text=response.output, finish_reason=_finish_reason(staged))],
                usage=_usage(response),
            ).model_dump()
        )
    finish = _finish_reason(staged)
    return stream_response(
        answer_events(
            pipeline,
            staged,
            chunk=lambda piece, last: text_chunk(cid, created, staged.name, piece, finish if last else None),
            on_done=_usage_events(body, "text_completion", staged, created),
            on_end=tracker.end,
        )
    )
