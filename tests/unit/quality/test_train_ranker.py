"""train-ranker on a tiny random PairRM-hf checkpoint: preferences in both formats, bad lines skipped,
held-out accuracy before and after, and a result the gateway's own ranker loads and follows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from service.cli import main
from service.config import RankerConfig
from service.models.checkpoints.tiny import make_pairrm
from service.models.rankers.pairrm import PairRMRanker
from service.quality.train_ranker import read_preferences, split

GOOD, BAD = "the answer is in the house", "of was for on that with"


def preferences(path: Path, n: int = 60) -> Path:
    rng = random.Random(3)
    lines = []
    for i in range(n):
        source = " ".join(rng.choice(["what", "is", "the", "from", "by", "at"]) for _ in range(4)) + f" {i}"
        if i % 2:
            lines.append(json.dumps({"source": source, "chosen": GOOD, "rejected": BAD}))
        else:
            lines.append(json.dumps({"source": source, "candidates": [BAD, GOOD], "ranks": [2, 1]}))
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"source": "s", "candidates": ["a"], "ranks": [1]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_preferences_and_the_split_by_source(tmp_path: Path) -> None:
    pairs, bad = read_preferences(preferences(tmp_path / "p.jsonl"))
    assert len(pairs) == 60 and [n for n, _ in bad] == [6, 10]
    assert all(p.better == GOOD and p.worse == BAD for p in pairs)
    train, heldout = split(pairs, 0.2, seed=0)
    assert len(heldout) == 12 and not {p.source for p in train} & {p.source for p in heldout}


def test_fine_tune_learns_the_preference_and_the_gateway_serves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_pairrm(tmp_path / "pairrm")
    data = preferences(tmp_path / "p.jsonl")
    out = tmp_path / "tuned"
    argv = ["train-ranker", "--checkpoint", str(tmp_path / "pairrm"), "--data", str(data), "--out", str(out)]
    code = main([*argv, "--steps", "60", "--lr", "1e-3", "--heldout", "0.25", "--threads", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    acc = result["heldout_accuracy"]
    assert result["pairs"] == {"train": 45, "heldout": 15}
    assert acc["after"] == 1.0 and acc["after"] > acc["before"]
    ranker = PairRMRanker("tuned", RankerConfig(checkpoint=str(out)))
    try:
        ranking = ranker.rank_sync("who is at the door", [BAD, GOOD])
    finally:
        ranker.close()
    assert ranking.order() == [1, 0]


def test_the_first_choice_over_held_out_lists_follows_the_training(tmp_path: Path) -> None:
    """``fine_tune_pairs`` scores held-out candidate lists as the ensemble uses the ranker: the
    tuned ranker puts the preferred text first where the random one need not."""
    from service.quality.learn import Choice
    from service.quality.lm import FineTune
    from service.quality.train_ranker import fine_tune_pairs

    make_pairrm(tmp_path / "pairrm")
    pairs, _ = read_preferences(preferences(tmp_path / "p.jsonl"))
    lists = [Choice(p.source, (BAD, "so so", GOOD), frozenset({GOOD})) for p in pairs]
    fit = FineTune(steps=60, lr=1e-3, seed=0)
    result = fine_tune_pairs(tmp_path / "pairrm", pairs, tmp_path / "tuned", fit, 0.25, lists)
    t1 = result["heldout_top1"]
    assert t1["lists"] == 15 and t1["after"] == 1.0 and t1["before"] is not None
