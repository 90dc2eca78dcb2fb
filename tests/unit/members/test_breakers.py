"""Circuit breakers and active health checks, on an injected clock."""

from service.config import BreakerConfig, HealthCheckConfig
from service.members.breakers import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, Guards
from service.telemetry.metrics import Metrics
from tests.fakes import FakeMember


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


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


async def test_health_checks_trip_and_a_passing_check_closes() -> None:
    metrics = Metrics()
    clock = Clock()
    down = FakeMember("c", "z", fail="connect")
    guards = Guards(metrics, BreakerConfig(cooldown_s=0.05), HealthCheckConfig(failures=2), clock=clock)
    guards.configure(["a", "c"], BreakerConfig(cooldown_s=0.05), HealthCheckConfig(failures=2))
    members = {"a": FakeMember("a", "x"), "c": down}
    await guards.check(members, {})
    assert guards.breaker("c").state == CLOSED and not guards.usable("c")  # one failure: not yet
    await guards.check(members, {})
    assert guards.breaker("c").state == OPEN and guards.state("c")["circuit"] == OPEN
    assert metrics.registry.get_sample_value("gateway_member_healthy", {"member": "c"}) == 0
    down.fail = None
    clock.t += 0.06
    await guards.check(members, {})
    assert guards.breaker("c").state == CLOSED and guards.usable("c")
    guards.configure(["a"], BreakerConfig(), HealthCheckConfig())
    assert "c" not in guards.breakers


async def test_passing_check_after_call_failures_half_opens_for_a_probe() -> None:
    clock = Clock()
    guards = Guards(Metrics(), BreakerConfig(failures=1, cooldown_s=0.05), HealthCheckConfig(), clock=clock)
    b = guards.breaker("m")
    b.failure("http_5xx: boom")
    assert b.state == OPEN
    await guards.check({"m": FakeMember("m", "x")}, {})
    assert b.state == OPEN  # still cooling down
    clock.t += 0.06
    await guards.check({"m": FakeMember("m", "x")}, {})
    assert b.state == HALF_OPEN and guards.usable("m")  # no traffic needed to become probe-able
    assert b.allow() and not b.allow()
    b.failure("http_5xx: still")
    assert b.state == OPEN and b.cooldown_s == 0.1
