"""Ranking: score aggregation and ranks checked against llm-blender's own functions, and the
comparison plans driven by a fake comparator (which pairs they ask for, in how many rounds, and what
they conclude)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from service.config import RankerConfig
from service.models.compat import import_llm_blender
from service.models.rankers.ranking import (
    Pair,
    Plan,
    Ranking,
    fusion_lead,
    make_plan,
    ranks_from_scores,
    scores_from_matrix,
)


def drive(
    plan: Plan, logits: dict[Pair, float], logit: Callable[[int, int], float]
) -> tuple[Ranking, list[list[Pair]]]:
    """Run a plan to the end, answering each round; return its ranking and the rounds asked."""
    rounds: list[list[Pair]] = []
    try:
        need = plan.send(None)
        while True:
            assert len(set(need)) == len(need), "a round asks for a pair twice"
            assert not any(p in logits for p in need), "a round asks for a pair already known"
            rounds.append(need)
            for u, v in need:
                logits[(u, v)] = logit(u, v)
            need = plan.send(None)
    except StopIteration as done:
        return done.value, rounds


def config(**kw: object) -> RankerConfig:
    return RankerConfig.model_validate({"checkpoint": "unused", **kw})


def transitive(quality: list[float]) -> Callable[[int, int], float]:
    return lambda u, v: quality[u] - quality[v] + 0.1  # a position bias, as PairRM has


QUALITIES = [[0.3, 2.0, -1.0, 0.7, 1.5], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0], [1.0, 2.0], [0.0, 3.0, 1.0]]


@pytest.mark.parametrize("aggregation", ["max_logits", "max_wins"])
def test_full_plan_asks_every_ordered_pair_once(aggregation: str) -> None:
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5, 5)).astype(np.float32)
    logits: dict[Pair, float] = {}
    ranking, rounds = drive(
        make_plan("full", list(range(5)), logits, config(aggregation=aggregation)), logits, lambda u, v: float(m[u, v])
    )
    assert len(rounds) == 1 and sorted(rounds[0]) == [(u, v) for u in range(5) for v in range(5) if u != v]
    np.fill_diagonal(m, 0)
    expected = scores_from_matrix(m, aggregation)
    np.testing.assert_array_equal(np.array(ranking.scores, dtype=np.float32), expected)
    assert ranking.ranks == ranks_from_scores(expected)


def test_full_plan_compares_a_repeated_text_with_itself_once() -> None:
    where = [0, 1, 0, 2]  # candidates 0 and 2 are the same text
    logits: dict[Pair, float] = {}
    ranking, rounds = drive(make_plan("full", where, logits, config()), logits, lambda u, v: float(u - v) + 0.5)
    assert sorted(rounds[0]) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert ranking.scores[0] == ranking.scores[2] and ranking.ranks[0] == ranking.ranks[2]


@pytest.mark.parametrize("quality", QUALITIES)
@pytest.mark.parametrize("scheme", ["tournament", "bubble"])
def test_cheap_schemes_find_the_best_in_2n_minus_2_comparisons(scheme: str, quality: list[float]) -> None:
    n = len(quality)
    logits: dict[Pair, float] = {}
    ranking, rounds = drive(make_plan(scheme, list(range(n)), logits, config()), logits, transitive(quality))
    assert sum(len(r) for r in rounds) == 2 * (n - 1)
    assert len(rounds) == (math.ceil(math.log2(n)) if scheme == "tournament" else n - 1)
    best = int(np.argmax(quality))
    assert ranking.ranks[best] == 1 and ranking.ranks.count(1) == 1
    assert len(ranking.scores) == n


@pytest.mark.parametrize("quality", QUALITIES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_selects_the_true_top_k_in_order(quality: list[float], k: int) -> None:
    n = len(quality)
    logits: dict[Pair, float] = {}
    ranking, rounds = drive(make_plan("topk", list(range(n)), logits, config(select_k=k)), logits, transitive(quality))
    truth = sorted(range(n), key=lambda c: -quality[c])
    assert ranking.order()[: min(k, n)] == truth[: min(k, n)]
    assert ranking.ranks[truth[0]] == 1
    asked = sum(len(r) for r in rounds)
    assert asked <= n * (n - 1)
    if n == 8:
        assert asked < n * (n - 1) // 2, "top-3 of 8 needs far fewer comparisons than the full matrix"


def test_topk_survives_intransitive_results() -> None:
    # rock-paper-scissors among 0, 1, 2: every candidate loses to someone unselected.
    beats = {(0, 1), (1, 2), (2, 0)}
    logits: dict[Pair, float] = {}
    ranking, _ = drive(
        make_plan("topk", [0, 1, 2], logits, config(select_k=3)),
        logits,
        lambda u, v: 1.0 if (u, v) in beats else -1.0,
    )
    assert sorted(ranking.ranks) == [1, 2, 3]


@pytest.mark.parametrize("scheme", ["tournament", "bubble", "topk"])
def test_copies_tie_without_a_forward(scheme: str) -> None:
    logits: dict[Pair, float] = {}
    ranking, rounds = drive(make_plan(scheme, [0, 0, 0], logits, config()), logits, lambda u, v: 1.0)
    assert rounds == []
    assert ranking.ranks[0] == 1


def test_unknown_scheme() -> None:
    with pytest.raises(ValueError):
        make_plan("quicksort", [0, 1], {}, config())


@pytest.fixture(scope="module")
def blender_utils():  # type: ignore[no-untyped-def]
    return import_llm_blender("llm_blender.gpt_eval.utils")


@pytest.mark.parametrize("policy", ["max_logits", "max_wins"])
@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_scores_match_llm_blender(blender_utils, policy: str, n: int) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(n)
    m = rng.normal(size=(n, n)).astype(np.float32)
    np.fill_diagonal(m, 0)
    ours = scores_from_matrix(m, policy)
    ref = blender_utils.get_scores_from_cmps(m[None], policy=policy)[0]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert ranks_from_scores(ours) == list(blender_utils.get_ranks_from_scores(ref))


def test_ties_share_the_better_rank(blender_utils) -> None:  # type: ignore[no-untyped-def]
    scores = np.array([1.0, 3.0, 3.0, 0.5], dtype=np.float32)
    assert ranks_from_scores(scores) == [3, 1, 1, 4]
    assert ranks_from_scores(scores) == list(blender_utils.get_ranks_from_scores(scores))
    assert Ranking([1.0, 3.0, 3.0, 0.5], [3, 1, 1, 4]).order() == [1, 2, 0, 3]


def test_unknown_aggregation() -> None:
    with pytest.raises(ValueError):
        scores_from_matrix(np.zeros((2, 2)), "median")


def test_fusion_lead_is_over_the_best_rival_that_says_something_else() -> None:
    assert fusion_lead([3.0, 2.5, 1.0], ["x", "y", "z"]) == 0.5
    # The runner-up repeats the first answer: the lead is over the next different one.
    assert fusion_lead([3.0, 2.99, 1.0], ["x", " x\n", "z"]) == 2.0
    assert fusion_lead([1.0, 1.0], ["same", "same"]) == math.inf
    assert fusion_lead([1.0, None], ["a", "b"]) is None
