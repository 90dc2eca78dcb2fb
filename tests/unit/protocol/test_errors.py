"""The one error body: OpenAI's shape, from any gateway error."""

from __future__ import annotations

from service.errors import MemberFailure, NotFoundError, Overloaded
from service.protocol import error_payload


def test_error_payload_is_the_openai_shape() -> None:
    body = error_payload(NotFoundError("no such model", param="model", code="model_not_found"))
    assert body == {
        "error": {"message": "no such model", "type": "not_found_error", "param": "model", "code": "model_not_found"}
    }
    # Without a code, the type stands in for it (OpenAI clients read `code`).
    assert error_payload(Overloaded("full"))["error"]["code"] == "rate_limit_error"


def test_member_failure_shows_kind_not_upstream_body() -> None:
    failure = MemberFailure("http_5xx", "HTTP 500 from /v1/chat/completions")
    assert str(failure) == "http_5xx: HTTP 500 from /v1/chat/completions"
    assert error_payload(failure)["error"]["code"] == "http_5xx" and failure.status == 502
