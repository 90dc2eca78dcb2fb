"""Server-sent events: an answer stream as OpenAI-style chunks.

A stream starts only after fan-out and ranking succeeded, so those errors still get their HTTP
status; an error during fusion arrives as a ``data: {"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from service.errors import GatewayError
from service.pipeline.pipeline import AnswerStream
from service.protocol import GenerateResponse, error_payload

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: BaseModel | dict[str, object] | str) -> str:
    if isinstance(data, BaseModel):
        # A whole response leaves out what it lacks, as /generate's JSON does; chunks keep their nulls.
        payload = data.model_dump_json(exclude_none=isinstance(data, GenerateResponse))
    elif isinstance(data, dict):
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    else:
        payload = data
    return f"data: {payload}\n\n"


def sse_event(data: dict[str, Any]) -> str:
    """A named event (``event:`` is its ``type``), as the Responses API streams them."""
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def model_json(model: BaseModel, exclude_none: bool = False) -> Response:
    """A JSON response serialized by pydantic in one pass (not ``JSONResponse(model.model_dump())``,
    which builds the dicts first and then encodes them again with ``json``)."""
    return Response(model.model_dump_json(exclude_none=exclude_none), media_type="application/json")


def now() -> int:
    return int(time.time())


class _AnswerResponse(StreamingResponse):
    """The stream's response; when it ends, however it ends (even when the client left before the
    first byte, so the event generator never ran), the answer stream is told."""

    def __init__(self, events: AsyncIterator[str], stream: AnswerStream):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.abandon()  # a no-op when the stream already ended


def event_response(events: AsyncIterator[str], stream: AnswerStream) -> StreamingResponse:
    """Any SSE body over an answer stream, with the stream told when the response ends."""
    return _AnswerResponse(events, stream)


def answer_events(
    stream: AnswerStream,
    *,
    chunk: Callable[[str, str | None], BaseModel],
    first: BaseModel | None = None,
    after: Callable[[GenerateResponse], Iterable[BaseModel]] = lambda _: (),
) -> StreamingResponse:
    """The answer as SSE: ``first`` (if any), ``chunk(piece, None)`` per piece, a closing
    ``chunk("", finish_reason)``, what ``after`` makes of the whole response, then ``[DONE]``."""

    async def events() -> AsyncIterator[str]:
        if first is not None:
            yield sse(first)
        try:
            async with contextlib.aclosing(stream.pieces()) as pieces:
                async for piece in pieces:
                    yield sse(chunk(piece, None))
            yield sse(chunk("", stream.finish_reason))
            if stream.response is not None:
                for extra in after(stream.response):
                    yield sse(extra)
        except GatewayError as e:
            yield sse(error_payload(e))
        yield sse("[DONE]")

    return _AnswerResponse(events(), stream)
