"""POST /v1/feedback's wire models: what a client says about an answer (which candidate was best,
which were wrong, the right answer, a rating), and the acknowledgement."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from service.protocol.generate import Wire

MAX_FEEDBACK_CHARS = 20_000
MAX_MEMBER_NAME = 256
# The prefixes each API gives an answer's id; feedback takes any of them, or the bare id.
ID_PREFIXES = ("gen-", "chatcmpl-", "cmpl-", "resp_", "msg_")


def answer_key(given: str) -> str:
    """The store's key of an answer id as any API spelled it."""
    for prefix in ID_PREFIXES:
        if given.startswith(prefix):
            return given[len(prefix) :]
    return given


class FeedbackRequest(Wire):
    """Feedback on one answer; give at least one of ``preferred``, ``rejected``, ``reference``,
    ``rating``, ``comment``. Several per answer are kept."""

    id: str = Field(min_length=1, max_length=128, description="The answer's id, as its API returned it.")
    preferred: str | None = Field(
        None, min_length=1, max_length=MAX_MEMBER_NAME, description="The member whose candidate was best."
    )
    rejected: list[str] | None = Field(
        None, max_length=64, description="Members whose candidates were wrong (names as in the evidence)."
    )
    reference: str | None = Field(None, max_length=MAX_FEEDBACK_CHARS, description="The right answer's text.")
    rating: float | None = Field(None, ge=-1.0, le=1.0, description="The answer as a whole: -1 (bad) to 1 (good).")
    comment: str | None = Field(None, max_length=MAX_FEEDBACK_CHARS)

    @field_validator("preferred", "reference", "comment")
    @classmethod
    def _no_nul(cls, v: str | None) -> str | None:
        if v is not None and "\x00" in v:
            raise ValueError("NUL characters are not accepted")
        return v

    @model_validator(mode="after")
    def _something(self) -> FeedbackRequest:
        if all(getattr(self, f) is None for f in ("preferred", "rejected", "reference", "rating", "comment")):
            raise ValueError("give at least one of preferred, rejected, reference, rating, comment")
        if self.rejected is not None:
            for i, name in enumerate(self.rejected):
                if not name or len(name) > MAX_MEMBER_NAME:
                    raise ValueError(f"rejected.{i}: a member name of 1 to {MAX_MEMBER_NAME} characters")
            if self.preferred is not None and self.preferred in self.rejected:
                raise ValueError("a member cannot be both preferred and rejected")
        return self


class FeedbackResponse(Wire):
    id: str = Field(description="The feedback's id.")
    object: Literal["feedback"] = "feedback"
    answer_id: str
    created_at: int
