"""The adapter server's HTTP side: the OpenAI subset the gateway uses of a member server.

``/v1/chat/completions`` and ``/v1/completions`` (JSON or server-sent events), ``/v1/models`` (the
base, and each adapter with the base as parent, as vLLM lists LoRA adapters), ``/health``; errors in
OpenAI's shape. A request names the base or one adapter as ``model``. With an API key (``--api-key``
or ``VLLM_API_KEY``, as vLLM), every ``/v1`` route wants ``Authorization: Bearer KEY`` (compared in
constant time) and ``/health`` stays open, as vLLM's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service.adapterserver.engine import Engine, Job


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _number(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise BadRequest(f"`{key}` must be a number in [{low:g}, {high:g}]", param=key)
    return float(value)


def create_app(engine: Engine, served_name: str, max_model_len: int = 2048, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="ensemble-gateway adapter server")

    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def require_key(request: Request, call_next: Any) -> Response:
            given = request.headers.get("authorization", "").encode()
            if request.url.path.startswith("/v1") and not hmac.compare_digest(given, expected):
                return _error(401, "a valid API key is required (Authorization: Bearer KEY)", "invalid_api_key")
            response: Response = await call_next(request)
            return response

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, e: BadRequest) -> JSONResponse:
        return _error(e.status, str(e), e.code, e.param)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": served_name, "object": "model", "created": now, "owned_by": "ensemble-gateway", "parent": None}]
        data += [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "ensemble-gateway",
                "parent": served_name,
                "adapter_type": arch,
            }
            for name, arch in engine.adapters.items()
        ]
        return {"object": "list", "data": data}

    async def parse(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise BadRequest(f"the body is not JSON: {e}") from e
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def job_for(body: dict[str, Any], input_ids: list[int]) -> Job:
        model = body.get("model")
        if model not in (served_name, *engine.adapters):
            raise BadRequest(f"The model `{model}` does not exist.", status=404, code="model_not_found", param="model")
        if body.get("n", 1) != 1:
            raise BadRequest("only n = 1 is served", param="n")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("`max_tokens` must be a positive integer", param="max_tokens")
        if len(input_ids) + max_tokens > max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {max_model_len} tokens; the prompt has {len(input_ids)} "
                f"and max_tokens is {max_tokens}.",
                param="max_tokens",
            )
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest("`seed` must be an integer", param="seed")
        return Job(
            adapter=None if model == served_name else model,
            input_ids=input_ids,
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 1e-6, 1.0),
            seed=seed,
        )

    async def answer(body: dict[str, Any], input_ids: list[int], chat: bool) -> Response:
        job = job_for(body, input_ids)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.get("stream"):
            return StreamingResponse(_events(engine, job, rid, body["model"], chat), media_type="text/event-stream")
        ids, reason = await asyncio.wrap_future(engine.submit(job))
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [choice],
                "usage": {
                    "prompt_tokens": len(input_ids),
                    "completion_tokens": len(ids),
                    "total_tokens": len(input_ids) + len(ids),
                },
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("`messages` must be a non-empty list", param="messages")
        flat = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest("each message needs a `role` and `content`", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # OpenAI's content parts: the text ones, joined
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise BadRequest("each message needs a `role` and `content`", param="messages")
            flat.append({"role": m["role"], "content": content})
        try:
            ids = engine.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True)
        except Exception as e:
            raise BadRequest(f"the chat template refused the messages: {e}", param="messages") from e
        return await answer(body, list(ids), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("`prompt` must be a string", param="prompt")
        ids = engine.tokenizer(prompt)["input_ids"]
        return await answer(body, list(ids), chat=False)

    return app


async def _events(engine: Engine, job: Job, rid: str, model: str, chat: bool) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()

    def on_text(piece: str) -> None:
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    job.on_text = on_text
    created = int(time.time())

    def event(text: str | None, reason: str | None = None) -> str:
        if chat:
            delta = {"content": text} if text is not None else {}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason}
            kind = "text_completion"
        return (
            "data: "
            + json.dumps({"id": rid, "object": kind, "created": created, "model": model, "choices": [choice]})
            + "\n\n"
        )

    future = engine.submit(job)
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
    sent = ""
    try:
        if chat:
            yield (
                "data: "
                + json.dumps(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    }
                )
                + "\n\n"
            )
        while (piece := await pieces.get()) is not None:
            sent += piece
            yield event(piece)
        try:
            ids, reason = await asyncio.wrap_future(future)
        except Exception as e:
            yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error", "code": None}}) + "\n\n"
            return
        text = engine.tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > len(sent) and text.startswith(sent):
            yield event(text[len(sent) :])
        yield event(None, reason)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()
