"""Request ids, the request's trace span, and the access log."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.serving.edge.errors import header
from service.telemetry.logs import Exchange, exchange, request_id
from service.telemetry.tracing import Tracing, fail, trace_id

logger = logging.getLogger("service.access")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Polled by probes and scrapers: a span each would bury the requests in the traces.
UNTRACED = frozenset({"/health", "/ready", "/metrics", "/status.json", "/status"})
# How each API names the answer it returns (the answer's id, prefixed), for the access log.
RESPONSE_ID_PREFIX = {"/generate": "gen-", "/v1/chat/completions": "chatcmpl-", "/v1/completions": "cmpl-",
                      "/v1/responses": "resp_"}  # fmt: skip


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp, tracing: Callable[[], Tracing] = Tracing):
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = header(scope, b"x-request-id")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        ex = Exchange()
        ex_token = exchange.set(ex)
        start = time.perf_counter()
        status = 500
        tracing = self.tracing() if scope["path"] not in UNTRACED else _OFF

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        method, path = scope["method"], scope["path"]
        headers = (
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _TRACE_HEADERS}
            if tracing.enabled
            else {}
        )
        attributes = {"http.request.method": method, "url.path": path, "gateway.request_id": rid}
        traced = response_id = None
        try:
            with tracing.request(f"{method} {path}", headers, attributes) as span:
                try:
                    await self.app(scope, receive, send_with_id)
                finally:
                    traced = trace_id()
                    if ex.answer_id is not None:
                        response_id = RESPONSE_ID_PREFIX.get(path, "") + ex.answer_id
                    if span.is_recording():
                        span.set_attribute("http.response.status_code", status)
                        key = scope.get("state", {}).get("key_id")
                        if key is not None:
                            span.set_attribute("gateway.key", key)
                        if response_id is not None:
                            span.set_attribute("gateway.response_id", response_id)
                        if status >= 500:
                            fail(span, f"HTTP {status}")
        finally:
            logger.info(
                "request",
                extra={
                    "method": method,
                    "path": path,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                    "response_id": response_id,
                    "trace_id": traced,
                },
            )
            exchange.reset(ex_token)
            request_id.reset(token)


_TRACE_HEADERS = (b"traceparent", b"tracestate")
_OFF = Tracing()
