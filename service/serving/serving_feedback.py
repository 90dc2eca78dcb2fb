"""POST /v1/feedback's serving class: feedback on a stored answer, checked against its evidence
(the members named must be the answer's own) and kept beside it."""

from __future__ import annotations

import time
import uuid

from service.errors import RequestError
from service.protocol import FeedbackRequest, FeedbackResponse
from service.serving.stored import owned_answer, store_or_refuse
from service.store import FeedbackRecord, Store
from service.telemetry.metrics import Metrics


class ServingFeedback:
    def __init__(self, store: Store | None, key_id: str | None, metrics: Metrics):
        self.store = store
        self.key_id = key_id
        self.metrics = metrics

    async def create(self, body: FeedbackRequest) -> FeedbackResponse:
        store = store_or_refuse(self.store, "feedback")
        row = await owned_answer(store, body.id, self.key_id, "id", "answer")
        members = {c["member"] for c in row["candidates"]}
        if body.preferred is not None and body.preferred not in members:
            raise RequestError(
                f"preferred: the answer has no candidate from {body.preferred!r} (it has {sorted(members)})",
                param="preferred",
                code="unknown_member",
            )
        for i, name in enumerate(body.rejected or []):
            if name not in members:
                raise RequestError(
                    f"rejected.{i}: the answer has no candidate from {name!r} (it has {sorted(members)})",
                    param=f"rejected.{i}",
                    code="unknown_member",
                )
        record = FeedbackRecord(
            id=f"fb_{uuid.uuid4().hex}",
            answer_id=row["id"],
            created_at=time.time(),
            key_id=self.key_id,
            preferred=body.preferred,
            rejected=list(body.rejected or []),
            reference=body.reference,
            rating=body.rating,
            comment=body.comment,
        )
        await store.add_feedback(record)
        self.metrics.feedback.labels(row["ensemble"]).inc()
        return FeedbackResponse(id=record.id, answer_id=body.id, created_at=int(record.created_at))
