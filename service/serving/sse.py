"""Server-sent events, and the response that carries an answer stream.

A stream starts only after fan-out and ranking succeeded, so those errors still get their HTTP
status; an error during fusion arrives as an error event in the API's own shape.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from service.errors import GatewayError
from service.pipeline.pipeline import AnswerStream
from service.serving.accounting import Account

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


def sse(data: BaseModel | dict[str, Any], exclude_none: bool = False) -> str:
    """One ``data:`` event."""
    if isinstance(data, BaseModel):
        payload = data.model_dump_json(exclude_none=exclude_none)
    else:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
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


class AnswerEvents(StreamingResponse):
    """An answer stream as SSE. ``events`` are the API's events; a ``GatewayError`` they raise
    becomes the API's error events (``failed``); ``closing`` follows either way. The request's
    account ends with 200, the error's status, or 499 when the client left first; the answer
    stream is closed when the response ends, however it ends (even when the client left before
    the first byte, so the events never ran)."""

    def __init__(
        self,
        stream: AnswerStream,
        account: Account,
        events: AsyncIterator[str],
        failed: Callable[[GatewayError], Iterable[str]],
        closing: Iterable[str] = (),
    ):
        self._stream = stream
        self._account = account
        super().__init__(self._body(events, failed, closing), media_type="text/event-stream", headers=SSE_HEADERS)

    async def _body(
        self, events: AsyncIterator[str], failed: Callable[[GatewayError], Iterable[str]], closing: Iterable[str]
    ) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except GatewayError as e:
            self._account.end(e.status)
            for event in failed(e):
                yield event
        self._account.end(200)
        for event in closing:
            yield event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()  # a no-op when the stream already ended
            self._account.end(499)  # likewise
