"""The OpenAI error body, and the one function that makes it from a gateway error."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
)

from service.errors import GatewayError


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_payload(error: GatewayError) -> dict[str, Any]:
    """The OpenAI error body of a gateway error: for a response, and for a stream's error event."""
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code or error.type)
    return ErrorResponse(error=detail).model_dump()


# The error responses every ensemble endpoint may give, for the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in [
        (400, "Invalid request (bad JSON, wrong types, out-of-range or unsupported values)."),
        (401, "Missing or wrong API key."),
        (404, "Unknown ensemble (model)."),
        (413, "Request body too large."),
        (429, "Overloaded: too many requests in flight and queued; retry after `Retry-After` seconds."),
        (500, "Internal error."),
        (502, "Too few members answered."),
        (503, "Not ready, or shutting down."),
        (504, "Too few members answered before the deadline."),
    ]
}
