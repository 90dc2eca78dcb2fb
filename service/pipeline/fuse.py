"""The fusion stage: whether to fuse (the fusion policy), which candidates, and the fused text,
whole or in pieces; a fuser that fails falls back to the top candidate (``failures``)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

from service.models.fusers.base import Fuser
from service.models.rankers.ranking import fusion_lead
from service.pipeline.failures import as_model_error, degrade
from service.pipeline.gather import Ballot
from service.pipeline.plan import Plan
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import fail, open_span, stage


def skip_reason(plan: Plan, ballot: Ballot) -> str | None:
    """Why fusion is not worth it for this request, or None to fuse.

    ``never``: the policy says so. ``adaptive`` skips when one candidate arrived
    (``single_candidate``), when every candidate says the same (``agreement``), or when the first
    one's score leads the best candidate saying something else by ``fusion_margin`` (``margin``).
    """
    if plan.fusion == "never":
        return "never"
    if plan.fusion == "always":
        return None
    if len(ballot.order) < 2:
        return "single_candidate"
    lead = fusion_lead([ballot.scores[i] for i in ballot.order], ballot.texts(ballot.order))
    if lead is None:
        return None
    if lead == math.inf:
        return "agreement"
    return "margin" if lead >= plan.ensemble.fusion_margin else None


class Fusion:
    """One request's fusion: ``fuser`` is None when the answer is the top candidate (no fuser, the
    policy skipped it, the ranker failed, or the fuser failed)."""

    def __init__(self, plan: Plan, ballot: Ballot, fuser: Fuser | None, metrics: Metrics):
        self.plan = plan
        self.ballot = ballot
        self.metrics = metrics
        self.fuser = fuser
        # Why the answer is not fused (None: it is): no fuser, the ranker failed, the policy's
        # reason (``skip_reason``), or the fuser failed.
        self.not_fused: str | None = None
        if fuser is None:
            self.not_fused = "no_fuser" if plan.ensemble.fuser is None else "ranker_failed"
        elif (skip := skip_reason(plan, ballot)) is not None:
            metrics.fusion_skipped.labels(plan.name, skip).inc()
            self.fuser, self.not_fused = None, skip
        n = plan.fuse_top_k if self.fuser is not None else 1
        self.selected = ballot.order[: min(n, len(ballot.order))]  # fed to the fuser, or the one returned
        self.started = time.perf_counter()

    @property
    def finish_reason(self) -> str:
        """``stop`` for a fused answer; the top candidate's own reason when it is the answer."""
        return "stop" if self.fuser is not None else self.ballot.top.finish_reason or "stop"

    def _fall_back(self, fuser: Fuser, error: BaseException) -> str:
        degrade(self.ballot.degraded, self.plan.name, "fuse", fuser.name, error, self.metrics)
        self.fuser, self.not_fused = None, "fuser_failed"
        self.selected = self.ballot.order[:1]
        return self.ballot.top.text

    def _args(self) -> tuple[str, str, list[str], int | None]:
        return self.plan.instruction, self.plan.input_text, self.ballot.texts(self.selected), self.plan.max_tokens

    async def text(self) -> str:
        """The answer: the fused text, or the top candidate."""
        fuser = self.fuser
        if fuser is None:
            return self.ballot.top.text
        t0 = time.perf_counter()
        with stage("fuse", {"gateway.fuser": fuser.name, "gateway.fused": len(self.selected)}) as span:
            try:
                async with asyncio.timeout(self.plan.remaining_s()):
                    output = await fuser.fuse(*self._args())
            except Exception as e:
                fail(span, f"{type(e).__name__}: {e}")
                return self._fall_back(fuser, e)
        self.metrics.fuser_latency.labels(fuser.name).observe(time.perf_counter() - t0)
        return output

    async def pieces(self) -> AsyncIterator[str]:
        """The answer as it is generated; the pieces join to what ``text`` returns. A fuser that
        fails before its first piece falls back to the top candidate; after it, the error is raised."""
        fuser = self.fuser
        if fuser is None:
            yield self.ballot.top.text
            return
        t0 = time.perf_counter()
        started = False
        pieces = fuser.fuse_stream(*self._args())
        attrs = {"gateway.fuser": fuser.name, "gateway.fused": len(self.selected), "gateway.stream": True}
        span = open_span("fuse", attrs)
        try:
            while True:
                try:
                    piece = await asyncio.wait_for(anext(pieces), self.plan.remaining_s())
                except StopAsyncIteration:
                    break
                except Exception as e:
                    fail(span, f"{type(e).__name__}: {e}")
                    if not started:
                        yield self._fall_back(fuser, e)
                        return
                    self.metrics.model_errors.labels("fuse", fuser.name).inc()
                    raise as_model_error("fuse", fuser.name, e) from e
                started = True
                yield piece
        finally:
            span.end()
            close = getattr(pieces, "aclose", None)  # the Fuser contract promises an iterator, not a generator
            if close is not None:
                await close()
        self.metrics.fuser_latency.labels(fuser.name).observe(time.perf_counter() - t0)
