"""The routing stage: route, cascade, caps, and a router that fails (fake members and router)."""

import pytest

from service.config import parse_config
from service.errors import RequestError
from service.pipeline.pipeline import Pipeline
from service.pipeline.types import NotCalled, Query
from service.telemetry.metrics import Metrics
from tests.fakes import FakeMember, FakeRouter, JoinFuser, LengthRanker, fake_pipeline, sample

MEMBERS = """
members:
  - {name: a, endpoint: "http://127.0.0.1:9/v1", model: m}
  - {name: b, endpoint: "http://127.0.0.1:9/v1", model: m}
  - {name: c, endpoint: "http://127.0.0.1:9/v1", model: m}
  - {name: d, endpoint: "http://127.0.0.1:9/v1", model: m, samples: 2, sampling: {temperature: 1}}
rankers: {length: {checkpoint: unused}}
fusers: {join: {checkpoint: unused}}
routers: {r: {checkpoint: unused}}
"""


def build(
    ensemble: str, members: list[FakeMember], router: FakeRouter | None = None, metrics: Metrics | None = None
) -> Pipeline:
    config = parse_config(MEMBERS + "ensembles:\n  e: " + ensemble + "\n")
    return fake_pipeline(
        config,
        {m.name: m for m in members},
        {"length": LengthRanker()},
        {"join": JoinFuser()},
        metrics or Metrics(),
        routers={"r": router} if router is not None else None,
    )


def four(texts: tuple[str, str, str, str] = ("aa", "bbbb", "ccc", "d"), **fail: str) -> list[FakeMember]:
    return [FakeMember(n, t, fail=fail.get(n)) for n, t in zip("abcd", texts, strict=True)]


SCORES = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.2}


async def test_route_calls_the_routers_first_members_only() -> None:
    members = four()
    metrics = Metrics()
    router = FakeRouter(SCORES)
    p = build(
        "{members: [a, b, c, d], ranker: length, fusion: never, router: r, route: {members: 2}}",
        members,
        router,
        metrics,
    )
    answer = await p.answer(Query(prompt="q", instruction="I: "))
    assert router.sources == ["I: q"]
    assert [c.member for c in answer.candidates] == ["b", "c"]
    assert [len(m.requests) for m in members] == [0, 1, 1, 0]
    assert answer.not_called == [NotCalled("d", "routed"), NotCalled("a", "routed")]
    assert not answer.degraded
    # d has two samples: two calls saved
    assert sample(metrics, "gateway_member_calls_saved_total", ensemble="e", reason="routed") == 3
    assert sample(metrics, "gateway_member_calls_total", ensemble="e") == 2
    routed = p.lasting.status.routed("e")
    assert routed == {"answers": 1, "calls_per_answer": 2.0, "calls_saved": {"routed": 3}}


async def test_route_falls_back_to_the_rest_when_the_routed_members_fail() -> None:
    members = four(b="http_5xx")
    p = build(
        "{members: [a, b, c, d], ranker: length, fusion: never, router: r, route: {members: 1}}",
        members,
        FakeRouter(SCORES),
    )
    answer = await p.answer(Query(prompt="q"))
    assert answer.output == "ccc"  # the reserve answered; the longest wins
    assert {c.member for c in answer.candidates} == {"a", "c", "d#1", "d#2"}
    assert [f.member for f in answer.failed_members] == ["b"]
    assert answer.not_called == []


async def test_cascade_stops_when_the_first_answer_is_certain() -> None:
    members = four(("x", "same", "same", "y"))
    p = build(
        "{members: [a, b, c, d], ranker: length, fusion: never, router: r, cascade: {members: 2}}",
        members,
        FakeRouter(SCORES),
    )
    answer = await p.answer(Query(prompt="q"))
    assert answer.output == "same"
    assert [len(m.requests) for m in members] == [0, 1, 1, 0]
    assert {(n.member, n.reason) for n in answer.not_called} == {
        ("a", "cascade_not_needed"),
        ("d", "cascade_not_needed"),
    }


async def test_cascade_calls_the_rest_when_the_lead_is_under_the_margin() -> None:
    # b and c disagree, b leads by 1 character of length: under the margin of 2
    members = four(("aaaaaaaa", "bbbb", "ccc", "d"))
    p = build(
        "{members: [a, b, c, d], ranker: length, fusion: never, router: r, cascade: {members: 2, margin: 2}}",
        members,
        FakeRouter(SCORES),
    )
    answer = await p.answer(Query(prompt="q"))
    assert answer.output == "aaaaaaaa"  # only the second wave had it
    assert [len(m.requests) for m in members] == [1, 1, 1, 2]
    assert answer.not_called == []
    assert answer.candidates[0].member == "a"


async def test_cascade_of_one_trusts_the_routers_chance() -> None:
    sure = build(
        "{members: [a, b, c], ranker: length, fusion: never, router: r, cascade: {members: 1, min_probability: 0.8}}",
        four()[:3],
        FakeRouter(SCORES),
    )
    assert [c.member for c in (await sure.answer(Query(prompt="q"))).candidates] == ["b"]  # 0.9 >= 0.8
    unsure = build(
        "{members: [a, b, c], ranker: length, fusion: never, router: r, cascade: {members: 1, min_probability: 0.95}}",
        four()[:3],
        FakeRouter(SCORES),
    )
    assert len((await unsure.answer(Query(prompt="q"))).candidates) == 3


async def test_a_failing_router_degrades_to_every_member() -> None:
    metrics = Metrics()
    members = four()
    p = build(
        "{members: [a, b, c, d], ranker: length, fusion: never, router: r, route: {members: 1}}",
        members,
        FakeRouter(SCORES, fail=True),
        metrics,
    )
    answer = await p.answer(Query(prompt="q"))
    assert len(answer.candidates) == 5 and answer.not_called == []
    assert answer.degraded and answer.degraded_reasons[0].startswith("router_failed: router fake-router")
    assert sample(metrics, "gateway_degraded_total", ensemble="e", reason="router_failed") == 1
    assert sample(metrics, "gateway_model_errors_total", stage="route", model="fake-router") == 1


async def test_a_router_that_is_not_loaded_degrades_to_every_member() -> None:
    members = four()
    p = build("{members: [a, b, c, d], ranker: length, fusion: never, router: r, route: {members: 1}}", members)
    answer = await p.answer(Query(prompt="q"))
    assert [len(m.requests) for m in members] == [1, 1, 1, 2] and answer.not_called == []
    assert answer.degraded_reasons[0] == "router_failed: router r is not loaded"


async def test_cap_without_router_keeps_the_first_listed_and_a_request_may_only_lower_it() -> None:
    members = four()
    p = build("{members: [a, b, c, d], ranker: length, fusion: never, max_member_calls: 2}", members)
    answer = await p.answer(Query(prompt="q"))
    assert [len(m.requests) for m in members] == [1, 1, 0, 0]
    assert answer.not_called == [NotCalled("c", "cap"), NotCalled("d", "cap")]
    lower = await p.answer(Query(prompt="q", max_members=1))
    assert [c.member for c in lower.candidates] == ["a"]
    higher = await p.answer(Query(prompt="q", max_members=4))  # never above the ensemble's cap
    assert len(higher.candidates) == 2


async def test_cap_follows_the_router_and_unknown_members_come_last() -> None:
    members = four()
    p = build(
        "{members: [a, b, c, d], ranker: length, fusion: never, router: r, max_member_calls: 3}",
        members,
        FakeRouter({"b": 0.2, "a": 0.1}),
    )
    answer = await p.answer(Query(prompt="q"))
    assert sorted(c.member for c in answer.candidates) == ["a", "b", "c"]
    assert answer.not_called == [NotCalled("d", "cap")]


async def test_max_members_below_what_the_ensemble_needs_is_refused() -> None:
    p = build("{members: [a, b, c], min_candidates: 2}", four()[:3])
    with pytest.raises(RequestError) as e:
        await p.answer(Query(prompt="q", max_members=1, max_members_param="ensemble.max_members"))
    assert e.value.param == "ensemble.max_members"


@pytest.mark.parametrize(
    ("ensemble", "field"),
    [
        ("{members: [a, b], route: {members: 1}}", "route: needs a `router`"),
        ("{members: [a, b], router: r, route: {members: 3}}", "route.members: exceeds"),
        ("{members: [a, b], router: r, route: {members: 1}, cascade: {members: 1}}", "not both"),
        ("{members: [a, b], router: r, cascade: {members: 1}}", "cascade: needs a `ranker`"),
        ("{members: [a, b], router: nope}", "ensembles.e.router: unknown router"),
        ("{members: [a, b], min_candidates: 2, max_member_calls: 1}", "max_member_calls: below min_candidates"),
    ],
)
def test_bad_routing_config_is_refused_naming_the_field(ensemble: str, field: str) -> None:
    with pytest.raises(Exception) as e:
        parse_config(MEMBERS + "ensembles:\n  e: " + ensemble + "\n")
    assert field in str(e.value)
