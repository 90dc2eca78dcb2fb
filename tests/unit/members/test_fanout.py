"""The fan-out: retries, breakers, quorum, stragglers and deadlines, through the pipeline."""

import time

import pytest

from service.config import RetryConfig
from service.errors import MemberFailure
from service.members.breakers import CLOSED, OPEN
from service.members.fanout import backoff_s, retryable
from service.pipeline.pipeline import Pipeline
from service.pipeline.types import Query
from service.telemetry.metrics import Metrics
from tests.fakes import FakeMember, JoinFuser, LengthRanker, fake_config, fake_pipeline, sample


def test_backoff_is_full_jitter_and_capped() -> None:
    cfg = RetryConfig(backoff_s=0.1, backoff_max_s=0.3)
    assert backoff_s(1, cfg, lambda: 1.0) == pytest.approx(0.1)
    assert backoff_s(2, cfg, lambda: 1.0) == pytest.approx(0.2)
    assert backoff_s(5, cfg, lambda: 1.0) == pytest.approx(0.3)
    assert backoff_s(5, cfg, lambda: 0.5) == pytest.approx(0.15)
    assert retryable(MemberFailure("connect", "x")) and retryable(MemberFailure("http_5xx", "x"))
    assert not retryable(MemberFailure("timeout", "x")) and not retryable(MemberFailure("invalid_response", "x"))


def pipe(members: list[FakeMember], text: str | None = None) -> Pipeline:
    cfg = fake_config(text) if text else fake_config()
    return fake_pipeline(
        cfg, {m.name: m for m in members}, {"length": LengthRanker()}, {"join": JoinFuser()}, Metrics()
    )


async def test_retry_after_connection_error_then_answer() -> None:
    flaky = FakeMember("c", "ccc", fail="connect", fail_first=2)
    p = pipe([FakeMember("a", "aa"), FakeMember("b", "bbbb"), flaky])
    resp = await p.answer(Query(prompt="q"))
    assert resp.failed_members == [] and len(flaky.requests) == 3
    assert sample(p.metrics, "gateway_member_retries_total", member="c") == 2
    assert p.lasting.guards.breaker("c").state == CLOSED


async def test_timeouts_and_bad_answers_are_not_retried() -> None:
    for kind in ("timeout", "invalid_response", "http_4xx"):
        bad = FakeMember("c", "ccc", fail=kind)
        p = pipe([FakeMember("a", "aa"), FakeMember("b", "bbbb"), bad])
        resp = await p.answer(Query(prompt="q"))
        assert [f.kind for f in resp.failed_members] == [kind] and len(bad.requests) == 1


async def test_open_circuit_skips_member_and_shows_in_response() -> None:
    bad = FakeMember("c", "ccc", fail="http_5xx")
    p = pipe([FakeMember("a", "aa"), FakeMember("b", "bbbb"), bad])
    for _ in range(5):  # the default threshold: 5 failed calls (each retried twice)
        await p.answer(Query(prompt="q"))
    assert len(bad.requests) == 15 and p.lasting.guards.breaker("c").state == OPEN
    resp = await p.answer(Query(prompt="q"))
    assert len(bad.requests) == 15  # not called
    assert resp.failed_members[0].kind == "circuit_open" and resp.degraded
    assert sample(p.metrics, "gateway_member_circuit_state", member="c") == 2
    assert sample(p.metrics, "gateway_member_circuit_opened_total", member="c") == 1


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
    resp = await p.answer(Query(prompt="q"))
    took = time.monotonic() - t0
    assert 0.35 < took < 1.0  # quorum (2 of 3) at ~0.2 s, then as long again
    assert resp.failed_members[0].member == "c" and resp.failed_members[0].error.startswith("straggler")
    assert p.lasting.guards.breaker("c").failures == 0  # a straggler is not a failure


async def test_straggler_answering_within_the_grace_is_kept() -> None:
    p = pipe(
        [FakeMember("a", "x", delay=0.1), FakeMember("b", "yy", delay=0.2), FakeMember("c", "z", delay=0.3)], QUORUM
    )
    resp = await p.answer(Query(prompt="q"))
    assert resp.failed_members == []


async def test_request_deadline_shortens_the_ensembles() -> None:
    p = pipe([FakeMember("a", "x", delay=5), FakeMember("b", "yy", delay=5), FakeMember("c", "z", delay=5)], QUORUM)
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        await p.answer(Query(prompt="q", deadline_s=1.0))
    assert time.monotonic() - t0 < 1.3  # the ensemble allows 20 s
    assert getattr(e.value, "status", None) == 504


async def test_a_members_unavailable_reason_reaches_clients_as_its_kind_only() -> None:
    p = pipe([FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")])
    p.unavailable["c"] = "adapter_load: HTTP 400 from /v1/load_lora_adapter; the server said: rank 16 > 8"
    resp = await p.answer(Query(prompt="q"))
    assert [f.error for f in resp.failed_members] == ["unavailable: adapter_load (see /ready)"]
