"""Samples: a member that gives n candidates per request (fake members, the real pipeline and app)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.members.base import Completion, MemberRequest
from service.pipeline.pipeline import Pipeline
from service.pipeline.types import Query
from service.serving.app import create_app
from service.serving.build import Components
from service.telemetry.metrics import Metrics
from tests.fakes import FakeMember, JoinFuser, LengthRanker, fake_config, fake_pipeline, sample


class SeededMember(FakeMember):
    """Answers with its seed, so that each sample is told apart."""

    async def generate(self, request: MemberRequest) -> Completion:
        self.requests.append(request)
        return Completion(f"{self.text}{request.seed}", "stop", 5, 2, 1.0)


CONFIG = """
members:
  - {name: solo, endpoint: "http://127.0.0.1:9/v1", model: m, samples: 3, sampling: {temperature: 0.8, seed: 10}}
  - {name: other, endpoint: "http://127.0.0.1:9/v1", model: m}
rankers: {length: {checkpoint: unused}}
fusers: {join: {checkpoint: unused}}
ensembles:
  self-moa: {members: [solo], ranker: length, fuser: join, fuse_top_k: 3, min_candidates: 1}
  mixed: {members: [solo, other], ranker: length, vote: true, fusion: never}
"""


def pipeline() -> tuple[Pipeline, SeededMember]:
    solo = SeededMember("solo", "s")
    p = fake_pipeline(
        fake_config(CONFIG),
        {"solo": solo, "other": FakeMember("other", "s11")},
        {"length": LengthRanker()},
        {"join": JoinFuser()},
        Metrics(),
    )
    return p, solo


async def test_n_samples_are_n_candidates_named_by_number() -> None:
    p, solo = pipeline()
    r = await p.answer(Query(prompt="q", ensemble="self-moa"))
    assert sorted(c.member for c in r.candidates or []) == ["solo#1", "solo#2", "solo#3"]
    assert sorted(c.text for c in r.candidates or []) == ["s10", "s11", "s12"]  # seeds 10, 11, 12: distinct
    assert [q.seed for q in solo.requests] == [10, 11, 12]
    assert r.fused and len(r.selected) == 3 and set(r.usage.members) == {"solo#1", "solo#2", "solo#3"}
    # Metrics count the candidates under their member.
    assert sample(p.metrics, "gateway_member_candidates_total", ensemble="self-moa", member="solo") == 3
    assert sample(p.metrics, "gateway_member_ranked_first_total", ensemble="self-moa", member="solo") == 1
    assert sample(p.metrics, "gateway_member_selected_total", ensemble="self-moa", member="solo") == 3


async def test_a_requests_seed_moves_every_sample_and_samples_vote() -> None:
    p, solo = pipeline()
    r = await p.answer(Query(prompt="q", ensemble="mixed", seed=0))
    assert [q.seed for q in solo.requests] == [0, 1, 2]
    # Candidates s0, s1, s2 from solo and s11 from other: no two agree, the ranker (length) breaks the tie.
    assert r.output == "s11" and [c.votes for c in r.candidates or []] == [1, 1, 1, 1]


async def test_fuse_top_k_is_bounded_by_the_candidates_not_the_members() -> None:
    p, _ = pipeline()
    r = await p.answer(Query(prompt="q", ensemble="self-moa", fuse_top_k=2))
    assert len(r.selected) == 2


def test_samples_at_temperature_zero_are_warned_about() -> None:
    text = CONFIG.replace("temperature: 0.8", "temperature: 0.0")
    parts = Components(
        members={"solo": SeededMember("solo", "s"), "other": FakeMember("other", "o")},
        rankers={"length": LengthRanker()},
        fusers={"join": JoinFuser()},
    )
    with TestClient(create_app(fake_config(text), parts=parts)) as c:
        warnings = c.get("/status.json").json()["warnings"]
    assert any("solo gives 3 samples at temperature 0" in w for w in warnings)
