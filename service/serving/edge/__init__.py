"""The gateway's edge: pure ASGI middlewares, one concern each, outermost first.

- ``request_id``: ``X-Request-ID`` taken from the request (if sane) or made, set for the logs,
  returned; the request's trace span (continuing a client's ``traceparent``); one access-log line
  per request, with the answer's id and the trace id.
- ``ports``: with an operators' port (``serve --ops-port``), metrics, status and the status page
  are served there only; probes on both ports.
- ``drain``: while shutting down, every response tells the client not to reuse the connection.
- ``auth``: client keys (``Authorization: Bearer``) and the admin key, by the access each route
  declares with its tags (``access.py``); without client keys the API is open.
- ``body``: a body over ``limits.max_body_bytes`` is refused with 413 before the app reads it; a
  POST without a JSON content type (``curl -d``) is read as JSON.

What they refuse leaves through ``send_error`` in the OpenAI error shape.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from service.config import GatewayConfig
from service.serving.edge.auth import AuthMiddleware
from service.serving.edge.body import BodyLimitMiddleware
from service.serving.edge.drain import DrainMiddleware
from service.serving.edge.ports import PortsMiddleware
from service.serving.edge.request_id import RequestIdMiddleware
from service.telemetry.tracing import Tracing


def install(
    app: FastAPI,
    config: Callable[[], GatewayConfig],
    draining: Callable[[], bool],
    tracing: Callable[[], Tracing],
    ops_port: int | None = None,
) -> None:
    """Add the edge to ``app`` (Starlette runs the last added first)."""
    app.add_middleware(BodyLimitMiddleware, config=config)
    app.add_middleware(AuthMiddleware, config=config)
    app.add_middleware(DrainMiddleware, draining=draining)
    app.add_middleware(PortsMiddleware, ops_port=ops_port)
    app.add_middleware(RequestIdMiddleware, tracing=tracing)
