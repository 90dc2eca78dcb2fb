"""POST /v1/responses' serving class: OpenAI's Responses API over the pipeline, the response
object whole or as its event sequence (numbered in order)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from service.errors import GatewayError, NotFoundError, RequestError
from service.pipeline.pipeline import AnswerStream
from service.pipeline.types import Answer
from service.protocol import (
    ChatMessage,
    OutputMessage,
    OutputText,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    error_payload,
)
from service.serving.base import Serving
from service.serving.convert import evidence, query_of, usage_of
from service.serving.sse import AnswerEvents, sse_event
from service.serving.stored import owned_answer, store_or_refuse

EMPTY_TEXT = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}


class ServingResponses(Serving):
    api = "responses"

    async def create(self, body: ResponsesRequest) -> Response:
        before = await self._before(body.previous_response_id) if body.previous_response_id else None
        request = body.to_generate(before)
        echo = {f: getattr(body, f) for f in ECHOED}
        query = self.begin(query_of(request, "model"), body.metadata, echo, retrievable=body.store is not False)
        if not body.stream:
            answer = await self.pipeline.answer(query)
            shape = _Shape(body, answer.id, answer.ensemble, request.return_candidates, self._kept(answer.ensemble))
            return JSONResponse(shape.finished(answer).wire())
        stream = await self.pipeline.answer_stream(query)
        shape = _Shape(body, stream.id, stream.ensemble, request.return_candidates, self._kept(stream.ensemble))
        return AnswerEvents(stream, self.account, _events(shape, stream), shape.failed)

    def _kept(self, ensemble: str) -> bool:
        """Whether this response can be read again: a store, an ensemble that records, ``store`` not false."""
        config = self.pipeline.config
        return self.pipeline.lasting.store is not None and config.ensembles[ensemble].store

    async def _before(self, previous: str) -> list[ChatMessage]:
        """The turns of a stored response: its conversation (without its instructions, which are
        not carried over) and its answer."""
        store = store_or_refuse(self.pipeline.lasting.store, "previous_response_id", "previous_response_id")
        row = await owned_answer(store, previous, self.account.key_id, "previous_response_id", "response", True)
        if row["inputs_hashed"]:
            raise RequestError(
                "previous_response_id: the store keeps no input texts (store.record_inputs is false)",
                param="previous_response_id",
            )
        given = row["input"]
        turns = given.get("messages") or [{"role": "user", "content": given.get("prompt", "")}]
        if (row["request"] or {}).get("instructions") and turns and turns[0]["role"] == "system":
            turns = turns[1:]
        return [*(ChatMessage(**t) for t in turns), ChatMessage(role="assistant", content=row["output"])]

    async def read(self, response_id: str) -> Response:
        store = store_or_refuse(self.pipeline.lasting.store, "reading a response")
        row = await owned_answer(store, response_id, self.account.key_id, "response_id", "response", True)
        return JSONResponse(stored_response(row).wire())

    async def delete(self, response_id: str) -> Response:
        store = store_or_refuse(self.pipeline.lasting.store, "deleting a response")
        row = await owned_answer(store, response_id, self.account.key_id, "response_id", "response", True)
        if not await store.delete(row["id"]):
            raise NotFoundError(f"no response with id {response_id!r}", param="response_id", code="not_found")
        return JSONResponse({"id": f"resp_{row['id']}", "object": "response", "deleted": True})


ECHOED = ("instructions", "max_output_tokens", "temperature", "top_p", "user", "previous_response_id")


def stored_response(row: dict[str, Any]) -> ResponseObject:
    """A stored answer as the response object it was returned as."""
    echo = row["request"] or {}
    status = "incomplete" if row["finish_reason"] == "length" else "completed"
    u = row["usage"]
    return ResponseObject(
        id=f"resp_{row['id']}",
        created_at=int(row["created_at"]),
        status=status,
        model=row["ensemble"],
        output=[OutputMessage(id=f"msg_{row['id']}", status=status, content=[OutputText(text=row["output"])])],
        usage=ResponseUsage(
            input_tokens=u["prompt_tokens"],
            output_tokens=u["completion_tokens"],
            total_tokens=u["total_tokens"],
            members=u["members"],
        ),
        incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
        metadata=row["metadata"] or {},
        store=True,
        **echo,
    )


async def _events(out: _Shape, stream: AnswerStream) -> AsyncIterator[str]:
    """created, in_progress, the output item and its text part opened, a delta per piece, each closed
    again, then completed (incomplete when the answer hit its token limit); a failure after the
    stream began is ``response.failed`` with the error (``_Shape.failed``)."""
    yield sse_event(out.event("response.created", response=out.response("in_progress")))
    yield sse_event(out.event("response.in_progress", response=out.response("in_progress")))
    yield sse_event(out.event("response.output_item.added", output_index=0, item=out.message("", "in_progress")))
    yield sse_event(out.text_event("response.content_part.added", part=EMPTY_TEXT))
    parts: list[str] = []
    async with contextlib.aclosing(stream.pieces()) as pieces:
        async for piece in pieces:
            parts.append(piece)
            yield sse_event(out.text_event("response.output_text.delta", delta=piece, logprobs=[]))
    answer = stream.answer
    text = "".join(parts)
    yield sse_event(out.text_event("response.output_text.done", text=text, logprobs=[]))
    yield sse_event(out.text_event("response.content_part.done", part={**EMPTY_TEXT, "text": text}))
    final = out.finished(answer)
    yield sse_event(out.event("response.output_item.done", output_index=0, item=final.output[0]))
    yield sse_event(
        out.event(f"response.{'incomplete' if final.status == 'incomplete' else 'completed'}", response=final)
    )


class _Shape:
    """One request's response objects and stream events (numbered in order)."""

    def __init__(self, body: ResponsesRequest, answer_id: str, ensemble: str, asked: bool, kept: bool):
        self.body = body
        self.kept = kept and body.store is not False
        self.id = f"resp_{answer_id}"
        self.item_id = f"msg_{answer_id}"
        self.ensemble = ensemble
        self.asked = asked
        self.created_at = int(time.time())
        self.sequence = 0

    def response(
        self,
        status: str,
        text: str | None = None,
        answer: Answer | None = None,
        error: dict[str, Any] | None = None,
    ) -> ResponseObject:
        b = self.body
        output = [] if text is None else [self.message(text, "incomplete" if status == "incomplete" else "completed")]
        usage = None
        if answer is not None:
            u = answer.usage
            usage = ResponseUsage(
                input_tokens=u.prompt_tokens,
                output_tokens=u.completion_tokens,
                total_tokens=u.total_tokens,
                members=usage_of(answer).members,
            )
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            model=self.ensemble,
            output=output,
            usage=usage,
            error=error,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=b.instructions,
            max_output_tokens=b.max_output_tokens,
            temperature=b.temperature,
            top_p=b.top_p,
            metadata=b.metadata or {},
            store=self.kept,
            previous_response_id=b.previous_response_id,
            user=b.user,
            ensemble=evidence(answer, self.asked) if answer is not None else None,
        )

    def message(self, text: str, status: str) -> OutputMessage:
        content = [] if status == "in_progress" else [OutputText(text=text)]
        return OutputMessage(id=self.item_id, status=status, content=content)

    def finished(self, answer: Answer) -> ResponseObject:
        status = "incomplete" if answer.finish_reason == "length" else "completed"
        return self.response(status, answer.output, answer)

    def failed(self, e: GatewayError) -> list[str]:
        error = error_payload(e)["error"]
        failed = self.response(
            "failed", error={"code": error.get("code") or "server_error", "message": error["message"]}
        )
        return [sse_event(self.event("response.failed", response=failed))]

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """One stream event: ``type``, its fields, and the next ``sequence_number``."""
        out = {"type": kind, "sequence_number": self.sequence}
        self.sequence += 1
        for k, v in fields.items():
            out[k] = v.wire() if isinstance(v, ResponseObject) else v.model_dump() if isinstance(v, BaseModel) else v
        return out

    def text_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self.event(kind, item_id=self.item_id, output_index=0, content_index=0, **fields)
