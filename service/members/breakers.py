"""Circuit breakers and active health checks: what keeps a failing member from costing every request.

A ``CircuitBreaker`` per member ejects it after consecutive failures (calls or health checks) for
a cool-down that doubles while probes fail; after the cool-down one request, or one passing health
check, probes it. ``Guards`` keeps the breakers across reloads (by member name) and runs the health
checks. Retries live with the calls, in ``service.members.fanout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from service.config import BreakerConfig, HealthCheckConfig
from service.errors import MemberFailure
from service.members.base import Member
from service.telemetry.metrics import Metrics

logger = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitBreaker:
    """One member's circuit: closed (calls pass), open (skipped), half-open (one probe at a time)."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        on_change: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.config = config
        self._on_change = on_change
        self._clock = clock
        self.state = CLOSED
        self.failures = 0
        self.cooldown_s = config.cooldown_s
        self.opened_at = 0.0
        self.reason = ""
        self.by_health = False  # opened by failed health checks (a passing one may close it)
        self._probing = False

    def _set(self, state: str) -> None:
        if state != self.state:
            logger.info("member %s circuit %s -> %s %s", self.name, self.state, state, self.reason)
            self.state = state
            if self._on_change is not None:
                self._on_change(self.name, state)

    @property
    def retry_in_s(self) -> float:
        return max(0.0, self.opened_at + self.cooldown_s - self._clock())

    def allow(self) -> bool:
        """May a call go to the member now? In half-open, only the one probe may."""
        if self.state == OPEN and self.retry_in_s <= 0:
            self._set(HALF_OPEN)
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        self.cooldown_s = self.config.cooldown_s
        self.reason = ""
        self._set(CLOSED)

    def failure(self, reason: str) -> None:
        self.failures += 1
        self.reason = reason
        self.by_health = False
        if self.state == HALF_OPEN:
            self.cooldown_s = min(self.config.max_cooldown_s, self.cooldown_s * 2)
            self._open()
        elif self.state == CLOSED and self.failures >= self.config.failures:
            self._open()

    def half_open(self) -> None:
        """Let the next request probe the member (a health check passed after the cool-down)."""
        if self.state == OPEN:
            self._probing = False
            self._set(HALF_OPEN)

    def release_probe(self) -> None:
        """A probe that ended without a verdict (cancelled): let another one through."""
        self._probing = False

    def trip(self, reason: str) -> None:
        """Open at once (a failed health check); an open circuit restarts its cool-down."""
        self.reason = reason
        self.by_health = True
        self._open()

    def _open(self) -> None:
        self._probing = False
        self.opened_at = self._clock()
        self._set(OPEN)


@dataclass
class MemberHealth:
    """The last active check of a member: ``error`` is None when it passed."""

    error: str | None = "not checked yet"
    checked_at: float = 0.0
    failures: int = 0


class Guards:
    """Breakers and health of members by name; they outlive reloads for members that stay."""

    def __init__(
        self,
        metrics: Metrics,
        breaker: BreakerConfig,
        health: HealthCheckConfig,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.metrics = metrics
        self.clock = clock
        self.breaker_config = breaker
        self.health_config = health
        self.breakers: dict[str, CircuitBreaker] = {}
        self.health: dict[str, MemberHealth] = {}
        self.last_round = 0.0

    def configure(self, names: list[str], breaker: BreakerConfig, health: HealthCheckConfig) -> None:
        """Match the members of the configuration now serving (after start or a reload)."""
        self.breaker_config, self.health_config = breaker, health
        for name in list(self.breakers):
            if name not in names:
                del self.breakers[name]
                self.health.pop(name, None)
                self.metrics.circuit_state.remove(name)
                with contextlib.suppress(KeyError):
                    self.metrics.member_healthy.remove(name)
        for name in names:
            if name in self.breakers:
                self.breakers[name].config = breaker
            else:
                self.breakers[name] = CircuitBreaker(name, breaker, self._changed, self.clock)
                self.metrics.circuit_state.labels(name).set(0)

    def _changed(self, name: str, state: str) -> None:
        self.metrics.circuit_state.labels(name).set(STATE_VALUE[state])
        if state == OPEN:
            self.metrics.circuit_opened.labels(name).inc()

    def breaker(self, name: str) -> CircuitBreaker:
        if name not in self.breakers:
            self.breakers[name] = CircuitBreaker(name, self.breaker_config, self._changed, self.clock)
        return self.breakers[name]

    async def check(self, members: Mapping[str, Member], unavailable: Mapping[str, str]) -> None:
        """One round of health checks, all members at once."""
        timeout = self.health_config.timeout_s

        async def one(name: str, member: Member) -> None:
            if name in unavailable:
                error: str | None = f"unavailable: {unavailable[name]}"
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await member.health()
                    error = None
                except MemberFailure as e:
                    error = str(e)
                except TimeoutError:
                    error = f"timeout: health check took over {timeout:g}s"
            self._record(name, error)

        await asyncio.gather(*(one(n, m) for n, m in members.items()))
        self.last_round = self.clock()

    def _record(self, name: str, error: str | None) -> None:
        h = self.health.setdefault(name, MemberHealth())
        h.error, h.checked_at = error, self.clock()
        self.metrics.member_healthy.labels(name).set(0 if error else 1)
        breaker = self.breaker(name)
        if error is None:
            h.failures = 0
            if breaker.state == OPEN and breaker.retry_in_s <= 0:
                # Opened by checks: closed by one. Opened by failed calls: the next call probes it
                # (a member can pass its health check and still fail its requests).
                if breaker.by_health:
                    breaker.success()
                else:
                    breaker.half_open()
            return
        h.failures += 1
        if h.failures >= self.health_config.failures and (breaker.state != OPEN or breaker.retry_in_s <= 0):
            breaker.trip(f"health check: {error}")

    def usable(self, name: str) -> bool:
        """Healthy as far as the gateway knows: circuit not open, last health check (if any) passed."""
        b = self.breakers.get(name)
        if b is not None and b.state == OPEN:
            return False
        h = self.health.get(name)
        return h is None or h.error is None or h.checked_at == 0.0

    def state(self, name: str) -> dict[str, object]:
        b = self.breaker(name)
        h = self.health.get(name)
        out: dict[str, object] = {"circuit": b.state, "healthy": None if h is None else h.error is None}
        if h is not None and h.error:
            out["error"] = h.error
        if b.state != CLOSED:
            out["reason"] = b.reason
            out["retry_in_s"] = round(b.retry_in_s, 1)
        return out
