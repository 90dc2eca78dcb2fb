"""Per-key counts in process (service/limits/counts.py) on a clock the test moves: GCRA's burst
and exact Retry-After, tokens charged after the fact, leases that expire."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from service.config import KeyLimits
from service.limits.counts import CONCURRENT, REQUESTS, TOKENS, LocalCounts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_requests_per_minute_allow_a_minutes_burst_then_one_every_60_over_rpm() -> None:
    clock = Clock()
    counts = LocalCounts(clock)
    limits = KeyLimits(requests_per_minute=6)  # one every 10 s, a burst of 6
    assert all(run(counts.admit("k", limits, f"l{i}", 30)).allowed for i in range(6))
    refused = run(counts.admit("k", limits, "l6", 30))
    assert (refused.allowed, refused.limit) == (False, REQUESTS)
    assert refused.retry_after_s == pytest.approx(10.0)
    clock.now += 9.9
    assert not run(counts.admit("k", limits, "l7", 30)).allowed
    clock.now += 0.1
    assert run(counts.admit("k", limits, "l8", 30)).allowed
    assert run(counts.admit("other", limits, "o", 30)).allowed  # keys do not share


def test_a_refused_request_does_not_use_up_the_budget() -> None:
    clock = Clock()
    counts = LocalCounts(clock)
    limits = KeyLimits(requests_per_minute=60)
    for i in range(60):
        assert run(counts.admit("k", limits, str(i), 30)).allowed
    for _ in range(100):  # a client hammering while refused
        assert not run(counts.admit("k", limits, "x", 30)).allowed
    clock.now += 1.0
    assert run(counts.admit("k", limits, "y", 30)).allowed


def test_tokens_are_charged_after_the_answer_and_refuse_while_a_minutes_are_spent() -> None:
    clock = Clock()
    counts = LocalCounts(clock)
    limits = KeyLimits(tokens_per_minute=1000)
    assert run(counts.admit("k", limits, "a", 30)).allowed
    run(counts.charge("k", limits, 1500))  # one answer spent a minute and a half's tokens
    refused = run(counts.admit("k", limits, "b", 30))
    assert (refused.allowed, refused.limit) == (False, TOKENS)
    assert refused.retry_after_s == pytest.approx(30.0)
    clock.now += 30.0
    assert run(counts.admit("k", limits, "c", 30)).allowed


def test_concurrency_leases_are_released_or_expire() -> None:
    clock = Clock()
    counts = LocalCounts(clock)
    limits = KeyLimits(concurrent=2)
    assert run(counts.admit("k", limits, "a", 30)).allowed
    assert run(counts.admit("k", limits, "b", 30)).allowed
    refused = run(counts.admit("k", limits, "c", 30))
    assert (refused.allowed, refused.limit) == (False, CONCURRENT)
    run(counts.release("k", "a"))
    assert run(counts.admit("k", limits, "c", 30)).allowed
    assert counts.in_flight("k") == 2
    clock.now += 31  # the holders died without releasing: their leases expire
    assert run(counts.admit("k", limits, "d", 30)).allowed and counts.in_flight("k") == 1
