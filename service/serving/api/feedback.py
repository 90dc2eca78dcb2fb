"""POST /v1/feedback: what a client says about an answer, kept beside it in the store."""

from __future__ import annotations

from fastapi import APIRouter

from service.protocol import ERROR_RESPONSES, FeedbackRequest, FeedbackResponse
from service.serving.api.deps import FeedbackDep

router = APIRouter(prefix="/v1")


@router.post("/feedback", response_model=FeedbackResponse, responses=ERROR_RESPONSES)
async def feedback(body: FeedbackRequest, serving: FeedbackDep) -> FeedbackResponse:
    """Feedback on an answer: the preferred member, rejected members, the reference answer, a rating."""
    return await serving.create(body)
