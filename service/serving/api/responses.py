"""POST /v1/responses: OpenAI's Responses API, each ensemble a model."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from service.errors import GatewayError
from service.pipeline.pipeline import AnswerStream
from service.protocol import ERROR_RESPONSES, Responder, ResponseObject, ResponsesRequest, error_payload
from service.serving.api.deps import PipelineDep
from service.serving.sse import event_response, sse_event

router = APIRouter(prefix="/v1")


@router.post(
    "/responses",
    response_model=ResponseObject,
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}},
)
async def create_response(body: ResponsesRequest, pipeline: PipelineDep) -> JSONResponse | StreamingResponse:
    """Run the ensemble named by `model` on the input; `stream: true` sends OpenAI's event sequence."""
    request = body.to_generate()
    if not request.stream:
        r = await pipeline.answer(request)
        return JSONResponse(Responder(body, r.id, r.ensemble).finished(r).wire())
    stream = await pipeline.answer_stream(request)
    return event_response(_events(Responder(body, stream.id, stream.ensemble), stream), stream)


async def _events(out: Responder, stream: AnswerStream) -> AsyncIterator[str]:
    """created, in_progress, the output item and its text part opened, a delta per piece, each closed
    again, then completed (incomplete when the answer hit its token limit); a failure after the
    stream began is ``response.failed`` with the error."""
    yield sse_event(out.event("response.created", response=out.response("in_progress")))
    yield sse_event(out.event("response.in_progress", response=out.response("in_progress")))
    yield sse_event(out.event("response.output_item.added", output_index=0, item=out.message("", "in_progress")))
    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    yield sse_event(out.text_event("response.content_part.added", part=empty))
    parts: list[str] = []
    try:
        async with contextlib.aclosing(stream.pieces()) as pieces:
            async for piece in pieces:
                parts.append(piece)
                yield sse_event(out.text_event("response.output_text.delta", delta=piece, logprobs=[]))
    except GatewayError as e:
        error = error_payload(e)["error"]
        failed = out.response(
            "failed", error={"code": error.get("code") or "server_error", "message": error["message"]}
        )
        yield sse_event(out.event("response.failed", response=failed))
        return
    r = stream.response
    if r is None:  # cannot happen: pieces end with the response set, or raise
        failed = out.response("failed", error={"code": "internal_error", "message": "internal error"})
        yield sse_event(out.event("response.failed", response=failed))
        return
    text = "".join(parts)
    yield sse_event(out.text_event("response.output_text.done", text=text, logprobs=[]))
    done = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    yield sse_event(out.text_event("response.content_part.done", part=done))
    final = out.finished(r)
    yield sse_event(out.event("response.output_item.done", output_index=0, item=final.output[0]))
    yield sse_event(
        out.event(f"response.{'incomplete' if final.status == 'incomplete' else 'completed'}", response=final)
    )
