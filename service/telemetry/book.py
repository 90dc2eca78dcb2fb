"""What the status page shows: per-member latency, win rate and selection share, and the last
requests with their ranking. Plain Python, in memory, bounded; it outlives reloads.

Prometheus has the long view; this is the live one an operator opens in a browser.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

LATENCY_WINDOW = 200  # successful calls per member kept for the p50
RECENT = 25  # requests kept for the "last requests" table


@dataclass
class _MemberStats:
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    calls: int = 0
    errors: int = 0
    last_error: str | None = None


@dataclass
class _Share:
    candidates: int = 0
    first: int = 0
    selected: int = 0
    not_called: int = 0  # answers routing left it out of


@dataclass
class _Routing:
    answers: int = 0
    calls: int = 0  # member calls made (asked: answered or failed)
    saved: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # calls not made, by reason


class StatusBook:
    def __init__(self) -> None:
        self.members: dict[str, _MemberStats] = defaultdict(_MemberStats)
        self.shares: dict[tuple[str, str], _Share] = defaultdict(_Share)
        self.routing: dict[str, _Routing] = defaultdict(_Routing)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.answered = 0
        self.started = time.time()

    def call(self, member: str, latency_ms: float | None, error: str | None = None) -> None:
        """One finished member call: its latency when it answered, else its error."""
        s = self.members[member]
        s.calls += 1
        if error is None and latency_ms is not None:
            s.latencies_ms.append(latency_ms)
        else:
            s.errors += 1
            s.last_error = error

    def answer(
        self,
        *,
        id: str,
        ensemble: str,
        ranking: list[dict[str, Any]],
        selected: list[str],
        failed: list[str],
        fused: bool,
        degraded: bool,
        total_ms: float,
        calls: int = 0,
        not_called: list[tuple[str, str, int]] | None = None,
    ) -> None:
        """One answered request; ``ranking`` lists its candidates best first (member, score, rank);
        ``calls``: member calls made; ``not_called``: (member, reason, calls saved) routing left out."""
        self.answered += 1
        r = self.routing[ensemble]
        r.answers += 1
        r.calls += calls
        for member, reason, saved in not_called or ():
            r.saved[reason] += saved
            self.shares[(ensemble, member)].not_called += 1
        for i, c in enumerate(ranking):
            share = self.shares[(ensemble, c["member"])]
            share.candidates += 1
            share.first += i == 0
            share.selected += c["member"] in selected
        self.recent.appendleft(
            {
                "id": id,
                "time": time.time(),
                "ensemble": ensemble,
                "ranking": ranking,
                "selected": selected,
                "failed": failed,
                "fused": fused,
                "degraded": degraded,
                "total_ms": round(total_ms, 1),
            }
        )

    def member(self, ensemble: str, name: str) -> dict[str, Any]:
        s = self.members.get(name)
        share = self.shares.get((ensemble, name), _Share())
        lat = list(s.latencies_ms) if s is not None else []
        return {
            "p50_ms": round(statistics.median(lat), 1) if lat else None,
            "calls": s.calls if s is not None else 0,
            "errors": s.errors if s is not None else 0,
            "last_error": s.last_error if s is not None else None,
            "candidates": share.candidates,
            "win_rate": round(share.first / share.candidates, 4) if share.candidates else None,
            "selection_share": round(share.selected / share.candidates, 4) if share.candidates else None,
            "not_called": share.not_called,
        }

    def routed(self, ensemble: str) -> dict[str, Any]:
        """An ensemble's member calls: made per answer, and not made (by reason)."""
        r = self.routing.get(ensemble, _Routing())
        return {
            "answers": r.answers,
            "calls_per_answer": round(r.calls / r.answers, 3) if r.answers else None,
            "calls_saved": dict(r.saved),
        }
