"""The eval tool on fake parts: what it reads, what it scores, what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from service.quality.dataset import read_dataset
from service.quality.evaluate import Observation, Settings, run
from service.quality.report import Policy, build_report, preference_pairs, table, write
from service.serving.app import create_app
from service.serving.build import Components
from tests.fakes import FAKE_CONFIG, FakeMember, JoinFuser, LengthRanker, fake_config

# Members answer "aa", "bbbb", "ccc"; the length ranker puts b first; the fuser joins "bbbb | ccc".
LINES = [
    {"prompt": "q1", "reference": "bbbb", "tag": "x"},
    {"prompt": "q2", "reference": "BBBB.", "tag": "x"},  # normalized: case and one trailing period
    {"messages": [{"role": "user", "content": "q3"}], "reference": "ccc", "tag": "y"},
    {"prompt": "q4", "reference": "bbbb | ccc", "tag": "y"},
]


def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    bad = ["not json", json.dumps({"prompt": "q"}), json.dumps({"prompt": "q", "messages": [], "reference": "r"})]
    path.write_text("\n".join([json.dumps(LINES[0]), *bad, "", *map(json.dumps, LINES[1:])]) + "\n")
    return path


async def observe(items: list) -> list[Observation]:  # type: ignore[type-arg]
    members = [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]
    parts = Components(
        members={m.name: m for m in members}, rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()}
    )
    app = create_app(fake_config(FAKE_CONFIG), parts=parts)
    out: list[Observation] = []
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client,
    ):
        await run(client, items, Settings(ensemble="main", concurrency=2), out)
    return sorted(out, key=lambda o: o.item.line)


def test_bad_lines_are_reported_with_their_numbers(tmp_path: Path) -> None:
    data = read_dataset(dataset(tmp_path))
    assert [i.line for i in data.items] == [1, 6, 7, 8]
    assert [n for n, _ in data.bad_lines] == [2, 3, 4]
    assert "reference" in data.bad_lines[1][1] and "exactly one" in data.bad_lines[2][1]


async def test_one_pass_scores_members_ranker_fuser_and_oracle(tmp_path: Path) -> None:
    obs = await observe(read_dataset(dataset(tmp_path)).items)
    assert all(o.error is None and o.fused for o in obs)  # fusion forced on for the eval
    report = build_report(obs, Policy("adaptive", 0.5), margins=(0.5, 5.0))
    s = report["scores"]
    assert s["overall"]["member b"]["exact_match"] == 50.0 and s["x"]["member b"]["exact_match"] == 100.0
    assert s["y"]["member c"]["exact_match"] == 50.0 and s["overall"]["member a"]["exact_match"] == 0.0
    assert report["best_member"] == "b" and s["overall"]["best single member"] == s["overall"]["member b"]
    assert s["overall"]["ranker first"]["exact_match"] == 50.0  # b, the longest
    assert s["overall"]["fused (always)"]["exact_match"] == 25.0  # only q4's reference is the join
    assert s["overall"]["oracle"]["exact_match"] == 75.0
    assert s["overall"]["random member"]["exact_match"] == pytest.approx(100 * (1 / 3 + 1 / 3 + 1 / 3 + 0) / 4)
    # Lead of b over c is 1.0 (lengths 4 vs 3): margin 0.5 skips the fuser everywhere, 5.0 never.
    assert report["adaptive"] == [
        {"margin": 0.5, "skip_rate": 100.0, "exact_match": 50.0},
        {"margin": 5.0, "skip_rate": 0.0, "exact_match": 25.0},
    ]
    assert s["overall"]["ensemble (policy)"]["exact_match"] == 50.0  # adaptive at 0.5 = the ranker's first
    assert 0 < s["overall"]["member b"]["chrf"] <= 100


async def test_report_files_table_and_pairs(tmp_path: Path) -> None:
    obs = await observe(read_dataset(dataset(tmp_path)).items)
    report = build_report(obs, judge=lambda source, answer, other: 1.0 if len(answer) > len(other) else 0.0)
    paths = write(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["answered"] == 4
    assert "| fused (always) |" in paths["markdown"].read_text()
    assert paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table(report).splitlines()[0].split() == ["x", "y", "overall"]
    assert report["judge_win_rate"] == {"a": 100.0, "b": 100.0, "c": 100.0}  # the join is longer than each
    pairs = preference_pairs(obs)
    assert {"source": "q1", "chosen": "bbbb", "rejected": "aa"} in pairs and len(pairs) == 2 + 2 + 2


def test_the_vote_row_replays_the_gateways_vote() -> None:
    from service.quality.dataset import EvalItem
    from service.quality.evaluate import Candidate

    def seen(reference: str, answers: list[tuple[str, float]]) -> Observation:
        item = EvalItem(line=1, prompt="q", messages=None, reference=reference, tag="t")
        cands = [Candidate(member=f"m{i}", text=t, score=s, rank=i + 1) for i, (t, s) in enumerate(answers)]
        return Observation(item=item, output="fused", candidates=cands)

    obs = [
        seen("right", [("right", 9.0), ("wrong", 1.0), ("wrong", 0.5)]),  # the majority is wrong, the ranker right
        seen("right", [("odd", 9.0), ("Right.", 1.0), ("right", 0.5)]),  # the majority is right, the ranker wrong
        seen("b", [("b", 2.0), ("a", 1.0)]),  # a tie: the ranker's score breaks it
    ]
    s = build_report(obs)["scores"]["overall"]
    assert s["ranker first"]["exact_match"] == pytest.approx(200 / 3)
    assert s["vote"]["exact_match"] == pytest.approx(200 / 3)
    assert "vote" in table(build_report(obs))
