"""The demo's `vote` ensemble on real members and the trained PairRM: the majority answer wins,
PairRM's score breaks ties among equally voted answers, and /metrics counts the outcome."""

from __future__ import annotations

import httpx
import pytest

from service.pipeline.voting import normalize_answer
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "prompt", ["What is the capital of Zorvania?", "Reverse the word planet.", "What is 37 plus 48?"]
)
def test_vote_picks_the_most_voted_answer_and_ties_go_to_the_ranker(demo: Gateway, prompt: str) -> None:
    r = httpx.post(
        f"{demo.url}/generate", json={"prompt": prompt, "ensemble": "vote", "return_candidates": True}, timeout=120
    ).json()
    cands = r["candidates"]
    assert len(cands) == 5 and not r["fused"]
    tally: dict[str, int] = {}
    for c in cands:
        tally[normalize_answer(c["text"])] = tally.get(normalize_answer(c["text"]), 0) + 1
    assert [c["votes"] for c in cands] == [tally[normalize_answer(c["text"])] for c in cands]
    top = max(tally.values())
    assert cands[0]["votes"] == top and r["output"] == cands[0]["text"]
    tied = [c for c in cands if c["votes"] == top]
    assert cands[0]["score"] == max(c["score"] for c in tied)  # PairRM breaks the tie
    assert [c["votes"] for c in cands] == sorted((c["votes"] for c in cands), reverse=True)


def test_vote_outcomes_are_counted(demo: Gateway) -> None:
    httpx.post(
        f"{demo.url}/generate", json={"prompt": "What is the capital of Zorvania?", "ensemble": "vote"}, timeout=120
    )
    text = httpx.get(f"{demo.url}/metrics", timeout=10).text
    counted = [line for line in text.splitlines() if line.startswith('gateway_votes_total{ensemble="vote"')]
    assert counted and sum(float(line.rsplit(" ", 1)[1]) for line in counted) >= 1


def test_samples_are_candidates_named_by_number_and_counted_under_their_member(demo: Gateway) -> None:
    before = httpx.get(f"{demo.url}/metrics", timeout=10).text
    r = httpx.post(
        f"{demo.url}/generate",
        json={"prompt": "What is 37 plus 48?", "ensemble": "self-moa", "return_candidates": True, "temperature": 2.0},
        timeout=120,
    ).json()
    names = sorted(c["member"] for c in r["candidates"])
    assert names == ["lora-sort-samples#1", "lora-sort-samples#2", "lora-sort-samples#3"]
    # The sorter asked to add (not its skill), at temperature 2 with seeds 7, 8, 9: its samples differ.
    # (At the demo's temperature 1 it is sure of its letters and the three samples agree.)
    assert len({c["text"] for c in r["candidates"]}) > 1, r["candidates"]
    assert r["fused"] and len(r["selected"]) == 3

    def counted(text: str) -> float:
        key = 'gateway_member_candidates_total{ensemble="self-moa",member="lora-sort-samples"}'
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key))

    assert counted(httpx.get(f"{demo.url}/metrics", timeout=10).text) - counted(before) == 3
