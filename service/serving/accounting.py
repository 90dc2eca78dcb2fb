"""Request accounting, in one place: every request to an ensemble endpoint is counted from the
moment its route takes it (before its body is parsed) to its last byte, with its ensemble, status
and latency (``gateway_requests``, ``gateway_request_latency_seconds``, ``gateway_requests_in_flight``).

The ensemble routes use ``EnsembleRoute``: it opens an ``Account`` for the request and ends it with
the status the request ended with (an error's own, 400 for a body that did not validate, 499 for a
client that left); a streamed answer ends its account itself when its last event is sent (``sse``).
The serving classes label the account with the ensemble as soon as they know it (``-`` for none).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.responses import StreamingResponse

from service.errors import GatewayError
from service.telemetry.metrics import Metrics


class Account:
    """One ensemble request's entry in the metrics; ``end`` counts it (only the first call counts)."""

    def __init__(self, metrics: Metrics, key_id: str | None = None):
        self.metrics = metrics
        self.key_id = key_id  # the client key's id (``edge.auth.key_id``), when keys are on
        self.ensemble = "-"
        self.start = time.perf_counter()
        self.done = False
        metrics.in_flight.inc()

    def end(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(self.ensemble, str(status)).inc()
        self.metrics.request_latency.labels(self.ensemble).observe(time.perf_counter() - self.start)


def status_of(error: BaseException) -> int:
    """The HTTP status a request that ended with ``error`` is counted with."""
    if isinstance(error, GatewayError):
        return error.status
    if isinstance(error, RequestValidationError):
        return 400
    if isinstance(error, asyncio.CancelledError):
        return 499  # the client went away
    return 500


class EnsembleRoute(APIRoute):
    """A route whose every request is accounted for (``request.state.account``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def accounted(request: Request) -> Response:
            account = Account(request.app.state.metrics, getattr(request.state, "key_id", None))
            request.state.account = account
            try:
                response = await handler(request)
            except BaseException as e:
                account.end(status_of(e))
                raise
            if not isinstance(response, StreamingResponse):  # a stream ends its account when it ends
                account.end(response.status_code)
            return response

        return accounted
