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


class StatusBook:
    def __init__(self) -> None:
        self.members: dict[str, _MemberStats] = defaultdict(_MemberStats)
        self.shares: dict[tuple[str, str], _Share] = defaultdict(_Share)
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
    ) -> None:
        """One answered request; ``ranking`` lists its candidates best first (member, score, rank)."""
        self.answered += 1
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
        }
