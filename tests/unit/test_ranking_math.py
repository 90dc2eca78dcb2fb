"""Aggregation and ranks, checked against llm-blender's own functions."""

import numpy as np
import pytest

from service.models.compat import import_llm_blender
from service.models.ranking import Ranking, ranks_from_scores, scores_from_matrix


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
