"""The request body's size limit, and JSON as the default content type of a POST."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import GatewayConfig
from service.errors import GatewayError, PayloadTooLarge
from service.serving.edge.errors import header, send_error


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, config: Callable[[], GatewayConfig]):
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            receive, scope = await self._bounded(scope, receive, self.config().limits.max_body_bytes)
        except GatewayError as e:
            await send_error(send, e)
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _bounded(scope: Scope, receive: Receive, limit: int) -> tuple[Receive, Scope]:
        declared = header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds the limit of {limit} bytes")
            chunks.append(body)
            more = message.get("more_body", False)
        whole = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": whole, "more_body": False}
            return await receive()

        if header(scope, b"content-type") in ("", "application/x-www-form-urlencoded"):
            kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        return replay, scope
