"""The gateway's edge, as one ASGI middleware: request ids, API keys, body size, access log.

- ``X-Request-ID`` is taken from the request (if sane) or made, set for the logs, and returned.
- Client keys (``Authorization: Bearer``) are compared in constant time against every configured
  key; the admin key guards ``/admin/*``. Without client keys the API is open.
- A body larger than ``limits.max_body_bytes`` is refused with 413 before the app reads it.
- A POST without a JSON content type (``curl -d``) is read as JSON.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import GatewayConfig
from service.errors import AuthenticationError, GatewayError, PayloadTooLarge, PermissionDenied
from service.protocol import error_payload
from service.telemetry.logs import request_id

logger = logging.getLogger("service.access")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PUBLIC_PATHS = {"/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def _key_matches(given: str, keys: list[str]) -> bool:
    """Constant time in the key's content: every configured key is compared, always."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


class EdgeMiddleware:
    def __init__(self, app: ASGIApp, config: Callable[[], GatewayConfig], draining: Callable[[], bool] = lambda: False):
        self.app = app
        self.config = config
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given_id = headers.get("x-request-id", "")
        rid = given_id if _SANE_ID.match(given_id) else uuid.uuid4().hex
        token = request_id.set(rid)
        start = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                extra = [(b"x-request-id", rid.encode())]
                if self.draining():  # shutting down: no client should reuse this connection
                    extra.append((b"connection", b"close"))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            cfg = self.config()
            try:
                self._authorize(scope["path"], headers, cfg)
                if scope["method"] in ("POST", "PUT", "PATCH"):
                    receive, scope = await self._bounded_body(scope, receive, headers, cfg.limits.max_body_bytes)
            except GatewayError as e:
                await _send_error(send_with_id, e)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            logger.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status_holder["status"],
                    "duration_ms": round((time.perf_counter() - start) * 1000, 2),
                },
            )
            request_id.reset(token)

    def _authorize(self, path: str, headers: dict[str, str], cfg: GatewayConfig) -> None:
        auth = cfg.auth
        scheme, _, given = headers.get("authorization", "").partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        if path.startswith("/admin"):
            admin = auth.admin_key()
            if admin is None:
                raise PermissionDenied("the admin API is disabled: set the admin key (auth.admin_key_env)")
            if not given or not _key_matches(given, [admin]):
                raise AuthenticationError("a valid admin key is required", code="invalid_api_key")
            return
        if path in PUBLIC_PATHS or path.startswith("/static"):
            return
        if path in ("/health", "/ready") and not auth.protect_health:
            return
        if path in ("/metrics", "/status.json") and not auth.protect_metrics:
            return
        keys = auth.client_keys()
        if keys and (not given or not _key_matches(given, keys)):
            raise AuthenticationError("a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")

    async def _bounded_body(
        self, scope: Scope, receive: Receive, headers: dict[str, str], limit: int
    ) -> tuple[Receive, Scope]:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
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

        ctype = headers.get("content-type", "")
        if ctype in ("", "application/x-www-form-urlencoded"):
            kept = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        return replay, scope


async def _send_error(send: Callable[[Message], Any], e: GatewayError) -> None:
    body = json.dumps(error_payload(e)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if e.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
