"""Wire models to the pipeline's types and back: a ``GenerateRequest`` (every API's request is
first made one, by its wire model) becomes a ``Query``; an ``Answer`` becomes /generate's
response, or the evidence the OpenAI-shaped responses carry as ``ensemble``."""

from __future__ import annotations

from typing import Any

from service.pipeline.types import Answer, Message, Query
from service.protocol import Candidate, FailedMember, GenerateRequest, GenerateResponse, Timings, TokenCounts, Usage


def query_of(request: GenerateRequest, ensemble_param: str = "ensemble") -> Query:
    """``ensemble_param``: the client's field that names the ensemble (``model`` on the OpenAI API)."""
    fuse_top_k, fuse_top_k_param = request.candidates_fused
    ext = request.sampling_extensions
    return Query(
        prompt=request.prompt,
        messages=None if request.messages is None else tuple(Message(m.role, m.content) for m in request.messages),
        instruction=request.instruction,
        ensemble=request.ensemble,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        fuse_top_k=fuse_top_k,
        fusion=request.fusion,
        deadline_s=request.deadline_s,
        extensions=ext.wire() if ext is not None else None,
        ensemble_param=ensemble_param,
        fuse_top_k_param=fuse_top_k_param,
    )


def usage_of(answer: Answer) -> Usage:
    u = answer.usage
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        members={
            k: TokenCounts(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
            for k, c in u.members.items()
        },
    )


def generate_response(answer: Answer, with_candidates: bool) -> GenerateResponse:
    """/generate's response; ``with_candidates``: the request asked for every candidate."""
    t = answer.timings_ms
    return GenerateResponse(
        id=f"gen-{answer.id}",
        ensemble=answer.ensemble,
        output=answer.output,
        fused=answer.fused,
        selected=answer.selected,
        candidates=[
            Candidate(
                member=c.member,
                text=c.text,
                score=c.score,
                rank=c.rank,
                votes=c.votes,
                latency_ms=c.latency_ms,
                finish_reason=c.finish_reason,
            )
            for c in answer.candidates
        ]
        if with_candidates
        else None,
        failed_members=[FailedMember(member=f.member, error=f.error, kind=f.kind) for f in answer.failed_members],
        degraded=answer.degraded,
        degraded_reasons=answer.degraded_reasons,
        timings_ms=Timings(members=t.members, rank=t.rank, fuse=t.fuse, total=t.total),
        usage=usage_of(answer),
    )


def evidence(answer: Answer, asked: bool) -> dict[str, Any] | None:
    """What ``ensemble.return_candidates`` adds to an OpenAI-shaped response as ``ensemble``: the
    /generate response's evidence (candidates, selection, failures, timings); None when not asked."""
    if not asked:
        return None
    response = generate_response(answer, with_candidates=True)
    return response.model_dump(exclude_none=True, exclude={"id", "output", "usage", "ensemble"})
