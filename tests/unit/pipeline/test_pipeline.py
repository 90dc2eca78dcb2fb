import asyncio

import pytest

from service.errors import DeadlineExceeded, ModelError, NoQuorumError, NotFoundError, RequestError
from service.pipeline.pipeline import Pipeline
from service.pipeline.plan import input_text, member_messages
from service.pipeline.types import Message, Query
from service.telemetry.metrics import Metrics
from tests.fakes import THREE_MEMBERS, FakeMember, JoinFuser, LengthRanker, fake_config, fake_pipeline, sample


def pipeline(members: list[FakeMember], ranker: LengthRanker | None = None, fuser: JoinFuser | None = None) -> Pipeline:
    return fake_pipeline(
        fake_config(),
        {m.name: m for m in members},
        {"length": ranker or LengthRanker()},
        {"join": fuser or JoinFuser()},
        Metrics(),
    )


def three(**kw) -> list[FakeMember]:  # type: ignore[no-untyped-def]
    return [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc", **kw)]


async def test_rank_select_fuse() -> None:
    fuser = JoinFuser()
    p = pipeline(three(), fuser=fuser)
    resp = await p.answer(Query(prompt="q", instruction="I: "))
    assert resp.ensemble == "main" and resp.fused
    assert resp.selected == ["b", "c"]  # top_k=2, longest first
    assert resp.output == "bbbb | ccc"
    assert fuser.calls == [("I: ", "q", ["bbbb", "ccc"])]
    assert [c.member for c in resp.candidates or []] == ["b", "c", "a"]
    assert [c.rank for c in resp.candidates or []] == [1, 2, 3]
    assert resp.failed_members == []
    # The completion is the answer the client receives (JoinFuser counts a token per character),
    # the members' own counts are the breakdown.
    u = resp.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (15, len("bbbb | ccc"), 15 + 10)
    assert {m: (c.prompt_tokens, c.completion_tokens) for m, c in u.members.items()} == {
        "a": (5, 1),
        "b": (5, 1),
        "c": (5, 1),
    }
    t = resp.timings_ms
    assert t.total >= t.members + t.rank + t.fuse - 0.01


async def test_ranker_sees_instruction_plus_input() -> None:
    ranker = LengthRanker()
    await pipeline(three(), ranker=ranker).answer(Query(prompt="q", instruction="I: "))
    assert ranker.calls[0] == ("I: q", ["aa", "bbbb", "ccc"])


async def test_request_overrides_sampling() -> None:
    members = three()
    p = pipeline(members)
    await p.answer(Query(prompt="q"))
    await p.answer(Query(prompt="q", max_tokens=3, temperature=0.0, top_p=0.5, seed=9))
    first, second = members[0].requests
    assert (first.max_tokens, first.temperature) == (8, 0.5)
    assert (second.max_tokens, second.temperature, second.top_p, second.seed) == (3, 0.0, 0.5, 9)


async def test_failed_member_is_listed_and_answer_still_comes() -> None:
    resp = await pipeline(three(fail="connect")).answer(Query(prompt="q"))
    assert [f.member for f in resp.failed_members] == ["c"]
    assert "connect" in resp.failed_members[0].error
    assert resp.selected == ["b", "a"]


async def test_no_quorum_is_502() -> None:
    members = [
        FakeMember("a", "x", fail="http_5xx"),
        FakeMember("b", "y", fail="connect"),
        FakeMember("c", "z"),
    ]
    with pytest.raises(NoQuorumError) as e:
        await pipeline(members).answer(Query(prompt="q"))
    assert e.value.status == 502 and not isinstance(e.value, DeadlineExceeded)
    assert "1 of 3 members answered, 2 needed" in e.value.message


async def test_deadline_is_504_and_does_not_wait_for_slow_members() -> None:
    members = [FakeMember("a", "x", delay=30), FakeMember("b", "y", delay=30), FakeMember("c", "z")]
    with pytest.raises(DeadlineExceeded) as e:
        await pipeline(members).answer(Query(prompt="q"))
    assert e.value.status == 504


async def test_slow_member_past_deadline_is_failed_but_quorum_answers() -> None:
    members = [FakeMember("a", "x", delay=30), FakeMember("b", "yy"), FakeMember("c", "z")]
    resp = await pipeline(members).answer(Query(prompt="q"))
    assert [f.member for f in resp.failed_members] == ["a"]
    assert "deadline" in resp.failed_members[0].error and resp.failed_members[0].kind == "deadline"
    assert resp.degraded and resp.degraded_reasons == ["member a: deadline: no answer before the deadline"]


async def test_ranker_failure_degrades_to_the_first_candidate() -> None:
    p = pipeline(three(), ranker=LengthRanker(fail=True))
    resp = await p.answer(Query(prompt="q"))
    assert resp.degraded and not resp.fused
    assert resp.output == "aa" and resp.selected == ["a"]  # arrival order: a answered first
    assert resp.degraded_reasons[0].startswith("ranker_failed: ranker length failed: RuntimeError")
    assert all(c.score is None for c in resp.candidates or [])
    assert sample(p.metrics, "gateway_degraded_total", ensemble="main", reason="ranker_failed") == 1
    assert sample(p.metrics, "gateway_model_errors_total", stage="rank", model="length") == 1


async def test_fuser_failure_degrades_to_the_top_candidate() -> None:
    p = pipeline(three(), fuser=JoinFuser(fail=True))
    resp = await p.answer(Query(prompt="q"))
    assert resp.degraded and not resp.fused
    assert resp.output == "bbbb" and resp.selected == ["b"]  # the ranker's best
    assert resp.degraded_reasons == ["fuser_failed: fuser join failed: RuntimeError: fuser exploded"]
    assert sample(p.metrics, "gateway_degraded_total", ensemble="main", reason="fuser_failed") == 1


async def test_hung_ranker_and_fuser_are_cut_at_the_deadline() -> None:
    p = pipeline(three(), ranker=LengthRanker(delay=30))  # the ensemble's deadline: 1 s
    resp = await asyncio.wait_for(p.answer(Query(prompt="q")), 2)
    assert resp.degraded_reasons == ["ranker_failed: no result before the deadline"] and resp.output == "aa"
    p = pipeline(three(), fuser=JoinFuser(delay=30))
    resp = await asyncio.wait_for(p.answer(Query(prompt="q")), 2)
    assert resp.degraded_reasons == ["fuser_failed: no result before the deadline"] and resp.output == "bbbb"


async def test_streamed_fusion_failing_before_its_first_piece_degrades() -> None:
    p = pipeline(three(), fuser=JoinFuser(fail=True))
    stream = await p.answer_stream(Query(prompt="q"))
    pieces = [x async for x in stream.pieces()]
    assert pieces == ["bbbb"] and stream.answer is not None
    assert stream.answer.degraded and not stream.answer.fused


async def test_streamed_fusion_failing_midway_raises() -> None:
    p = pipeline(three(), fuser=JoinFuser(fail_after=1))
    stream = await p.answer_stream(Query(prompt="q"))
    got: list[str] = []
    with pytest.raises(ModelError, match="mid-stream"):
        async for x in stream.pieces():
            got.append(x)
    assert got == ["bbb"]


async def test_unfused_ensemble_returns_first_candidate() -> None:
    resp = await pipeline(three()).answer(Query(prompt="q", ensemble="plain"))
    assert not resp.fused and resp.output == "aa" and resp.selected == ["a"]


async def test_bad_ensemble_and_top_k() -> None:
    p = pipeline(three())
    with pytest.raises(NotFoundError):
        await p.answer(Query(prompt="q", ensemble="nope"))
    with pytest.raises(RequestError) as e:
        await p.answer(Query(prompt="q", fuse_top_k=4))
    assert e.value.param == "fuse_top_k"


async def test_metrics_count_wins_and_selection() -> None:
    p = pipeline(three())
    await p.answer(Query(prompt="q"))
    reg = p.metrics.registry
    assert reg.get_sample_value("gateway_member_ranked_first_total", {"ensemble": "main", "member": "b"}) == 1
    assert reg.get_sample_value("gateway_member_selected_total", {"ensemble": "main", "member": "c"}) == 1
    assert reg.get_sample_value("gateway_member_selected_total", {"ensemble": "main", "member": "a"}) is None


def test_message_rendering_rule() -> None:
    one = Query(messages=(Message("user", "hi"),))
    assert input_text(one) == "hi"
    conv = Query(messages=(Message("system", "s"), Message("user", "u")))
    assert input_text(conv) == "system: s\nuser: u"
    assert member_messages(conv, "Do X.")[1] == {"role": "user", "content": "Do X.\n\nu"}
    assert member_messages(Query(prompt="p"), "") == [{"role": "user", "content": "p"}]


ADAPTIVE = (
    THREE_MEMBERS
    + """
ensembles:
  main: {members: [a, b, c], ranker: length, fuser: join, fuse_top_k: 2, quorum: 3, fusion: adaptive,
         fusion_margin: MARGIN}
  never: {members: [a, b, c], ranker: length, fuser: join, fusion: never}
"""
)


@pytest.mark.parametrize(("margin", "fused"), [(1.0, False), (1.5, True)])
async def test_adaptive_fusion_skips_when_the_top_candidate_leads(margin: float, fused: bool) -> None:
    from service.telemetry.metrics import Metrics as M

    fuser = JoinFuser()
    p = fake_pipeline(
        fake_config(ADAPTIVE.replace("MARGIN", str(margin))),
        {m.name: m for m in three()},
        {"length": LengthRanker()},
        {"join": fuser},
        M(),
    )
    resp = await p.answer(Query(prompt="q"))  # scores: a 2, b 4, c 3 -> lead 1.0
    assert resp.fused is fused and bool(fuser.calls) is fused and not resp.degraded
    assert resp.output == ("bbbb | ccc" if fused else "bbbb")
    assert sample(p.metrics, "gateway_fusion_skipped_total", ensemble="main", reason="margin") == (0 if fused else 1)
    resp = await p.answer(Query(prompt="q", ensemble="never"))
    assert not resp.fused and sample(p.metrics, "gateway_fusion_skipped_total", ensemble="never", reason="never") == 1


async def test_the_requests_max_tokens_bounds_the_fuser() -> None:
    fuser = JoinFuser()
    p = pipeline(three(), fuser=fuser)
    await p.answer(Query(prompt="q", max_tokens=5))
    await p.answer(Query(prompt="q"))
    stream = await p.answer_stream(Query(prompt="q", max_tokens=7))
    assert [x async for x in stream.pieces()] and fuser.limits == [5, None, 7]


async def test_adaptive_fusion_skips_when_the_members_agree() -> None:
    fuser = JoinFuser()
    agree = [FakeMember("a", "yes"), FakeMember("b", "yes "), FakeMember("c", "yes")]
    p = fake_pipeline(
        fake_config(ADAPTIVE.replace("MARGIN", "100")),
        {m.name: m for m in agree},
        {"length": LengthRanker()},
        {"join": fuser},
        Metrics(),
    )
    resp = await p.answer(Query(prompt="q"))
    assert not resp.fused and not fuser.calls and resp.output.strip() == "yes"
    assert sample(p.metrics, "gateway_fusion_skipped_total", ensemble="main", reason="agreement") == 1
    # The lead over a rival that repeats the first answer does not count: "yes " leads "yes" by 1, "no" by 2.
    mixed = [FakeMember("a", "no"), FakeMember("b", "yes "), FakeMember("c", "yes")]
    p = fake_pipeline(
        fake_config(ADAPTIVE.replace("MARGIN", "1.5")),
        {m.name: m for m in mixed},
        {"length": LengthRanker()},
        {"join": JoinFuser()},
        Metrics(),
    )
    assert not (await p.answer(Query(prompt="q"))).fused


async def test_a_request_may_set_its_own_fusion_policy() -> None:
    p = fake_pipeline(
        fake_config(ADAPTIVE.replace("MARGIN", "0.5")),
        {m.name: m for m in three()},
        {"length": LengthRanker()},
        {"join": JoinFuser()},
        Metrics(),
    )
    assert not (await p.answer(Query(prompt="q"))).fused  # the lead 1.0 passes the margin 0.5
    forced = await p.answer(Query(prompt="q", fusion="always"))
    assert forced.fused and forced.output == "bbbb | ccc"
    never = await p.answer(Query(prompt="q", ensemble="never", fusion="always"))
    assert never.fused
    off = await p.answer(Query(prompt="q", fusion="never"))
    assert not off.fused and off.output == "bbbb"
