"""The plan: the ensemble named (or the default), the request's limits, one deadline from the
request's start (admission queueing counts against it), an id per answer."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.errors import DeadlineExceeded, NotFoundError, Overloaded, RequestError
from service.pipeline.plan import ensemble_label, plan
from service.pipeline.types import Message, Query
from tests.fakes import FAKE_CONFIG, FakeMember, JoinFuser, LengthRanker, fake_config, fake_pipeline


def test_the_default_ensemble_and_its_settings() -> None:
    p = plan(fake_config(), Query(prompt="q"))
    assert p.name == "main" and p.fuse_top_k == 2 and p.fusion == "always" and p.instruction == ""
    assert 0.9 < p.remaining_s() <= 1.0  # the ensemble's deadline_s: 1
    other = plan(fake_config(), Query(prompt="q", ensemble="plain", fuse_top_k=1, fusion="never"))
    assert other.name == "plain" and other.fuse_top_k == 1 and other.fusion == "never"
    assert other.id != p.id and len(p.id) == 32


def test_a_request_may_shorten_the_deadline_not_lengthen_it() -> None:
    assert plan(fake_config(), Query(prompt="q", ensemble="plain", deadline_s=2)).remaining_s() <= 2
    assert plan(fake_config(), Query(prompt="q", deadline_s=5)).remaining_s() <= 1  # main's deadline_s: 1


def test_unknown_ensemble_names_the_clients_field() -> None:
    with pytest.raises(NotFoundError) as e:
        plan(fake_config(), Query(prompt="q", ensemble="nope", ensemble_param="model"))
    assert e.value.param == "model" and e.value.code == "model_not_found"
    assert ensemble_label(fake_config(), "nope") == "-" and ensemble_label(fake_config(), None) == "main"


@pytest.mark.parametrize(
    ("query", "param"),
    [
        (Query(prompt="x" * 51), "prompt"),
        (Query(messages=(Message("user", "x"),) * 4), "messages"),
        (Query(prompt="q", max_tokens=65), "max_tokens"),
        (Query(prompt="q", fuse_top_k=4, fuse_top_k_param="top_k"), "top_k"),
    ],
)
def test_limits_are_checked_before_any_work(query: Query, param: str) -> None:
    config = fake_config(FAKE_CONFIG + "limits: {max_prompt_chars: 50, max_messages: 3, max_tokens: 64}\n")
    with pytest.raises(RequestError) as e:
        plan(config, query)
    assert e.value.param == param


async def test_queueing_counts_against_the_deadline() -> None:
    """One slot; the second request waits 0.7 s of its 1 s for it, then its members (0.6 s) overrun
    what is left. Were the deadline fixed after admission, it would be answered."""
    config = fake_config(FAKE_CONFIG + "limits: {max_in_flight: 1, max_queue: 4, queue_timeout_s: 10}\n")
    members = {n: FakeMember(n, n * 3, delay=0.6) for n in "abc"}
    p = fake_pipeline(config, members, {"length": LengthRanker()}, {"join": JoinFuser()})
    first = asyncio.create_task(p.answer(Query(prompt="q", ensemble="plain")))  # 120 s deadline, holds the slot
    await asyncio.sleep(0.1)
    start = time.monotonic()
    # Past its deadline while its members answer, or (on a machine slow enough that the slot comes
    # free only after the whole second) shed from the queue: either way never answered after 1 s.
    with pytest.raises((DeadlineExceeded, Overloaded)):
        await p.answer(Query(prompt="q"))  # "main": 1 s
    assert time.monotonic() - start < 1.5
    assert (await first).output
