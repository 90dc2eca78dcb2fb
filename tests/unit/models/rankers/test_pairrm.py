"""The PairRM batching worker on a tiny PairRM written for the test (no llm-blender loops here;
the parity with llm-blender itself is in tests/integration/test_parity.py)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from service.config import RankerConfig
from service.errors import ModelError
from service.models.checkpoints.tiny import make_pairrm
from service.models.rankers.pairrm import PairRMRanker

SOURCE = "What is the capital of France?"
CANDIDATES = ["Paris is the capital.", "to to to to", "I do not know what", "the river", "capital city of france"]
PROMPTS = [(f"{SOURCE} {i}", [c + " x" * (i % 3) for c in CANDIDATES]) for i in range(8)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("pairrm")
    make_pairrm(out)
    return str(out)


@pytest.fixture
def make_ranker(checkpoint: str) -> Iterator[Any]:
    made: list[PairRMRanker] = []

    def make(**kw: Any) -> PairRMRanker:
        ranker = PairRMRanker("pairrm", RankerConfig.model_validate({"checkpoint": checkpoint, **kw}))
        made.append(ranker)
        return ranker

    yield make
    for r in made:
        r.close()
    assert not any(t.name.startswith("ranker-") for t in threading.enumerate()), "a ranker thread outlived close()"


def one_by_one(ranker: PairRMRanker, source: str, candidates: list[str]) -> np.ndarray:
    """The model's own forward (DebertaV2PairRM.forward), one unpadded pair at a time."""
    import torch

    n = len(candidates)
    m = np.zeros((n, n), dtype=np.float32)
    with torch.inference_mode():
        for i in range(n):
            for j in range(n):
                if i != j:
                    (ids,) = ranker.encode_pairs(source, candidates, [(i, j)])
                    t = torch.tensor([ids])
                    m[i, j] = ranker.model(input_ids=t, attention_mask=torch.ones_like(t)).logits.item()
    return m


LONG = " ".join(["the river runs through the old city and the music plays"] * 30)  # past 128 tokens: log buckets


@pytest.mark.parametrize("packed", [True, False])
def test_batched_matrix_equals_pair_by_pair(make_ranker: Any, packed: bool) -> None:
    ranker = make_ranker(max_batch_pairs=7, packed=packed)
    assert (ranker.packed is not None) == packed
    for source, candidates in [*PROMPTS[:3], (LONG, [LONG[:400], "short", LONG[:900] + " twist"])]:
        batched = ranker.submit(source, candidates, "full").result().matrix()
        np.testing.assert_allclose(batched, one_by_one(ranker, source, candidates), rtol=0, atol=1e-5)


async def test_concurrent_requests_share_forwards_and_get_their_own_scores(make_ranker: Any) -> None:
    alone = make_ranker()
    expected = [alone.rank_sync(s, c) for s, c in PROMPTS]
    assert alone.forwards == len(PROMPTS)  # 20 pairs fit one forward each

    ranker = make_ranker(max_wait_ms=300, max_batch_pairs=64, max_batch_tokens=1_000_000)
    got = await asyncio.gather(*(ranker.rank(s, c) for s, c in PROMPTS))
    assert ranker.forwards == 3  # 160 pairs gathered into forwards of 64, 64, 32
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g.scores, e.scores, rtol=0, atol=1e-5)
        assert g.ranks == e.ranks


def spy_forwards(ranker: PairRMRanker) -> list[tuple[int, int, str]]:
    """Record (pairs, longest pair, thread) of every forward the ranker runs."""
    seen: list[tuple[int, int, str]] = []
    original = ranker.forward

    def spy(items: Any) -> None:
        width = max(ranker.pair_len(job, pair) for job, pair in items)
        seen.append((len(items), width, threading.current_thread().name))
        original(items)

    ranker.forward = spy  # type: ignore[method-assign]
    return seen


def test_forwards_stay_within_the_token_and_pair_bounds(make_ranker: Any) -> None:
    ranker = make_ranker(max_batch_tokens=300, max_batch_pairs=6)
    seen = spy_forwards(ranker)
    ranker.rank_sync(*PROMPTS[2])
    assert seen and all(b * w <= 300 and b <= 6 for b, w, _ in seen)
    assert sum(b for b, _, _ in seen) == 20


def test_copies_are_scored_once_and_tie(make_ranker: Any) -> None:
    ranker = make_ranker()
    ranking = ranker.rank_sync(SOURCE, ["same", "other", "same", "third"])
    assert ranker.pairs_scored == 7  # 3 unique texts: 6 ordered pairs, and "same" against itself
    assert ranking.scores[0] == ranking.scores[2] and ranking.ranks[0] == ranking.ranks[2]


@pytest.mark.parametrize(("scheme", "pairs"), [("tournament", 8), ("bubble", 8)])
def test_cheaper_schemes_score_fewer_pairs(make_ranker: Any, scheme: str, pairs: int) -> None:
    ranker = make_ranker(scheme=scheme)
    ranking = ranker.rank_sync(SOURCE, CANDIDATES)
    assert ranker.pairs_scored == pairs
    assert sorted(ranking.ranks)[0] == 1 and ranking.ranks.count(1) == 1


async def test_model_work_runs_on_the_ranker_thread(make_ranker: Any) -> None:
    ranker = make_ranker()
    seen = spy_forwards(ranker)
    await ranker.rank(SOURCE, CANDIDATES)
    assert [thread for _, _, thread in seen] == ["ranker-pairrm"]


async def test_a_failed_forward_fails_its_requests_and_the_worker_goes_on(make_ranker: Any) -> None:
    ranker = make_ranker()
    original = ranker.forward
    calls = 0

    def flaky(items: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("out of memory")
        original(items)

    ranker.forward = flaky
    with pytest.raises(ModelError, match="out of memory"):
        await ranker.rank(SOURCE, CANDIDATES)
    assert (await ranker.rank(SOURCE, CANDIDATES)).ranks


def test_close_fails_waiting_requests_and_ends_the_thread(make_ranker: Any) -> None:
    ranker = make_ranker()
    entered, release = threading.Event(), threading.Event()
    original = ranker.forward

    def blocked(items: Any) -> None:
        entered.set()
        release.wait(10)
        original(items)

    ranker.forward = blocked
    running = ranker.submit(SOURCE, CANDIDATES)
    assert entered.wait(10)
    waiting = ranker.submit(SOURCE, CANDIDATES[:3])
    cancelled = ranker.submit(SOURCE, CANDIDATES[:2])
    assert cancelled.cancel()
    closer = threading.Thread(target=ranker.close)
    closer.start()
    release.set()
    closer.join(10)
    assert not ranker.running
    assert running.result(0).ranking.ranks  # the forward under way completes
    with pytest.raises(ModelError, match="closed"):
        waiting.result(0)
    with pytest.raises(ModelError, match="closed"):
        ranker.submit(SOURCE, CANDIDATES)


async def test_a_single_candidate_needs_no_model(make_ranker: Any) -> None:
    ranker = make_ranker()
    assert (await ranker.rank(SOURCE, ["only"])).ranks == [1]
    assert ranker.forwards == 0


def test_the_worker_runs_with_its_own_thread_budget(make_ranker: Any) -> None:
    import torch

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    ranker = make_ranker(threads=want)
    seen: list[int] = []
    forward = ranker.forward

    def spy(items: Any) -> None:
        seen.append(torch.get_num_threads())  # on the ranker's worker thread
        forward(items)

    ranker.forward = spy
    ranker.rank_sync("source", ["a", "b"])
    assert seen and set(seen) == {want}
    assert torch.get_num_threads() == before  # the caller's budget is untouched
