"""train-fuser on the tiny random GenFuser: examples from JSONL (bad lines skipped) and from stored
answers with a reference, the split by input, exact match and chrF before and after, and a result
the gateway's own GenFuser loads and fuses with."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from service.cli import main
from service.config import FuserConfig
from service.models.checkpoints.tiny import make_genfuser
from service.models.fusers.genfuser import GenFuser
from service.quality.train_fuser import read_examples, split, store_examples

TARGET = "the same answer"


def examples(path: Path, n: int = 40) -> Path:
    rng = random.Random(5)
    lines = []
    for i in range(n):
        cands = [" ".join(rng.choice(["red", "blue", "cat", "dog", "sun"]) for _ in range(3)) for _ in range(3)]
        lines.append(json.dumps({"instruction": "", "input": f"question {i}", "candidates": cands, "target": TARGET}))
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"input": "q", "candidates": [], "target": "t"}))
    lines.insert(9, json.dumps({"input": "q", "candidates": ["a"], "target": 3}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_examples_and_the_split_by_input(tmp_path: Path) -> None:
    got, bad = read_examples(examples(tmp_path / "f.jsonl"))
    assert len(got) == 40 and [n for n, _ in bad] == [4, 8, 10]
    assert "`candidates`" in bad[1][1] and "`target`" in bad[2][1]
    train, heldout = split(got, 0.25, seed=0)
    assert len(heldout) == 10 and not {e.input_text for e in train} & {e.input_text for e in heldout}


def _row(reference: str | None, hashed: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    row = {
        "input": {"instruction": "Answer: ", "input_text": "2+2?"},
        "inputs_hashed": hashed,
        "candidates": [
            {"member": "a", "text": "5", "rank": 3},
            {"member": "b", "text": "4", "rank": 1},
            {"member": "c", "text": "four", "rank": 2},
            {"member": "d", "text": "five", "rank": None},
        ],
    }
    notes: list[dict[str, Any]] = [{"preferred": None, "rejected": [], "reference": reference, "rating": None}]
    return row, notes


def test_stored_answers_with_a_reference_become_examples_in_the_rankers_order() -> None:
    got = store_examples([_row("4"), _row(None), _row("4", hashed=True)], top_k=3)
    assert len(got) == 1
    (ex,) = got
    assert (ex.instruction, ex.input_text, ex.candidates, ex.target) == ("Answer: ", "2+2?", ("4", "four", "5"), "4")


def test_fine_tune_learns_and_the_gateway_serves_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_genfuser(tmp_path / "genfuser")
    data = examples(tmp_path / "f.jsonl")
    out = tmp_path / "tuned"
    argv = ["train-fuser", "--checkpoint", str(tmp_path / "genfuser"), "--data", str(data), "--out", str(out)]
    code = main([*argv, "--steps", "80", "--lr", "3e-3", "--heldout", "0.25", "--threads", "1", "--warmup", "5"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == {"train": 30, "heldout": 10} and len(result["bad_lines"]) == 3
    before, after = result["heldout"]["before"], result["heldout"]["after"]
    assert after["exact_match"] == 100.0 and before["exact_match"] < 100.0 and after["chrf"] > before["chrf"]
    fuser = GenFuser("tuned", FuserConfig(checkpoint=str(out)))
    try:
        assert fuser.fuse_sync("", "question 99", ["sun cat dog", "red red blue"]) == TARGET
    finally:
        fuser.close()


def test_nothing_to_learn_from_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("{not json\n")
    code = main(["train-fuser", "--checkpoint", str(tmp_path), "--data", str(empty), "--out", str(tmp_path / "o")])
    assert code == 2 and "no usable example" in capsys.readouterr().err
