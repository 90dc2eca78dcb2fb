"""How the packed DeBERTa forward groups sequences for attention (its numbers are checked against
transformers' forward in test_ranking_worker.py)."""

from __future__ import annotations

import itertools

from service.models.rankers.deberta import attention_groups


def test_equal_lengths_share_one_group() -> None:
    assert attention_groups([100] * 20) == [(0, 20)]


def test_far_apart_lengths_get_their_own_groups() -> None:
    lengths = [20] * 10 + [400] * 10
    assert attention_groups(lengths) == [(0, 10), (10, 20)]


def test_groups_cover_every_sequence_in_order_and_never_cost_more_than_one() -> None:
    lengths = sorted([37, 52, 60, 61, 75, 90, 128, 129, 200, 350, 351, 600])
    groups = attention_groups(lengths)
    assert groups[0][0] == 0 and groups[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))

    def cost(gs: list[tuple[int, int]]) -> int:
        return sum((e - s) * lengths[e - 1] ** 2 + 64 * 64 * 4 for s, e in gs)

    assert cost(groups) <= cost([(0, len(lengths))])


def test_a_large_overhead_keeps_one_group() -> None:
    assert attention_groups([10, 20, 400], overhead=10**9) == [(0, 3)]
