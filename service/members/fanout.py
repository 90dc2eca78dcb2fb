"""The fan-out: ask an ensemble's members at once, with retries, circuit breakers, a quorum and a
straggler grace, and say what each one answered or why it did not.

A member call is retried after a connection error or a 5xx (full-jitter exponential backoff) while
the deadline allows. A member whose circuit is open, or that could not be prepared, is skipped
without a call. Once ``quorum`` members have answered, the rest get ``straggler_ratio`` times as
long again as the quorum took (at least ``straggler_min_s``), never past the deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from opentelemetry.trace import SpanKind

from service.config import RetryConfig
from service.errors import MemberFailure
from service.members.base import Completion, Member, MemberRequest
from service.members.breakers import Guards
from service.telemetry.book import StatusBook
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import fail, stage


def backoff_s(attempt: int, config: RetryConfig, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff before retry number ``attempt`` (1 = the first retry)."""
    return float(rng() * min(config.backoff_max_s, config.backoff_s * 2 ** (attempt - 1)))


def member_of(key: str) -> str:
    """The member a fan-out key names: ``name``, or ``name#i`` for its i-th sample."""
    return key.split("#", 1)[0]


def retryable(failure: MemberFailure) -> bool:
    """Connection errors and 5xx may pass on a second try; timeouts and bad answers are not retried."""
    return failure.kind in ("connect", "http_5xx")


@dataclass
class Outcome:
    """One member's part in a request: its completion, or why there is none (``kind`` labels it)."""

    member: str
    completion: Completion | None = None
    error: str | None = None
    kind: str | None = None


@dataclass(frozen=True)
class Wait:
    """How long the fan-out waits: until ``deadline_at`` (``time.monotonic()``), or until ``quorum``
    members answered plus the stragglers' grace."""

    deadline_at: float
    quorum: int
    straggler_ratio: float
    straggler_min_s: float


class FanOut:
    """Calls members and records each call in the breakers, the metrics and the status book."""

    def __init__(
        self,
        members: Mapping[str, Member],
        guards: Guards,
        retry: RetryConfig,
        metrics: Metrics,
        status: StatusBook,
        unavailable: Mapping[str, str],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.members = members
        self.guards = guards
        self.retry = retry
        self.metrics = metrics
        self.status = status
        self.unavailable = unavailable
        self._sleep = sleep

    async def call(self, member: Member, request: MemberRequest, deadline_at: float, key: str | None = None) -> Outcome:
        """One member's answer (``key``: the candidate it is, ``name#i`` for a sample), retried after
        connection errors and 5xx while the deadline allows."""
        key = key or member.name
        breaker = self.guards.breaker(member.name)
        attempt = 1
        server = getattr(member, "base_url", None)
        try:
            while True:
                span_attrs = {"gateway.member": member.name, "gateway.candidate": key, "gateway.attempt": attempt}
                if server is not None:
                    span_attrs["server.address"] = server
                try:
                    with stage(f"member {member.name}", span_attrs, SpanKind.CLIENT) as span:
                        try:
                            completion = await member.generate(request)
                        except MemberFailure as e:
                            span.set_attribute("gateway.status", e.kind)
                            fail(span, str(e))
                            raise
                        except asyncio.CancelledError:
                            span.set_attribute("gateway.status", "cancelled")  # a straggler, or the deadline
                            raise
                        span.set_attribute("gateway.status", "ok")
                        span.set_attribute("gen_ai.usage.input_tokens", completion.prompt_tokens)
                        span.set_attribute("gen_ai.usage.output_tokens", completion.completion_tokens)
                except MemberFailure as e:
                    pause = backoff_s(attempt, self.retry)
                    if retryable(e) and attempt < self.retry.attempts and time.monotonic() + pause < deadline_at:
                        self.metrics.retries.labels(member.name).inc()
                        attempt += 1
                        await self._sleep(pause)
                        continue
                    self.metrics.member_errors.labels(member.name, e.kind).inc()
                    self.status.call(member.name, None, str(e))
                    breaker.failure(str(e))
                    return Outcome(key, error=str(e), kind=e.kind)
                breaker.success()
                self.status.call(member.name, completion.latency_ms)
                self.metrics.member_latency.labels(member.name).observe(completion.latency_ms / 1000)
                return Outcome(key, completion=completion)
        except asyncio.CancelledError:
            breaker.release_probe()
            raise

    def skip_reason(self, key: str) -> Outcome | None:
        """An outcome without a call for a member that cannot be asked now, else None."""
        name = member_of(key)
        if name in self.unavailable:
            self.metrics.member_errors.labels(name, "unavailable").inc()
            # The reason's kind only (``adapter_load: ...``): the operators' text may quote a server.
            why = self.unavailable[name].split(":", 1)[0]
            return Outcome(key, error=f"unavailable: {why} (see /ready)", kind="unavailable")
        breaker = self.guards.breaker(name)
        if not breaker.allow():
            self.metrics.member_errors.labels(name, "circuit_open").inc()
            return Outcome(
                key,
                error=f"circuit_open: skipped for {breaker.retry_in_s:.1f}s more after {breaker.reason}",
                kind="circuit_open",
            )
        return None

    async def gather(self, requests: Mapping[str, MemberRequest], wait: Wait) -> list[Outcome]:
        """Ask every member named in ``requests`` (``name``, or ``name#i`` for its i-th sample); one
        outcome each, in ``requests``' order."""
        tasks: dict[asyncio.Task[Outcome], str] = {}
        outcomes: list[Outcome] = []
        for name, request in requests.items():
            skip = self.skip_reason(name)
            if skip is not None:
                outcomes.append(skip)
                continue
            member = self.members[member_of(name)]
            tasks[asyncio.create_task(self.call(member, request, wait.deadline_at, name))] = name
        start = time.monotonic()
        cutoff = wait.deadline_at
        answered = 0
        pending: set[asyncio.Task[Outcome]] = set(tasks)
        while pending:
            left = cutoff - time.monotonic()
            if left <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            answered += sum(1 for t in done if t.result().completion is not None)
            if cutoff == wait.deadline_at and answered >= wait.quorum:
                now = time.monotonic()
                grace = max(wait.straggler_min_s, (now - start) * wait.straggler_ratio)
                cutoff = min(wait.deadline_at, now + grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        straggler = cutoff < wait.deadline_at
        for task, name in tasks.items():
            if task not in pending:
                outcomes.append(task.result())
                continue
            self.status.call(member_of(name), None, "straggler" if straggler else "deadline")
            if straggler:
                self.metrics.member_errors.labels(member_of(name), "straggler").inc()
                waited = time.monotonic() - start
                outcomes.append(
                    Outcome(name, error=f"straggler: the quorum had answered; waited {waited:.2f}s", kind="straggler")
                )
            else:
                self.metrics.member_errors.labels(member_of(name), "deadline").inc()
                self.guards.breaker(member_of(name)).failure("no answer before the deadline")
                outcomes.append(Outcome(name, error="deadline: no answer before the deadline", kind="deadline"))
        order = {name: i for i, name in enumerate(requests)}
        return sorted(outcomes, key=lambda o: order[o.member])
