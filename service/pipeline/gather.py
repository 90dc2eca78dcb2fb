"""The fan-out stage: the members asked at once what the plan says (``service.members.fanout``),
and the candidates that arrived checked against the quorum.

The result is a ``Ballot``: the candidates in the ensemble's member order, which ranking and voting
then order; everything after this stage works on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.errors import DeadlineExceeded, NoQuorumError
from service.members.base import Completion
from service.members.fanout import FanOut, Wait
from service.pipeline.plan import Plan
from service.pipeline.types import Failure


@dataclass
class Ballot:
    """The candidates of one request and their order. ``keys``: a member's name, or ``name#i`` for
    its i-th sample; ``order``: candidate indices, best first (member order until ranked)."""

    keys: list[str]
    completions: list[Completion]
    failed: list[Failure]
    t_members: float  # time.perf_counter() when the fan-out ended
    scores: list[float | None] = field(init=False)
    ranks: list[int] = field(init=False)
    order: list[int] = field(init=False)
    votes: list[int] | None = None
    degraded: list[str] = field(default_factory=list)  # why the answer is less than a full one

    def __post_init__(self) -> None:
        n = len(self.completions)
        self.scores = [None] * n
        self.ranks = list(range(1, n + 1))
        self.order = list(range(n))

    def texts(self, indices: list[int] | None = None) -> list[str]:
        return [self.completions[i].text for i in (range(len(self.completions)) if indices is None else indices)]

    @property
    def top(self) -> Completion:
        return self.completions[self.order[0]]


async def gather(fan_out: FanOut, plan: Plan) -> Ballot:
    """Ask the members what the plan says; raise ``NoQuorumError`` (``DeadlineExceeded`` when lateness was a cause) if
    fewer than ``min_candidates`` answered."""
    ens = plan.ensemble
    wait = Wait(plan.members_until(), ens.effective_quorum, ens.straggler_ratio, ens.straggler_min_s)
    outcomes = await fan_out.gather(plan.requests, wait)
    ok = [o for o in outcomes if o.completion is not None]
    failed = [Failure(member=o.member, error=o.error or "", kind=o.kind) for o in outcomes if o.completion is None]
    if len(ok) < ens.min_candidates:
        detail = "; ".join(f"{f.member}: {f.error}" for f in failed)
        msg = f"{len(ok)} of {len(outcomes)} members answered, {ens.min_candidates} needed ({detail})"
        if any(f.kind in ("timeout", "deadline") for f in failed):
            raise DeadlineExceeded(msg, code="no_quorum")
        raise NoQuorumError(msg, code="no_quorum")
    return Ballot(
        keys=[o.member for o in ok],
        completions=[o.completion for o in ok if o.completion is not None],
        failed=failed,
        t_members=time.perf_counter(),
    )
