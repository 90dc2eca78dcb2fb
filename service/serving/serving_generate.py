"""POST /generate's serving class: the query made from the body, the whole answer as JSON, or its
stream (OpenAI chat chunks, one ``ensemble.result`` event with the whole response, ``[DONE]``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi.responses import Response

from service.pipeline.pipeline import AnswerStream
from service.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    EnsembleResult,
    GenerateRequest,
)
from service.serving.base import Serving
from service.serving.convert import generate_response, query_of
from service.serving.sse import model_json, now, sse


class ServingGenerate(Serving):
    """POST /generate."""

    async def create(self, body: GenerateRequest) -> Response:
        query = self.begin(query_of(body), body.metadata)
        if not body.stream:
            answer = await self.pipeline.answer(query)
            return model_json(generate_response(answer, body.return_candidates), exclude_none=True)
        stream = await self.pipeline.answer_stream(query)
        return self.events(stream, self._chunks(stream, body))

    async def _chunks(self, stream: AnswerStream, body: GenerateRequest) -> AsyncIterator[str]:
        created, cid = now(), f"gen-{stream.id}"

        def chunk(delta: ChatDelta, finish: str | None = None) -> str:
            choice = ChatChunkChoice(delta=delta, finish_reason=finish)
            return sse(ChatCompletionChunk(id=cid, created=created, model=stream.ensemble, choices=[choice]))

        yield chunk(ChatDelta(role="assistant", content=""))
        async with contextlib.aclosing(stream.pieces()) as pieces:
            async for piece in pieces:
                yield chunk(ChatDelta(content=piece))
        yield chunk(ChatDelta(), "stop")
        response = generate_response(stream.answer, body.return_candidates)
        yield sse(EnsembleResult(**response.model_dump()), exclude_none=True)
