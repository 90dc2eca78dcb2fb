"""The fusion stage: the policy that decides whether to fuse, and the one fallback for a fuser
that fails, the same whether the answer is whole or streamed."""

from __future__ import annotations

import pytest

from service.members.base import Completion
from service.pipeline.fuse import Fusion, skip_reason
from service.pipeline.gather import Ballot
from service.pipeline.plan import plan
from service.pipeline.types import Query
from service.telemetry.metrics import Metrics
from tests.fakes import JoinFuser, fake_config, sample


def ballot(texts: list[str], scores: list[float | None]) -> Ballot:
    b = Ballot(
        keys=[f"m{i}" for i in range(len(texts))],
        completions=[Completion(t, "length", 1, 1, 1.0) for t in texts],
        failed=[],
        t_members=0.0,
    )
    b.scores = scores
    b.order = sorted(range(len(texts)), key=lambda i: -(scores[i] or 0.0))
    return b


@pytest.mark.parametrize(
    ("fusion", "texts", "scores", "reason"),
    [
        ("always", ["a", "a"], [1.0, 1.0], None),
        ("never", ["a", "b"], [1.0, 0.0], "never"),
        ("adaptive", ["a"], [1.0], "single_candidate"),
        ("adaptive", ["a", "a "], [2.0, 1.0], "agreement"),
        ("adaptive", ["a", "b"], [2.0, 0.5], "margin"),  # the lead 1.5 reaches the margin 1.0
        ("adaptive", ["a", "b"], [2.0, 1.5], None),
        ("adaptive", ["a", "a", "b"], [2.0, 1.9, 0.5], "margin"),  # a copy of the first is no rival
        ("adaptive", ["a", "b"], [None, None], None),  # no scores: no lead to judge by
    ],
)
def test_policy(fusion: str, texts: list[str], scores: list[float | None], reason: str | None) -> None:
    p = plan(fake_config(), Query(prompt="q", fusion=fusion))  # type: ignore[arg-type]
    assert skip_reason(p, ballot(texts, scores)) == reason


async def test_a_failing_fuser_falls_back_alike_whole_and_streamed() -> None:
    metrics = Metrics()
    p = plan(fake_config(), Query(prompt="q"))
    whole = Fusion(p, ballot(["aa", "bbbb", "ccc"], [2.0, 4.0, 3.0]), JoinFuser(fail=True), metrics)
    streamed = Fusion(p, ballot(["aa", "bbbb", "ccc"], [2.0, 4.0, 3.0]), JoinFuser(fail=True), metrics)
    assert whole.selected == [1, 2]  # fuse_top_k 2, best first
    assert await whole.text() == "bbbb"
    assert [piece async for piece in streamed.pieces()] == ["bbbb"]
    for f in (whole, streamed):
        assert f.fuser is None and f.selected == [1] and f.finish_reason == "length"  # the top candidate's own
        assert f.ballot.degraded == ["fuser_failed: fuser join failed: RuntimeError: fuser exploded"]
    assert sample(metrics, "gateway_model_errors_total", stage="fuse", model="join") == 2
    assert sample(metrics, "gateway_degraded_total", ensemble="main", reason="fuser_failed") == 2
