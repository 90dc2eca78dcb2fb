"""The record stage: what an answered request leaves behind. ``record``: which members' candidates
came, ranked first and were selected (metrics, the status book) and one ``answered`` log line;
``keep``: the answer with all its evidence, queued for the store (never waited for)."""

from __future__ import annotations

import logging
import time
from typing import Any

from service.members.fanout import member_of
from service.pipeline.fuse import Fusion
from service.pipeline.plan import Plan
from service.pipeline.route import keys_of
from service.pipeline.types import Answer, Candidate
from service.store import AnswerRecord, Store
from service.store.records import hashed_input
from service.telemetry.book import StatusBook
from service.telemetry.metrics import Metrics

logger = logging.getLogger("service.pipeline")


def record(answer: Answer, plan: Plan, metrics: Metrics, status: StatusBook, log_prompts: bool) -> None:
    """Per-member metrics, the status book's entry, the ``answered`` log line."""
    name = answer.ensemble
    for c in answer.candidates:
        metrics.candidates.labels(name, member_of(c.member)).inc()
    metrics.ranked_first.labels(name, member_of(answer.candidates[0].member)).inc()
    for key in answer.selected:
        metrics.selected.labels(name, member_of(key)).inc()
    failed = [f.member for f in answer.failed_members]
    status.answer(
        id=answer.id,
        ensemble=name,
        ranking=[{"member": c.member, "score": c.score, "rank": c.rank} for c in answer.candidates],
        selected=answer.selected,
        failed=failed,
        fused=answer.fused,
        degraded=answer.degraded,
        total_ms=answer.timings_ms.total,
        calls=len(answer.candidates) + len(failed),
        not_called=[(n.member, n.reason, len(keys_of(plan, [n.member]))) for n in answer.not_called],
    )
    extra: dict[str, object] = {
        "ensemble": name,
        "candidates": len(answer.candidates),
        "failed": failed,
        "selected": answer.selected,
        "total_ms": round(answer.timings_ms.total, 1),
    }
    if log_prompts:
        extra.update(input=plan.input_text, output=answer.output)
    logger.info("answered", extra=extra)


def stored_input(plan: Plan) -> dict[str, Any]:
    """The input as the store keeps it: the prompt or the messages, the instruction in force, and
    the text the ranker and fuser saw besides it."""
    q = plan.query
    out: dict[str, Any] = {"instruction": plan.instruction, "input_text": plan.input_text}
    if q.prompt is not None:
        out["prompt"] = q.prompt
    else:
        out["messages"] = [{"role": m.role, "content": m.content} for m in q.messages or ()]
    return out


def candidate_row(c: Candidate, answer: Answer) -> dict[str, Any]:
    """A candidate with its own tokens (flat dataclasses: ``vars`` is ``asdict`` without its deep copy)."""
    tokens = answer.usage.members.get(c.member)
    return {
        **vars(c),
        "prompt_tokens": tokens.prompt_tokens if tokens else None,
        "completion_tokens": tokens.completion_tokens if tokens else None,
    }


def answer_record(answer: Answer, fusion: Fusion, plan: Plan, config_digest: str, record_inputs: bool) -> AnswerRecord:
    origin = plan.query.origin
    given = stored_input(plan)
    return AnswerRecord(
        id=answer.id,
        created_at=time.time(),
        api=origin.api,
        ensemble=answer.ensemble,
        config_digest=config_digest,
        key_id=origin.key_id,
        metadata=dict(origin.metadata) if origin.metadata else None,
        inputs_hashed=not record_inputs,
        input=given if record_inputs else hashed_input(given),
        output=answer.output.replace("\x00", "\ufffd"),  # PostgreSQL's text refuses NUL
        fused=answer.fused,
        fusion={
            "policy": plan.fusion,
            "fuser": plan.ensemble.fuser,
            "not_fused": fusion.not_fused,
            "fuse_top_k": plan.fuse_top_k,
            "selected": answer.selected,
        },
        candidates=[candidate_row(c, answer) for c in answer.candidates],
        failed=[dict(vars(f)) for f in answer.failed_members],
        degraded_reasons=list(answer.degraded_reasons),
        timings_ms=dict(vars(answer.timings_ms)),
        usage={**vars(answer.usage), "members": {k: dict(vars(v)) for k, v in answer.usage.members.items()}},
        finish_reason=answer.finish_reason,
        request=dict(origin.echo) if origin.echo else None,
        retrievable=origin.retrievable,
        not_called=[dict(vars(n)) for n in answer.not_called] or None,
    )


def keep(store: Store | None, answer: Answer, fusion: Fusion, plan: Plan, config_digest: str) -> None:
    """Queue the answer's record when there is a store and the ensemble records; never raises."""
    if store is None or not plan.ensemble.store:
        return
    try:
        store.put(answer_record(answer, fusion, plan, config_digest, store.config.record_inputs))
    except Exception:  # a record that cannot be made must not cost the answer
        logger.exception("store: the answer's record could not be made")
