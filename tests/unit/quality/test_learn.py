"""Pairs from the store's feedback, and the config swap of the learning loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.quality.learn import gather_pairs, pairs_of
from service.quality.retrain import better_ranker, point_config_at


def answer(fused: bool = False, hashed: bool = False, selected: str = "a") -> dict[str, Any]:
    return {
        "id": "x",
        "input": {"instruction": "Answer: ", "input_text": "2+2?"},
        "inputs_hashed": hashed,
        "fused": fused,
        "fusion": {"selected": [selected]},
        "candidates": [
            {"member": "a", "text": "5"},
            {"member": "b", "text": "4"},
            {"member": "c", "text": "four"},
            {"member": "d", "text": "5"},
        ],
    }


def note(**given: Any) -> dict[str, Any]:
    return {"preferred": None, "rejected": [], "reference": None, "rating": None, **given}


def as_tuples(row: dict[str, Any], *notes: dict[str, Any]) -> set[tuple[str, str]]:
    pairs = pairs_of(row, list(notes), 80.0)
    assert all(p.source == "Answer: 2+2?" for p in pairs)
    return {(p.better, p.worse) for p in pairs}


def test_preferred_beats_every_candidate_that_says_something_else() -> None:
    assert as_tuples(answer(), note(preferred="b")) == {("4", "5"), ("4", "four")}


def test_rejected_alone_lose_to_the_rest() -> None:
    assert as_tuples(answer(), note(rejected=["a", "d"])) == {("4", "5"), ("four", "5")}


def test_a_reference_splits_right_from_wrong() -> None:
    assert as_tuples(answer(), note(reference="4.")) == {("4", "5"), ("4", "four")}


def test_ratings_count_for_an_unfused_answer_only() -> None:
    assert as_tuples(answer(selected="b"), note(rating=1.0)) == {("4", "5"), ("4", "four")}
    assert as_tuples(answer(selected="a"), note(rating=-1.0)) == {("4", "5"), ("four", "5")}
    assert as_tuples(answer(fused=True), note(rating=1.0)) == set()


def test_hashed_inputs_are_skipped_and_counted() -> None:
    got = gather_pairs([(answer(hashed=True), [note(preferred="b")]), (answer(), [note(preferred="b")])])
    assert (got.answers, got.skipped_hashed, len(got.pairs)) == (2, 1, 2)


def test_the_loop_repoints_only_the_rankers_checkpoint(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    text = (
        "# keep me\nrankers:\n  r:\n    checkpoint: ${M}/pairrm  # and me\n"
        "fusers:\n  f:\n    checkpoint: ${M}/genfuser\n"
    )
    cfg.write_text(text)
    old = point_config_at(cfg, "r", tmp_path / "new")
    assert old == text
    now = cfg.read_text()
    assert "# keep me" in now and "# and me" in now and "${M}/genfuser" in now
    assert yaml.safe_load(now)["rankers"]["r"]["checkpoint"] == str((tmp_path / "new").resolve())
    with pytest.raises(ValueError, match=r"rankers\.q\.checkpoint"):
        point_config_at(cfg, "q", tmp_path / "new")


def test_lists_record_what_the_feedback_says_is_right() -> None:
    got = gather_pairs([(answer(), [note(reference="4")]), (answer(), [note(comment="meh")])])
    assert len(got.choices) == 1
    assert got.choices[0].candidates == ("5", "4", "four") and got.choices[0].right == {"4"}


@pytest.mark.parametrize(
    ("top1", "pairwise", "min_gain", "better"),
    [
        ((0.8, 0.9), (0.99, 0.99), 0.0, True),  # first choices better: swap
        ((0.9, 0.8), (0.95, 0.99), 0.0, False),  # first choices worse: never, whatever the pairs say
        ((0.9, 0.9), (0.95, 0.99), 0.0, True),  # tied lists: the pairs decide
        ((0.9, 0.9), (0.99, 0.99), 0.0, False),
        ((0.8, 0.85), (0.9, 0.99), 0.1, False),  # not by the margin asked
        ((None, None), (0.9, 0.95), 0.0, True),  # no lists: pairs only
    ],
)
def test_the_loop_swaps_only_a_better_ranker(
    top1: tuple[float | None, float | None], pairwise: tuple[float, float], min_gain: float, better: bool
) -> None:
    trained = {
        "heldout_top1": {"before": top1[0], "after": top1[1]},
        "heldout_accuracy": {"before": pairwise[0], "after": pairwise[1]},
    }
    assert better_ranker(trained, min_gain)[0] is better
