"""The fan-out stage: the members asked at once what the plan says (``service.members.fanout``),
and the candidates that arrived checked against the quorum.

The result is a ``Ballot``: the candidates in the ensemble's member order, which ranking and voting
then order; everything after this stage works on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from service.errors import DeadlineExceeded, MembersUnavailable, NoQuorumError
from service.members.base import Completion
from service.members.fanout import FanOut, Wait
from service.pipeline.plan import Plan
from service.pipeline.types import Failure, NotCalled
from service.telemetry.tracing import stage


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
    not_called: list[NotCalled] = field(default_factory=list)  # members routing left out

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


def wave_quorum(plan: Plan, called: int) -> int:
    """The quorum of a wave of ``called`` candidates: the ensemble's (or a majority of the wave),
    at least ``min_candidates``, at most the wave."""
    ens = plan.ensemble
    base = ens.quorum if ens.quorum is not None else called // 2 + 1
    return max(1, min(called, max(ens.min_candidates, base)))


async def gather(fan_out: FanOut, plan: Plan, keys: list[str] | None = None, *, final: bool = True) -> Ballot:
    """Ask the members what the plan says (``keys``: only these candidates' requests, a routed
    wave); raise ``NoQuorumError`` (``DeadlineExceeded`` when lateness was a cause) if fewer than
    ``min_candidates`` answered, unless the wave is not ``final`` (more members may still be asked)."""
    ens = plan.ensemble
    requests = plan.requests if keys is None else {k: plan.requests[k] for k in keys}
    quorum = ens.effective_quorum if keys is None else wave_quorum(plan, len(requests))
    wait = Wait(plan.members_until(), quorum, ens.straggler_ratio, ens.straggler_min_s)
    with stage("fan_out", {"gateway.calls": len(requests), "gateway.quorum": quorum}) as span:
        outcomes = await fan_out.gather(requests, wait)
        ok = [o for o in outcomes if o.completion is not None]
        span.set_attribute("gateway.answered", len(ok))
    failed = [Failure(member=o.member, error=o.error or "", kind=o.kind) for o in outcomes if o.completion is None]
    ballot = Ballot(
        keys=[o.member for o in ok],
        completions=[o.completion for o in ok if o.completion is not None],
        failed=failed,
        t_members=time.perf_counter(),
    )
    if final:
        check_quorum(plan, ballot)
    return ballot


# Failures that mean a member could not be reached at all (as against one that answered badly).
UNREACHABLE = frozenset({"connect", "circuit_open", "unavailable"})


def check_quorum(plan: Plan, ballot: Ballot) -> None:
    ens = plan.ensemble
    if len(ballot.keys) >= ens.min_candidates:
        return
    detail = "; ".join(f"{f.member}: {f.error}" for f in ballot.failed)
    asked = len(ballot.keys) + len(ballot.failed)
    msg = f"{len(ballot.keys)} of {asked} members answered, {ens.min_candidates} needed ({detail})"
    if any(f.kind in ("timeout", "deadline") for f in ballot.failed):
        raise DeadlineExceeded(msg, code="no_quorum")
    if not ballot.keys and ballot.failed and all(f.kind in UNREACHABLE for f in ballot.failed):
        raise MembersUnavailable(msg, code="members_unavailable")
    raise NoQuorumError(msg, code="no_quorum")


def joined(first: Ballot, more: Ballot, order: list[str]) -> Ballot:
    """Two waves' candidates as one ballot, in the plan's request order (``order``), unranked."""
    have = dict(zip(first.keys + more.keys, first.completions + more.completions, strict=True))
    keys = [k for k in order if k in have]
    out = Ballot(
        keys=keys, completions=[have[k] for k in keys], failed=first.failed + more.failed, t_members=more.t_members
    )
    out.degraded = first.degraded + more.degraded
    return out
