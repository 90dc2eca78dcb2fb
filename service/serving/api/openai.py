"""The OpenAI-compatible surface: each ensemble is a model."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.protocol import (
    ERROR_RESPONSES,
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    GenerateResponse,
    ModelCard,
    ModelList,
    evidence,
)
from service.serving.api.deps import PipelineDep
from service.serving.sse import answer_events, model_json, now

router = APIRouter(prefix="/v1")


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    """Each ensemble, as a model."""
    created = int(request.app.state.started_at)
    return ModelList(data=[ModelCard(id=name, created=created) for name in request.app.state.runtime.config.ensembles])


Chunk = ChatCompletionChunk | CompletionChunk


def _closing_chunks(
    body: ChatCompletionRequest | CompletionRequest, last: Chunk
) -> Callable[[GenerateResponse], list[Chunk]]:
    """After the finishing chunk: with ``ensemble.return_candidates``, one chunk (no choices) with
    the evidence; with ``stream_options.include_usage``, OpenAI's usage chunk (no choices)."""

    def make(response: GenerateResponse) -> list[Chunk]:
        out: list[Chunk] = []
        proof = evidence(response)
        if proof is not None:
            out.append(last.model_copy(update={"choices": [], "ensemble": proof}))
        if body.stream_options is not None and body.stream_options.include_usage:
            out.append(last.model_copy(update={"choices": [], "usage": response.usage}))
        return out

    return make


@router.post(
    "/chat/completions",
    response_model=ChatCompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(body: ChatCompletionRequest, pipeline: PipelineDep) -> Response:
    """Run the ensemble named by `model` on the conversation."""
    request = body.to_generate()
    if not request.stream:
        r = await pipeline.answer(request)
        choice = ChatChoice(message=ChatChoiceMessage(content=r.output), finish_reason=r.finish_reason)
        plain = ChatCompletionResponse(
            id=_id("chatcmpl-", r.id),
            created=now(),
            model=r.ensemble,
            choices=[choice],
            usage=r.usage,
            ensemble=evidence(r),
        )
        return model_json(plain)
    stream = await pipeline.answer_stream(request)
    cid, created = _id("chatcmpl-", stream.id), now()

    def chunk(piece: str, finish: str | None, role: bool = False) -> ChatCompletionChunk:
        delta = (
            ChatDelta(role="assistant", content="") if role else ChatDelta(content=piece if finish is None else None)
        )
        choice = ChatChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(id=cid, created=created, model=stream.ensemble, choices=[choice])

    return answer_events(
        stream, first=chunk("", None, role=True), chunk=chunk, after=_closing_chunks(body, chunk("", None))
    )


@router.post(
    "/completions",
    response_model=CompletionResponse,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def completions(body: CompletionRequest, pipeline: PipelineDep) -> Response:
    """Run the ensemble named by `model` on the prompt."""
    request = body.to_generate()
    if not request.stream:
        r = await pipeline.answer(request)
        choice = CompletionChoice(text=r.output, finish_reason=r.finish_reason)
        plain = CompletionResponse(
            id=_id("cmpl-", r.id),
            created=now(),
            model=r.ensemble,
            choices=[choice],
            usage=r.usage,
            ensemble=evidence(r),
        )
        return model_json(plain)
    stream = await pipeline.answer_stream(request)
    cid, created = _id("cmpl-", stream.id), now()

    def chunk(piece: str, finish: str | None) -> CompletionChunk:
        choice = CompletionChunkChoice(text=piece, finish_reason=finish)
        return CompletionChunk(id=cid, created=created, model=stream.ensemble, choices=[choice])

    return answer_events(stream, chunk=chunk, after=_closing_chunks(body, chunk("", None)))


def _id(prefix: str, answer_id: str) -> str:
    return answer_id.replace("gen-", prefix)
