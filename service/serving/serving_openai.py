"""The OpenAI API's chat and text completions: one serving class each, over a shared base that
holds what they have in common (the query, the full body, the stream and its closing chunks)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi.responses import Response
from pydantic import BaseModel

from service.pipeline.pipeline import AnswerStream
from service.pipeline.types import Answer
from service.protocol import (
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
    GenerateRequest,
)
from service.serving.base import Serving
from service.serving.convert import evidence, query_of, usage_of
from service.serving.sse import model_json, now, sse

Chunk = ChatCompletionChunk | CompletionChunk


class _ServingOpenAI(Serving):
    prefix: str  # of the API's ids: the answer's id follows it
    response: type[ChatCompletionResponse] | type[CompletionResponse]

    def choice(self, answer: Answer) -> ChatChoice | CompletionChoice:
        raise NotImplementedError

    def body(self, answer: Answer, created: int, asked: bool) -> BaseModel:
        """The whole response: one choice, the usage, and the evidence where asked."""
        return self.response(
            id=f"{self.prefix}{answer.id}",
            created=created,
            model=answer.ensemble,
            choices=[self.choice(answer)],
            usage=usage_of(answer),
            ensemble=evidence(answer, asked),
        )

    def chunk(self, cid: str, created: int, model: str, piece: str | None, finish: str | None = None) -> Chunk:
        """A chunk with ``piece`` (None: the closing chunk, with ``finish``)."""
        raise NotImplementedError

    def opening(self, cid: str, created: int, model: str) -> list[Chunk]:
        return []

    async def answer(self, body: ChatCompletionRequest | CompletionRequest, request: GenerateRequest) -> Response:
        query = self.begin(query_of(request, "model"), body.metadata)
        asked = request.return_candidates
        if not body.stream:
            answer = await self.pipeline.answer(query)
            return model_json(self.body(answer, now(), asked))
        stream = await self.pipeline.answer_stream(query)
        return self.events(stream, self._chunks(stream, body, asked))

    async def _chunks(
        self, stream: AnswerStream, body: ChatCompletionRequest | CompletionRequest, asked: bool
    ) -> AsyncIterator[str]:
        """The opening chunks, one per piece, the closing chunk with the finish reason; then with
        ``ensemble.return_candidates`` one chunk (no choices) with the evidence, and with
        ``stream_options.include_usage`` OpenAI's usage chunk (no choices)."""
        cid, created, model = f"{self.prefix}{stream.id}", now(), stream.ensemble
        for c in self.opening(cid, created, model):
            yield sse(c)
        async with contextlib.aclosing(stream.pieces()) as pieces:
            async for piece in pieces:
                yield sse(self.chunk(cid, created, model, piece))
        last = self.chunk(cid, created, model, None, stream.finish_reason)
        yield sse(last)
        answer = stream.answer
        proof = evidence(answer, asked)
        if proof is not None:
            yield sse(last.model_copy(update={"choices": [], "ensemble": proof}))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse(last.model_copy(update={"choices": [], "usage": usage_of(answer)}))


class ServingChat(_ServingOpenAI):
    """POST /v1/chat/completions."""

    prefix = "chatcmpl-"
    api = "chat"
    response = ChatCompletionResponse

    async def create(self, body: ChatCompletionRequest) -> Response:
        return await self.answer(body, body.to_generate())

    def choice(self, answer: Answer) -> ChatChoice:
        return ChatChoice(message=ChatChoiceMessage(content=answer.output), finish_reason=answer.finish_reason)

    def opening(self, cid: str, created: int, model: str) -> list[Chunk]:
        choice = ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))
        return [ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice])]

    def chunk(self, cid: str, created: int, model: str, piece: str | None, finish: str | None = None) -> Chunk:
        choice = ChatChunkChoice(delta=ChatDelta(content=piece), finish_reason=finish)
        return ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice])


class ServingCompletion(_ServingOpenAI):
    """POST /v1/completions."""

    prefix = "cmpl-"
    api = "completions"
    response = CompletionResponse

    async def create(self, body: CompletionRequest) -> Response:
        return await self.answer(body, body.to_generate())

    def choice(self, answer: Answer) -> CompletionChoice:
        return CompletionChoice(text=answer.output, finish_reason=answer.finish_reason)

    def chunk(self, cid: str, created: int, model: str, piece: str | None, finish: str | None = None) -> Chunk:
        choice = CompletionChunkChoice(text=piece or "", finish_reason=finish)
        return CompletionChunk(id=cid, created=created, model=model, choices=[choice])
