"""Server-sent events in OpenAI's chunk format.

A stream starts only after fan-out and ranking succeeded, so those errors still get their HTTP
status; an error during fusion arrives as a ``data: {"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from service.errors import GatewayError, error_body
from service.pipeline import Pipeline, Staged
from service.protocol import GenerateResponse

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: Any) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


def chat_chunk(id_: str, created: int, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def text_chunk(id_: str, created: int, model: str, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


class _TrackedStream(StreamingResponse):
    """A stream that ends its request's accounting however it ends, even when the client left
    before the first byte (then the event generator never runs, and its ``finally`` neither)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[int], None]):
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close(499)  # a no-op when the stream already reported its status


def stream_response(events: AsyncIterator[str], on_close: Callable[[int], None]) -> StreamingResponse:
    return _TrackedStream(events, on_close)


async def answer_events(
    pipeline: Pipeline,
    staged: Staged,
    *,
    chunk: Callable[[str, bool], dict[str, Any] | None],
    first: dict[str, Any] | None = None,
    on_done: Callable[[GenerateResponse], list[dict[str, Any]]] | None = None,
    on_end: Callable[[int], None] | None = None,
) -> AsyncIterator[str]:
    """The fused answer as SSE: ``first`` (if any), one chunk per piece, a closing chunk, what
    ``on_done`` adds from the whole response, then ``[DONE]``. ``on_end`` gets the status."""
    status = 200
    try:
        if first is not None:
            yield sse(first)
        pieces: list[str] = []
        async for piece in pipeline.fuse_stream(staged):
            pieces.append(piece)
            event = chunk(piece, False)
            if event is not None:
                yield sse(event)
        closing = chunk("", True)
        if closing is not None:
            yield sse(closing)
        response = pipeline.finish(staged, "".join(pieces))
        for extra in on_done(response) if on_done is not None else []:
            yield sse(extra)
    except GatewayError as e:
        status = e.status
        yield sse(e.body())
    except (GeneratorExit, asyncio.CancelledError):
        status = 499  # the client went away
        raise
    except Exception:
        status = 500
        logger.exception("stream failed")
        yield sse(error_body("internal error", "internal_error", None, "internal_error"))
    finally:
        if on_end is not None:
            on_end(status)
    yield sse("[DONE]")


def now() -> int:
    return int(time.time())
