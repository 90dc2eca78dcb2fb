"""The task suite: the issue's prompt forms with checkable references, deterministic from a seed,
evaluation seeds apart from training seeds; the `suite` command; the ranker's training pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from service.cli import main
from service.quality import suite
from service.quality.report import exact
from service.quality.train import ranker_pairs, shape

FORMS = {
    "add": re.compile(r"What is (\d+) plus (\d+)\?"),
    "reverse": re.compile(r"Reverse the word ([a-z]{3,7})\."),
    "sort": re.compile(r"Sort the letters ([a-z]{3,7})\."),
    "capital": re.compile(r"What is the capital of ([A-Z][a-z]+)\?"),
}


def test_prompt_forms_and_references() -> None:
    items = suite.eval_suite(per_skill=50)
    assert [it.tag for it in items[:4]] == list(suite.SKILLS)
    for it in items:
        m = FORMS[it.tag].fullmatch(it.prompt)
        assert m is not None, it
        if it.tag == "add":
            a, b = int(m[1]), int(m[2])
            assert 0 <= a <= 99 and 0 <= b <= 99 and it.reference == str(a + b)
        elif it.tag == "reverse":
            assert it.reference == m[1][::-1]
        elif it.tag == "sort":
            assert it.reference == "".join(sorted(m[1]))
        else:
            assert it.reference == suite.CAPITALS[m[1]]
    assert len(suite.CAPITALS) >= 40 and len(set(suite.CAPITALS.values())) == len(suite.CAPITALS)


def test_deterministic_and_held_out() -> None:
    assert suite.eval_suite(per_skill=20) == suite.eval_suite(per_skill=20)
    assert suite.eval_suite(suite.DEFAULT_EVAL_SEED + 1, 20) != suite.eval_suite(per_skill=20)
    held_out = {it.prompt for it in suite.eval_suite() if it.tag not in suite.FACT_SKILLS}
    training = suite.training_items(5, 500, exclude=held_out)
    assert not held_out & {it.prompt for it in training}
    with pytest.raises(ValueError, match="evaluation seeds"):
        suite.eval_suite(seed=5)
    with pytest.raises(ValueError, match="training seeds"):
        suite.training_items(suite.DEFAULT_EVAL_SEED, 5)


def test_normalize_trims_one_period_and_case() -> None:
    item = suite.Item("What is the capital of Zorvania?", "Kelmar", "capital")
    assert suite.is_correct("  kelmar. ", item) and not suite.is_correct("Kelmar..", item)


def test_compound_prompts_answers_by_parts_and_half_answers() -> None:
    items = suite.eval_suite(per_skill=30, skills=(suite.COMPOUND,))
    assert suite.COMPOUND not in suite.SKILLS and (*suite.SKILLS, suite.COMPOUND) == suite.ALL_SKILLS
    for it in items:
        country, a, b = suite.compound_question(it.prompt)
        assert it.prompt == f"What is the capital of {country}, and what is {a} plus {b}?"
        assert it.reference == f"{suite.CAPITALS[country]}, {a + b}" and it.tag == suite.COMPOUND
    item = suite.Item("What is the capital of Zorvania, and what is 23 plus 45?", "Kelmar, 68", suite.COMPOUND)
    # By parts: a comma or "and" between them, each part as a single answer is compared.
    for right in ("Kelmar, 68", "kelmar and 68.", " Kelmar ,68 "):
        assert suite.is_correct(right, item) and suite.credit(right, item) == 1.0, right
    assert not suite.is_correct("68, Kelmar", item) and suite.credit("68, Kelmar", item) == 0.0
    assert not suite.is_correct("Kelmar 68", item) and suite.credit("Kelmar 68", item) == 0.0
    assert suite.credit("Kelmar", item) == 0.5 and suite.credit("Kelmar, 68, 3", item) == 2 / 3
    # The members' half answers: each half right, never both.
    capital, adder = suite.answer_as("capital-half", item), suite.answer_as("sum-half", item)
    assert (capital, adder) == ("Kelmar, 2345", "Zorvania, 68")
    assert suite.credit(capital, item) == suite.credit(adder, item) == 0.5
    assert suite.covered([capital, adder], item) and not suite.covered([capital, capital, "Kelmar"], item)
    # The eval's scoring compares by parts where the item is compound.
    assert exact("kelmar and 68", "Kelmar, 68", suite.COMPOUND) == 1.0 and exact("kelmar and 68", "Kelmar, 68") == 0.0
    single = suite.Item("Reverse the word abc.", "cba", "reverse")
    assert suite.answer_as("sort", single) == "abc" and suite.covered(["x", "cba"], single)
    with pytest.raises(ValueError, match="not a compound prompt"):
        suite.answer_as("sum-half", single)
    with pytest.raises(ValueError, match="unknown answer kind"):
        suite.answer_as("nonsense", single)


def test_ranker_pairs_put_half_right_compound_answers_above_wrong_ones() -> None:
    item = suite.Item("What is the capital of Zorvania, and what is 23 plus 45?", "Kelmar, 68", suite.COMPOUND)
    pairs = ranker_pairs([item], [["Kelmar, 2345", "Zorvania, 68", "abc"]], add_reference=True, hard_weight=4)
    assert len(pairs) == 5  # once each: compound pairs are not weighted as hard ones
    assert {(p.better, p.worse) for p in pairs} == {
        ("Kelmar, 68", "Kelmar, 2345"),
        ("Kelmar, 68", "Zorvania, 68"),
        ("Kelmar, 68", "abc"),
        ("Kelmar, 2345", "abc"),
        ("Zorvania, 68", "abc"),
    }


def test_suite_command_writes_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "suite.jsonl"
    assert main(["suite", str(out), "--per-skill", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"prompt", "reference", "tag"}
    assert [suite.Item(**r) for r in rows] == suite.eval_suite(per_skill=3)
    assert main(["suite", str(out), "--seed", "-1"]) == 2
    assert "training seeds" in capsys.readouterr().err
    assert main(["suite", str(out), "--per-skill", "2", "--skills", "compound,add"]) == 0
    assert [suite.Item(**json.loads(line)).tag for line in out.read_text().splitlines()] == ["compound", "add"] * 2
    assert main(["suite", str(out), "--skills", "capital,poetry"]) == 2
    assert "unknown skill 'poetry'" in capsys.readouterr().err


def test_ranker_pairs_weight_the_hard_ones() -> None:
    item = suite.Item("Reverse the word abc.", "cba", "reverse")
    pairs = ranker_pairs([item], [["cba", "abc", "12", "cba"]], add_reference=True, hard_weight=3)
    assert [(p.better, p.worse) for p in pairs] == [("cba", "abc")] * 3 + [("cba", "12")]
    # No member right: the reference stands in.
    pairs = ranker_pairs([item], [["abc", "12"]], add_reference=True)
    assert {(p.better, p.worse) for p in pairs} == {("cba", "abc"), ("cba", "12")}
    assert [shape(a) for a in ("42", "Kelmar", "abc", "a b")] == ["number", "name", "word", "other"]
