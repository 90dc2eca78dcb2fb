"""Majority vote: the rule, and an ensemble that votes (fake members, the real pipeline)."""

from __future__ import annotations

import pytest

from service.pipeline.pipeline import Pipeline
from service.pipeline.types import Query
from service.pipeline.voting import normalize_answer, vote
from service.telemetry.metrics import Metrics
from tests.fakes import THREE_MEMBERS, FakeMember, JoinFuser, LengthRanker, fake_config, fake_pipeline, sample


def test_answers_are_compared_in_normal_form() -> None:
    assert normalize_answer("  Kelmar. ") == normalize_answer("kelmar") == "kelmar"
    assert normalize_answer("85..") == "85."  # one trailing period only
    assert normalize_answer("a b") != normalize_answer("ab")


@pytest.mark.parametrize(
    ("texts", "winner", "counts", "outcome"),
    [
        (["85", "85", "85"], 0, [3, 3, 3], "unanimous"),
        (["85", "57", "85."], 0, [2, 1, 2], "majority"),
        (["x", "a", "a", "b", "c"], 1, [1, 2, 2, 1, 1], "plurality"),
        (["b", "a"], 0, [1, 1], "tie"),  # no scores: member order decides
        (["p", "q", "q", "p"], 0, [2, 2, 2, 2], "tie"),
    ],
)
def test_vote_counts_and_outcomes(texts: list[str], winner: int, counts: list[int], outcome: str) -> None:
    v = vote(texts)
    assert (v.winner, v.counts, v.outcome) == (winner, counts, outcome)
    assert sorted(v.order) == list(range(len(texts)))


def test_ties_are_broken_by_the_rankers_score() -> None:
    v = vote(["a", "b", "b", "a"], [1.0, 5.0, 0.0, 2.0])
    assert v.order == [1, 3, 0, 2] and v.outcome == "tie"  # b (5.0) beats a (2.0); then by score
    # A clear majority wins whatever the scores say.
    assert vote(["a", "b", "a"], [0.0, 9.0, -1.0]).order == [0, 2, 1]
    # Scores missing for some candidate: position decides.
    assert vote(["a", "b"], [None, 3.0]).winner == 0


VOTE_CONFIG = (
    THREE_MEMBERS
    + """
ensembles:
  ranked: {members: [a, b, c], ranker: length, vote: true, fuser: join, fusion: never}
  plain: {members: [a, b, c], vote: true}
  fused: {members: [a, b, c], ranker: length, vote: true, fuser: join, fuse_top_k: 2}
"""
)


def voting(texts: dict[str, str]) -> tuple[Pipeline, JoinFuser]:
    fuser = JoinFuser()
    members = {name: FakeMember(name, text) for name, text in texts.items()}
    return fake_pipeline(
        fake_config(VOTE_CONFIG), members, {"length": LengthRanker()}, {"join": fuser}, Metrics()
    ), fuser


async def test_the_majority_answer_wins_over_the_rankers_favourite() -> None:
    p, _ = voting({"a": "yes", "b": "no!!!", "c": "Yes."})
    r = await p.answer(Query(prompt="q", ensemble="ranked"))
    # LengthRanker prefers "no!!!" (longest); two of three said yes: of those, "Yes." scores higher.
    assert r.output == "Yes." and not r.fused and r.selected == ["c"]
    assert [(c.member, c.votes) for c in r.candidates or []] == [("c", 2), ("a", 2), ("b", 1)]
    assert [c.rank for c in r.candidates or []] == [2, 3, 1]  # the ranker's own ranks stay
    assert sample(p.metrics, "gateway_votes_total", ensemble="ranked", outcome="majority") == 1


async def test_without_a_ranker_member_order_breaks_ties() -> None:
    p, _ = voting({"a": "one", "b": "two", "c": "three"})
    r = await p.answer(Query(prompt="q", ensemble="plain"))
    assert r.output == "one" and [c.votes for c in r.candidates or []] == [1, 1, 1]
    assert sample(p.metrics, "gateway_votes_total", ensemble="plain", outcome="tie") == 1


async def test_vote_before_the_fuser_feeds_it_the_voted_order() -> None:
    p, fuser = voting({"a": "x", "b": "longest", "c": "x"})
    r = await p.answer(Query(prompt="q", ensemble="fused"))
    assert fuser.calls[-1][2] == ["x", "x"] and r.selected == ["a", "c"] and r.fused


async def test_an_ensemble_without_vote_reports_no_votes() -> None:
    p = fake_pipeline(
        fake_config(),
        {n: FakeMember(n, n * 2) for n in "abc"},
        {"length": LengthRanker()},
        {"join": JoinFuser()},
        Metrics(),
    )
    r = await p.answer(Query(prompt="q"))
    assert all(c.votes is None for c in r.candidates or [])
