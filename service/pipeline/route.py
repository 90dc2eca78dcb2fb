"""The routing stage: which members a request calls, before the fan-out.

Without a ``route``, ``cascade`` or cap the ensemble calls every member and no router is asked.
Otherwise the router orders the members by their chance of being chosen for this source (members it
does not know come last, in the ensemble's order), and:

- the cap (``max_member_calls``, lowered by a request's ``max_members``) keeps the first ones;
- ``route: {members: m}`` calls the first m; the others are a reserve, called only when fewer than
  ``min_candidates`` of the m answered (a member that fails degrades the answer, not the request);
- ``cascade: {members: m}`` calls the first m, then the reserve too when their answer is uncertain
  (``uncertain``) or too few answered.

A router that fails or overruns the deadline degrades to calling every member (within the cap),
and the answer says so. The members not called are named in the answer with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

from service.config import EnsembleConfig
from service.members.fanout import member_of
from service.models.rankers.ranking import fusion_lead
from service.models.routers.base import Router
from service.pipeline.failures import degrade
from service.pipeline.gather import Ballot
from service.pipeline.plan import Plan
from service.pipeline.types import NotCalled
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import stage

logger = logging.getLogger("service.pipeline")


@dataclass
class Routing:
    """``first``: the members asked at once; ``reserve``: asked only when the first wave falls short
    (or, in a cascade, is uncertain), else named with ``reserve_reason``; ``capped``: never asked."""

    first: list[str]
    reserve: list[str] = field(default_factory=list)
    reserve_reason: str = "routed"
    capped: list[str] = field(default_factory=list)
    scores: dict[str, float] | None = None
    degraded: list[str] = field(default_factory=list)
    reserve_asked: bool = False

    @property
    def narrowed(self) -> bool:
        return bool(self.reserve or self.capped)

    def not_called(self) -> list[NotCalled]:
        out = [] if self.reserve_asked else [NotCalled(m, self.reserve_reason) for m in self.reserve]
        return out + [NotCalled(m, "cap") for m in self.capped]


def keys_of(plan: Plan, members: list[str]) -> list[str]:
    """The request keys of these members (a member's samples are ``name#i``), in the plan's order."""
    wanted = set(members)
    return [k for k in plan.requests if member_of(k) in wanted]


def wave_size(ens: EnsembleConfig) -> int | None:
    if ens.route is not None:
        return ens.route.members
    if ens.cascade is not None:
        return ens.cascade.members
    return None


async def route(plan: Plan, router: Router | None, metrics: Metrics) -> Routing:
    ens = plan.ensemble
    members = list(ens.members)
    wave, cap = wave_size(ens), plan.max_calls
    if wave is None and (cap is None or cap >= len(members)):
        return Routing(first=members)
    routing = Routing(first=members, reserve_reason="cascade_not_needed" if ens.cascade is not None else "routed")
    order = members
    if router is None and ens.router is not None:  # named, but not loaded: as if it had failed
        logger.warning("router %s is not loaded; calling every member", ens.router)
        metrics.degraded.labels(plan.name, "router_failed").inc()
        routing.degraded.append(f"router_failed: router {ens.router} is not loaded")
        wave = None
    elif router is not None:
        t0 = time.perf_counter()
        try:
            with stage("route", {"gateway.router": router.name}):  # an error leaving it marks it failed
                async with asyncio.timeout(plan.remaining_s()):
                    scores = await router.scores(plan.instruction + plan.input_text)
        except Exception as e:
            degrade(routing.degraded, plan.name, "route", router.name, e, metrics)  # every member is called
            wave = None
        else:
            metrics.router_latency.labels(router.name).observe(time.perf_counter() - t0)
            routing.scores = scores
            rank = {m: scores.get(m, -math.inf) for m in members}
            order = sorted(members, key=lambda m: -rank[m])  # stable: unknown members keep their order, last
    allowed = order if cap is None else order[:cap]
    routing.capped = [m for m in order if m not in allowed]
    if wave is None:
        routing.first = allowed
    else:
        routing.first, routing.reserve = allowed[:wave], allowed[wave:]
    return routing


def uncertain(plan: Plan, ballot: Ballot, routing: Routing, ranked: bool) -> bool:
    """Whether a cascade's first answer needs the rest of the members: the ranker failed; or its
    top candidate leads the best candidate that says something else by less than the margin
    (all agreeing: certain); or, alone, its member's chance by the router is under
    ``min_probability``; without a ranker, no majority of the wave's votes."""
    ens = plan.ensemble
    cascade = ens.cascade
    assert cascade is not None
    if not ballot.keys:
        return True
    if ens.ranker is not None and not ranked:
        return True
    texts = [ballot.completions[i].text for i in ballot.order]
    if len(texts) == 1:
        p = (routing.scores or {}).get(member_of(ballot.keys[0]))
        return p is None or p < cascade.min_probability
    lead = fusion_lead([ballot.scores[i] for i in ballot.order], texts)
    if lead == math.inf:
        return False
    if ens.ranker is None:
        votes = ballot.votes or []
        return not votes or max(votes) * 2 <= len(texts)
    return lead is None or lead < cascade.margin
