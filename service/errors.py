"""One exception tree for the gateway, mapped to HTTP in one place.

    GatewayError                      500 internal_error
    ├── ConfigError                   400 config_error (start-up stops; a reload keeps the old one)
    ├── RequestError                  400 invalid_request_error
    │   ├── NotFoundError             404 not_found_error
    │   ├── AuthenticationError       401 authentication_error
    │   ├── PermissionDenied          403 permission_error
    │   └── PayloadTooLarge           413 request_too_large
    ├── StoreUnavailable              503 service_unavailable (the store of answers is down)
    ├── UpstreamError                 502 upstream_error     (a member failed; per member)
    │   └── MemberFailure             502 member_failure     (one member's call; ``kind`` labels it)
    ├── LaunchError                   502 launch_error       (a local server did not start)
    ├── NoQuorumError                 502 no_quorum          (too few candidates arrived)
    │   ├── DeadlineExceeded          504 deadline_exceeded
    │   └── MembersUnavailable        503 service_unavailable (not one member reachable)
    ├── ModelError                    500 model_error        (ranker or fuser failed)
    ├── NotReadyError                 503 not_ready
    │   └── ShuttingDown              503 shutting_down      (draining after SIGTERM)
    └── Overloaded                    429 rate_limit_error   (shed: in-flight cap and queue full)

Every error leaves the gateway as ``{"error": {"message", "type", "param", "code"}}``, built by
``service.protocol.error_payload``. A ``MemberFailure`` is caught by the fan-out and becomes a failed member in the
response (or part of a ``NoQuorumError``); it reaches a client only as its kind and status, never
with the upstream's body (that goes to the logs).
"""

from __future__ import annotations


class GatewayError(Exception):
    status = 500
    type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class ConfigError(GatewayError):
    status = 400  # as the answer to a reload; at start-up it stops the gateway
    type = "config_error"


class RequestError(GatewayError):
    status = 400
    type = "invalid_request_error"


class NotFoundError(RequestError):
    status = 404
    type = "not_found_error"


class AuthenticationError(RequestError):
    status = 401
    type = "authentication_error"


class PermissionDenied(RequestError):
    status = 403
    type = "permission_error"


class PayloadTooLarge(RequestError):
    status = 413
    type = "request_too_large"


class StoreUnavailable(GatewayError):
    """The store of answers could not be read or written for a request that needs it."""

    status = 503
    type = "service_unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"


class MemberFailure(UpstreamError):
    """One member's call failed. ``kind`` labels the metric: timeout, connect, http_5xx, http_4xx,
    invalid_response, adapter_load, ...; ``detail`` says what happened in the gateway's words."""

    type = "member_failure"

    def __init__(self, kind: str, detail: str, cause: BaseException | None = None, upstream: str | None = None):
        super().__init__(f"{kind}: {detail}", code=kind)
        self.kind = kind
        self.detail = detail
        self.cause = cause
        self.upstream = upstream  # what the server said: for the logs and operators, never a client

    def for_operators(self) -> str:
        """The failure with what the server said, for the logs, /ready and the status page."""
        return f"{self}; the server said: {self.upstream}" if self.upstream else str(self)

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


class LaunchError(GatewayError):
    """A local server (single-node mode) did not start or did not become healthy."""

    status = 502
    type = "launch_error"


class NoQuorumError(GatewayError):
    status = 502
    type = "no_quorum"


class DeadlineExceeded(NoQuorumError):
    status = 504
    type = "deadline_exceeded"


class MembersUnavailable(NoQuorumError):
    """Not one member could be reached (refused connections, open circuits, members marked
    unavailable): the gateway itself serves (it stays Ready) and says so with a 503 in the OpenAI
    shape, which clients retry, rather than a 502 for members that answered badly."""

    status = 503
    type = "service_unavailable"


class ModelError(GatewayError):
    type = "model_error"


class NotReadyError(GatewayError):
    status = 503
    type = "not_ready"


class ShuttingDown(NotReadyError):
    type = "shutting_down"


class Overloaded(GatewayError):
    status = 429
    type = "rate_limit_error"


class RateLimited(Overloaded):
    """A client key over one of its limits (``limits.keys``, ``limits.per_key``)."""
