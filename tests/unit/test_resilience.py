import asyncio
import time

import pytest
from service.members.fanout import backoff_s, retryable

from service.config import BreakerConfig, HealthCheckConfig, LimitsConfig, RetryConfig
from service.errors import MemberFailure, Overloaded, ShuttingDown
from service.members.breakers import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Guards
from service.pipeline.admission import Admission
from service.pipeline.pipeline import Pipeline
from service.protocol import GenerateRequest
from service.telemetry.metrics import Metrics
from tests.fakes import FakeMember, JoinFuser, LengthRanker, fake_config


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_backoff_is_full_jitter_and_capped() -> None:
    cfg = RetryConfig(backoff_s=0.1, backoff_max_s=0.3)
    assert backoff_s(1, cfg, lambda: 1.0) == pytest.approx(0.1)
    assert backoff_s(2, cfg, lambda: 1.0) == pytest.approx(0.2)
    assert backoff_s(5, cfg, lambda: 1.0) == pytest.approx(0.3)
    assert backoff_s(5, cfg, lambda: 0.5) == pytest.approx(0.15)
    assert retryable(MemberFailure("connect", "x")) and retryable(MemberFailure("http_5xx", "x"))
    assert not retryable(MemberFailure("timeout", "x")) and not retryable(MemberFailure("invalid_response", "x"))


def test_breaker_opens_probes_and_closes() -> None:
    clock = Clock()
    changes: list[str] = []
    b = CircuitBreaker(
        "m", BreakerConfig(failures=3, cooldown_s=10, max_cooldown_s=25), lambda _, s: changes.append(s), clock
    )
    for _ in range(2):
        b.failure("boom")
        assert b.allow() and b.state == CLOSED
    b.success()  # consecutive failures only
    for _ in range(3):
        b.failure("boom")
    assert b.state == OPEN and not b.allow()
    clock.t += 9.9
    assert not b.allow()
    clock.t += 0.2
    assert b.allow() and b.state == HALF_OPEN  # the one probe
    assert not b.allow()  # no second probe while it runs
    b.failure("still down")
    assert b.state == OPEN and b.cooldown_s == 20  # doubled
    clock.t += 20.1
    assert b.allow()
    b.failure("again")
    assert b.cooldown_s == 25  # capped
    clock.t += 25.1
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.cooldown_s == 10 and b.allow()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_cancelled_probe_lets_another_through() -> None:
    clock = Clock()
    b = CircuitBreaker("m", BreakerConfig(failures=1, cooldown_s=1), clock=clock)
    b.failure("x")
    clock.t += 2
    assert b.allow() and not b.allow()
    b.release_probe()
    assert b.allow()


def pipe(members: list[FakeMember], text: str | None = None) -> Pipeline:
    cfg = fake_config(text) if text else fake_config()
    return Pipeline(cfg, {m.name: m for m in members}, {"length": LengthRanker()}, {"join": JoinFuser()}, Metrics())


async def test_retry_after_connection_error_then_answer() -> None:
    flaky = FakeMember("c", "ccc", fail="connect", fail_first=2)
    p = pipe([FakeMember("a", "aa"), FakeMember("b", "bbbb"), flaky])
    resp = await p.answer(GenerateRequest(prompt="q"))
    assert resp.failed_members == [] and len(flaky.requests) == 3
    assert p.metrics.retries.labels("c")._value.get() == 2
    assert p.guards.breaker("c").state == CLOSED


async def test_timeouts_and_bad_answers_are_not_retried() -> None:
    for kind in ("timeout", "invalid_response", "http_4xx"):
        bad = FakeMember("c", "ccc", fail=kind)
        p = pipe([FakeMember("a", "aa"), FakeMember("b", "bbbb"), bad])
        resp = await p.answer(GenerateRequest(prompt="q"))
        assert [f.kind for f in resp.failed_members] == [kind] and len(bad.requests) == 1


async def test_open_circuit_skips_member_and_shows_in_response() -> None:
    bad = FakeMember("c", "ccc", fail="http_5xx")
    p = pipe([FakeMember("a", "aa"), FakeMember("b", "bbbb"), bad])
    for _ in range(5):  # the default threshold: 5 failed calls (each retried twice)
        await p.answer(GenerateRequest(prompt="q"))
    assert len(bad.requests) == 15 and p.guards.breaker("c").state == OPEN
    resp = await p.answer(GenerateRequest(prompt="q"))
    assert len(bad.requests) == 15  # not called
    assert resp.failed_members[0].kind == "circuit_open" and resp.degraded
    assert p.metrics.circuit_state.labels("c")._value.get() == 2
    assert p.metrics.circuit_opened.labels("c")._value.get() == 1


QUORUM = """
members:
  - {name: a, endpoint: "http://127.0.0.1:9/v1", model: m}
  - {name: b, endpoint: "http://127.0.0.1:9/v1", model: m}
  - {name: c, endpoint: "http://127.0.0.1:9/v1", model: m}
ensembles:
  main: {members: [a, b, c], deadline_s: 20, straggler_ratio: 1.0}
"""


async def test_quorum_then_straggler_grace_not_the_slowest_member() -> None:
    slow = FakeMember("c", "zzz", delay=30)
    p = pipe([FakeMember("a", "x", delay=0.1), FakeMember("b", "yy", delay=0.2), slow], QUORUM)
    t0 = time.monotonic()
    resp = await p.answer(GenerateRequest(prompt="q"))
    took = time.monotonic() - t0
    assert 0.35 < took < 1.0  # quorum (2 of 3) at ~0.2 s, then as long again
    assert resp.failed_members[0].member == "c" and resp.failed_members[0].error.startswith("straggler")
    assert p.guards.breaker("c").failures == 0  # a straggler is not a failure


async def test_straggler_answering_within_the_grace_is_kept() -> None:
    p = pipe(
        [FakeMember("a", "x", delay=0.1), FakeMember("b", "yy", delay=0.2), FakeMember("c", "z", delay=0.3)], QUORUM
    )
    resp = await p.answer(GenerateRequest(prompt="q"))
    assert resp.failed_members == []


async def test_request_deadline_shortens_the_ensembles() -> None:
    p = pipe([FakeMember("a", "x", delay=5), FakeMember("b", "yy", delay=5), FakeMember("c", "z", delay=5)], QUORUM)
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        await p.answer(GenerateRequest(prompt="q", deadline_s=1.0))
    assert time.monotonic() - t0 < 1.3  # the ensemble allows 20 s
    assert getattr(e.value, "status", None) == 504


async def test_health_checks_trip_and_a_passing_check_closes() -> None:
    metrics = Metrics()
    down = FakeMember("c", "z", fail="connect")
    guards = Guards(metrics, BreakerConfig(cooldown_s=0.05), HealthCheckConfig(failures=2))
    guards.configure(["a", "c"], BreakerConfig(cooldown_s=0.05), HealthCheckConfig(failures=2))
    members = {"a": FakeMember("a", "x"), "c": down}
    await guards.check(members, {})
    assert guards.breaker("c").state == CLOSED and not guards.usable("c")  # one failure: not yet
    await guards.check(members, {})
    assert guards.breaker("c").state == OPEN and guards.state("c")["circuit"] == OPEN
    assert metrics.member_healthy.labels("c")._value.get() == 0
    down.fail = None
    await asyncio.sleep(0.06)
    await guards.check(members, {})
    assert guards.breaker("c").state == CLOSED and guards.usable("c")
    guards.configure(["a"], BreakerConfig(), HealthCheckConfig())
    assert "c" not in guards.breakers


async def test_admission_sheds_at_once_when_the_queue_is_full() -> None:
    metrics = Metrics()
    adm = Admission(LimitsConfig(max_in_flight=2, max_queue=1, queue_timeout_s=5), metrics)
    await adm.acquire(10)
    await adm.acquire(10)
    queued = asyncio.create_task(adm.acquire(10))
    await asyncio.sleep(0.01)
    assert metrics.queue_depth._value.get() == 1
    t0 = time.perf_counter()
    with pytest.raises(Overloaded) as e:
        await adm.acquire(10)
    assert time.perf_counter() - t0 < 0.05
    assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
    assert metrics.shed.labels("queue_full")._value.get() == 1
    adm.release()  # the queued one gets the slot
    await asyncio.wait_for(queued, 1)
    assert adm.running == 2 and metrics.queue_depth._value.get() == 0


async def test_admission_queue_timeout_and_cancelled_waiter() -> None:
    adm = Admission(LimitsConfig(max_in_flight=1, max_queue=5, queue_timeout_s=0.05), Metrics())
    await adm.acquire(10)
    with pytest.raises(Overloaded):
        await adm.acquire(10)
    waiter = asyncio.create_task(adm.acquire(10))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    adm.release()
    assert adm.running == 0
    await adm.acquire(10)
    assert adm.running == 1
    adm.draining = True
    with pytest.raises(ShuttingDown):
        await adm.acquire(10)


async def test_passing_check_after_call_failures_half_opens_for_a_probe() -> None:
    guards = Guards(Metrics(), BreakerConfig(failures=1, cooldown_s=0.05), HealthCheckConfig())
    b = guards.breaker("m")
    b.failure("http_5xx: boom")
    assert b.state == OPEN
    await guards.check({"m": FakeMember("m", "x")}, {})
    assert b.state == OPEN  # still cooling down
    await asyncio.sleep(0.06)
    await guards.check({"m": FakeMember("m", "x")}, {})
    assert b.state == HALF_OPEN and guards.usable("m")  # no traffic needed to become probe-able
    assert b.allow() and not b.allow()
    b.failure("http_5xx: still")
    assert b.state == OPEN and b.cooldown_s == 0.1
