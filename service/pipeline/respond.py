"""The respond stage: the ``Answer`` made from the ballot and the fused (or top) text, with its
usage counted, and the record stage: what an answered request leaves behind (per-member metrics,
the status page's book, the ``answered`` log line)."""

from __future__ import annotations

import asyncio
import logging
import time

from service.pipeline.fuse import Fusion
from service.pipeline.gather import Ballot
from service.pipeline.plan import Plan
from service.pipeline.types import Answer, Candidate, Timings, TokenCounts, Usage

logger = logging.getLogger("service.pipeline")

COUNT_TIMEOUT_S = 2.0  # counting a fused answer's tokens (a tokenizer call, or an LLM fuser's /tokenize)
MS = 1000.0


async def answer_tokens(fusion: Fusion, output: str) -> int:
    """The answer's tokens: the top candidate's own count, or for a fused text the fuser's count
    (whitespace-separated words where the fuser cannot count)."""
    fuser = fusion.fuser
    if fuser is None:
        return fusion.ballot.top.completion_tokens
    try:
        async with asyncio.timeout(COUNT_TIMEOUT_S):
            counted = await fuser.count_tokens(output)
    except Exception as e:
        logger.warning("fuser %s could not count the answer's tokens: %s: %s", fuser.name, type(e).__name__, e)
        counted = None
    return counted if counted is not None else len(output.split())


async def respond(plan: Plan, fusion: Fusion, output: str) -> Answer:
    """The answer with its evidence; its usage counts ``output``'s tokens as the completion."""
    ballot: Ballot = fusion.ballot
    tokens = await answer_tokens(fusion, output)
    t_end = time.perf_counter()
    keys, completions = ballot.keys, ballot.completions
    prompt_tokens = sum(c.prompt_tokens for c in completions)
    return Answer(
        id=plan.id,
        ensemble=plan.name,
        output=output,
        fused=fusion.fuser is not None,
        selected=[keys[i] for i in fusion.selected],
        candidates=[
            Candidate(
                member=keys[i],
                text=completions[i].text,
                score=ballot.scores[i],
                rank=ballot.ranks[i],
                latency_ms=round(completions[i].latency_ms, 3),
                finish_reason=completions[i].finish_reason,
                votes=ballot.votes[i] if ballot.votes is not None else None,
            )
            for i in ballot.order
        ],
        failed_members=list(ballot.failed),
        degraded=bool(ballot.degraded or ballot.failed),
        degraded_reasons=[*ballot.degraded, *(f"member {f.member}: {f.error}" for f in ballot.failed)],
        timings_ms=Timings(
            members=round((ballot.t_members - plan.start) * MS, 3),
            rank=round((fusion.started - ballot.t_members) * MS, 3),
            fuse=round((t_end - fusion.started) * MS, 3),
            total=round((t_end - plan.start) * MS, 3),
        ),
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=tokens,
            total_tokens=prompt_tokens + tokens,
            members={
                key: TokenCounts(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
                for key, c in zip(keys, completions, strict=True)
            },
        ),
        finish_reason=fusion.finish_reason,
        not_called=list(ballot.not_called),
    )
