"""A request after fan-out and ranking (``Staged``), and the response made from it."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from service.members.base import Completion
from service.members.fanout import member_of
from service.models.fusion import Fuser
from service.protocol import Candidate, FailedMember, GenerateRequest, GenerateResponse, Timings, TokenCounts, Usage
from service.telemetry.book import StatusBook
from service.telemetry.metrics import Metrics

logger = logging.getLogger("service.pipeline")


@dataclass
class Staged:
    """A request after fan-out and ranking, before fusion."""

    name: str
    request: GenerateRequest
    instruction: str
    input_text: str
    members: list[str]  # of the candidates that arrived, in the ensemble's member order
    completions: list[Completion]
    failed: list[FailedMember]
    scores: list[float | None]
    ranks: list[int]
    order: list[int]  # candidate indices, best first
    selected: list[int]  # fed to the fuser (or the one returned), in rank order
    fuser: Fuser | None
    start: float
    t_members: float
    t_rank: float
    deadline_at: float  # time.monotonic() by which the request must be answered
    degraded: list[str] = field(default_factory=list)  # why the answer is less than a full one
    votes: list[int] | None = None  # per candidate, when the ensemble votes
    id: str = field(default_factory=lambda: f"gen-{uuid.uuid4().hex}")

    @property
    def selected_texts(self) -> list[str]:
        return [self.completions[i].text for i in self.selected]

    @property
    def top_text(self) -> str:
        return self.completions[self.order[0]].text

    @property
    def finish_reason(self) -> str:
        """``stop`` for a fused answer; the top candidate's own reason when it is the answer."""
        if self.fuser is None:
            return self.completions[self.order[0]].finish_reason or "stop"
        return "stop"


def respond(
    staged: Staged, output: str, output_tokens: int, metrics: Metrics, status: StatusBook, log_prompts: bool
) -> GenerateResponse:
    """The response, and the per-member ranking metrics and status-page record of an answered request.
    ``output_tokens``: the answer's tokens, the completion a client accounts for."""
    t_end = time.perf_counter()
    members = staged.members  # candidates: a member's name, or name#i for its i-th sample
    for member in members:
        metrics.candidates.labels(staged.name, member_of(member)).inc()
    metrics.ranked_first.labels(staged.name, member_of(members[staged.order[0]])).inc()
    for i in staged.selected:
        metrics.selected.labels(staged.name, member_of(members[i])).inc()
    completions = staged.completions
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    candidates = None
    if staged.request.return_candidates:
        candidates = [
            Candidate(
                member=members[i],
                text=completions[i].text,
                score=staged.scores[i],
                rank=staged.ranks[i],
                latency_ms=round(completions[i].latency_ms, 3),
                finish_reason=completions[i].finish_reason,
                votes=staged.votes[i] if staged.votes is not None else None,
            )
            for i in staged.order
        ]
    ms = 1000.0
    selected = [members[i] for i in staged.selected]
    failed = [f.member for f in staged.failed]
    degraded = bool(staged.degraded or staged.failed)
    extra: dict[str, object] = {
        "ensemble": staged.name,
        "candidates": len(members),
        "failed": failed,
        "selected": selected,
        "total_ms": round((t_end - staged.start) * ms, 1),
    }
    if log_prompts:
        extra.update(input=staged.input_text, output=output)
    status.answer(
        id=staged.id,
        ensemble=staged.name,
        ranking=[{"member": members[i], "score": staged.scores[i], "rank": staged.ranks[i]} for i in staged.order],
        selected=selected,
        failed=failed,
        fused=staged.fuser is not None,
        degraded=degraded,
        total_ms=(t_end - staged.start) * ms,
    )
    logger.info("answered", extra=extra)
    return GenerateResponse(
        id=staged.id,
        ensemble=staged.name,
        output=output,
        fused=staged.fuser is not None,
        selected=selected,
        candidates=candidates,
        failed_members=staged.failed,
        degraded=degraded,
        degraded_reasons=[*staged.degraded, *(f"member {f.member}: {f.error}" for f in staged.failed)],
        timings_ms=Timings(
            members=round((staged.t_members - staged.start) * ms, 3),
            rank=round((staged.t_rank - staged.t_members) * ms, 3),
            fuse=round((t_end - staged.t_rank) * ms, 3),
            total=round((t_end - staged.start) * ms, 3),
        ),
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=output_tokens,
            total_tokens=prompt_tokens + output_tokens,
            members={
                member: TokenCounts(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
                for member, c in zip(members, completions, strict=True)
            },
        ),
    ).finished(staged.finish_reason)
