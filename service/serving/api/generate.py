"""POST /generate: one prompt in, one ensemble answer out, with its evidence."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from service.protocol import (
    ERROR_RESPONSES,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    EnsembleResult,
    GenerateRequest,
    GenerateResponse,
)
from service.serving.api.deps import PipelineDep
from service.serving.sse import answer_events, model_json, now

router = APIRouter()


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when `stream` is true."},
    },
)
async def generate(body: GenerateRequest, pipeline: PipelineDep) -> Response:
    """Fan the prompt out to the ensemble's members, rank the candidates, fuse the best."""
    if not body.stream:
        response = await pipeline.answer(body)
        return model_json(response, exclude_none=True)
    stream = await pipeline.answer_stream(body)
    created = now()

    def chunk(piece: str, finish: str | None, role: bool = False) -> ChatCompletionChunk:
        delta = (
            ChatDelta(role="assistant", content="") if role else ChatDelta(content=piece if finish is None else None)
        )
        choice = ChatChunkChoice(delta=delta, finish_reason="stop" if finish else None)
        return ChatCompletionChunk(id=stream.id, created=created, model=stream.ensemble, choices=[choice])

    return answer_events(
        stream,
        first=chunk("", None, role=True),
        chunk=chunk,
        after=lambda r: [EnsembleResult(**r.model_dump())],
    )
