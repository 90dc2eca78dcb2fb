"""The choosing stages: the ranker orders the ballot (or, failing, leaves member order), then a
vote may reorder it (``service.pipeline.voting``)."""

from __future__ import annotations

import asyncio
import time

from service.models.rankers.ranking import Ranker
from service.pipeline.failures import degrade
from service.pipeline.gather import Ballot
from service.pipeline.plan import Plan
from service.pipeline.voting import vote
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import fail, stage


async def rank(ranker: Ranker, plan: Plan, ballot: Ballot, metrics: Metrics) -> bool:
    """Score and order the candidates for the instruction and input. False when the ranker failed
    or overran the deadline: the ballot keeps member order, says why, and the answer is not fused."""
    t0 = time.perf_counter()
    with stage("rank", {"gateway.ranker": ranker.name, "gateway.candidates": len(ballot.keys)}) as span:
        try:
            async with asyncio.timeout(plan.remaining_s()):
                ranking = await ranker.rank(plan.instruction + plan.input_text, ballot.texts())
        except Exception as e:
            degrade(ballot.degraded, plan.name, "rank", ranker.name, e, metrics)
            fail(span, f"{type(e).__name__}: {e}")
            return False
    metrics.ranker_latency.labels(ranker.name).observe(time.perf_counter() - t0)
    ballot.scores = list(ranking.scores)
    ballot.ranks = ranking.ranks
    ballot.order = ranking.order()
    return True


def count_votes(plan: Plan, ballot: Ballot, metrics: Metrics) -> None:
    """Order the candidates by votes (ties by score, then member order)."""
    with stage("vote", {"gateway.candidates": len(ballot.keys)}) as span:
        counted = vote(ballot.texts(), ballot.scores)
        span.set_attribute("gateway.vote.outcome", counted.outcome)
    ballot.order, ballot.votes = counted.order, counted.counts
    metrics.votes.labels(plan.name, counted.outcome).inc()
