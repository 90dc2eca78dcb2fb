"""The model tier (service/serving/tier.py) and the gateway's clients of it (service/models/remote.py),
in process through httpx's ASGI transport, on the tiny random PairRM and GenFuser: remote scores
equal the in-process ones, fused texts (whole and streamed) are identical, errors are the tier's,
a tier that fails or is gone is a ``ModelError`` (what the pipeline degrades on) and opens the
breaker, keys are checked, metrics count the calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.config import BreakerConfig, FuserConfig, RankerConfig, RemoteModelConfig, RetryConfig, TierConfig
from service.errors import ConfigError, ModelError
from service.models.checkpoints.tiny import make_genfuser, make_pairrm
from service.models.fusers.genfuser import GenFuser
from service.models.rankers.pairrm import PairRMRanker
from service.models.remote import RemoteFuser, RemoteRanker
from service.serving.tier import Models, create_tier_app

SOURCE = "What is the capital of France?"
CANDIDATES = ["Paris is the capital.", "to to to to", "I do not know what", "the river", "capital city of france"]
RETRY = RetryConfig(attempts=2, backoff_s=0.0)
BREAKER = BreakerConfig(failures=2, cooldown_s=30)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PairRMRanker, GenFuser]]:
    pr, gf = tmp_path_factory.mktemp("pairrm"), tmp_path_factory.mktemp("genfuser")
    make_pairrm(pr)
    make_genfuser(gf)
    ranker = PairRMRanker("pairrm", RankerConfig(checkpoint=str(pr)))
    fuser = GenFuser("genfuser", FuserConfig(checkpoint=str(gf), max_new_tokens=12))
    yield ranker, fuser
    ranker.close()
    fuser.close()


def tier_config(keys_env: str | None = None) -> TierConfig:
    return TierConfig(
        rankers={"pairrm": RankerConfig(checkpoint="unused")},
        fusers={"genfuser": FuserConfig(checkpoint="unused")},
        api_keys_env=keys_env,
    )


def remote(kind: str, url: str = "http://tier", **kw: Any) -> RemoteModelConfig:
    return RemoteModelConfig(endpoint=url, model=kind, **kw)


async def with_tier(
    local: tuple[PairRMRanker, GenFuser], keys_env: str | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Models]]:
    models = Models()
    models.rankers["pairrm"], models.fusers["genfuser"] = local
    app = create_tier_app(tier_config(keys_env), models=models)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        yield client, models


async def test_remote_scores_and_texts_are_the_in_process_ones(local: tuple[PairRMRanker, GenFuser]) -> None:
    ranker, fuser = local
    async for client, models in with_tier(local):
        rr = RemoteRanker("r", remote("pairrm"), client, RETRY, BREAKER)
        rf = RemoteFuser("f", remote("genfuser"), client, RETRY, BREAKER)
        for i in range(3):
            source, cands = f"{SOURCE} {i}", [c + " x" * i for c in CANDIDATES]
            there, here = await rr.rank(source, cands), await ranker.rank(source, cands)
            assert there.scores == here.scores and there.ranks == here.ranks  # exact: JSON keeps a float
            top = [cands[j] for j in here.order()[:3]]
            fused = await fuser.fuse("", source, top)
            assert await rf.fuse("", source, top) == fused
            assert "".join([p async for p in rf.fuse_stream("", source, top)]) == fused
            assert await rf.fuse("", source, top, max_new_tokens=3) == await fuser.fuse("", source, top, 3)
        assert await rf.count_tokens("Paris is the capital") == await fuser.count_tokens("Paris is the capital")
        sample = models.registry.get_sample_value
        assert sample("tier_requests_total", {"model": "pairrm", "op": "rank", "status": "200"}) == 3
        assert sample("tier_requests_total", {"model": "genfuser", "op": "fuse_stream", "status": "200"}) == 3
        assert sample("tier_queue_depth", {"model": "pairrm"}) == 0
        assert (sample("tier_ranker_pairs_total", {"model": "pairrm"}) or 0) >= 3 * 20


async def test_the_tiers_errors_reach_the_gateway_as_model_errors(local: tuple[PairRMRanker, GenFuser]) -> None:
    async for client, _ in with_tier(local):
        unknown = RemoteRanker("r", remote("nope"), client, RETRY, BREAKER)
        with pytest.raises(ModelError, match="no ranker 'nope'"):
            await unknown.rank(SOURCE, CANDIDATES)
        resp = await client.post("http://tier/v1/rank", json={"model": "pairrm", "source": "x", "candidates": []})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "candidates"
        assert unknown.breaker.state == "closed"  # a request the tier refuses is not the tier failing


async def test_a_tier_that_is_gone_is_a_model_error_and_opens_the_breaker() -> None:
    async with httpx.AsyncClient() as client:
        rr = RemoteRanker("r", remote("pairrm", "http://127.0.0.1:1", timeout_s=2), client, RETRY, BREAKER)
        for _ in range(2):
            with pytest.raises(ModelError, match="connect"):
                await rr.rank(SOURCE, CANDIDATES)
        with pytest.raises(ModelError, match="circuit_open"):
            await rr.rank(SOURCE, CANDIDATES)
        rf = RemoteFuser("f", remote("genfuser", "http://127.0.0.1:1", timeout_s=2), client, RETRY, BREAKER)
        with pytest.raises(ModelError, match="connect"):
            async for _ in rf.fuse_stream("", SOURCE, CANDIDATES[:2]):
                pass


async def test_a_5xx_is_retried_once_then_fails(local: tuple[PairRMRanker, GenFuser]) -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return httpx.Response(200, json={"scores": [1.0, 0.0], "ranks": [1, 2]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        rr = RemoteRanker("r", remote("pairrm"), client, RETRY, BREAKER)
        assert (await rr.rank(SOURCE, CANDIDATES[:2])).ranks == [1, 2] and len(calls) == 2
        bad = RemoteRanker("r", remote("pairrm"), client, RETRY, BREAKER)
        with pytest.raises(ModelError, match="invalid_response"):
            await bad.rank(SOURCE, CANDIDATES[:3])  # two scores for three candidates


async def test_keys(local: tuple[PairRMRanker, GenFuser], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TIER_KEYS", "tier-key-1,tier-key-2")
    monkeypatch.setenv("TEST_TIER_KEY", "tier-key-2")
    async for client, _ in with_tier(local, "TEST_TIER_KEYS"):
        without = RemoteRanker("r", remote("pairrm"), client, RETRY, BREAKER)
        with pytest.raises(ModelError, match="API key"):
            await without.rank(SOURCE, CANDIDATES)
        keyed = RemoteRanker("r", remote("pairrm", api_key_env="TEST_TIER_KEY"), client, RETRY, BREAKER)
        assert len((await keyed.rank(SOURCE, CANDIDATES)).scores) == len(CANDIDATES)
        assert (await client.get("http://tier/health")).status_code == 200  # probes need no key
        assert (await client.get("http://tier/metrics")).status_code == 200


def test_concurrent_calls_share_the_rankers_batches(local: tuple[PairRMRanker, GenFuser]) -> None:
    ranker, _ = local

    async def run() -> None:
        async for client, _ in with_tier(local):
            rr = RemoteRanker("r", remote("pairrm"), client, RETRY, BREAKER)
            before = ranker.forwards
            results = await asyncio.gather(*(rr.rank(f"{SOURCE} {i}", CANDIDATES) for i in range(8)))
            assert all(len(r.scores) == len(CANDIDATES) for r in results)
            assert ranker.forwards - before < 8  # eight callers, fewer forward passes: they were batched

    asyncio.run(run())


def test_tier_config_refuses_an_empty_tier() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        TierConfig()


def test_a_ranker_named_by_endpoint_is_remote(tmp_path: Path) -> None:
    from service.config import parse_config

    config = parse_config(
        """
members: [{name: a, endpoint: "http://127.0.0.1:9/v1", model: m}]
rankers: {pairrm: {endpoint: "http://tier:8001", timeout_s: 5}}
fusers: {genfuser: {endpoint: "http://tier:8001", model: gf}}
ensembles: {main: {members: [a], ranker: pairrm, fuser: genfuser}}
"""
    )
    assert isinstance(config.rankers["pairrm"], RemoteModelConfig)
    fuser = config.fusers["genfuser"]
    assert isinstance(fuser, RemoteModelConfig) and fuser.model == "gf"
    with pytest.raises(ConfigError, match=r"rankers\.pairrm: .*endpoint"):
        parse_config(
            """
members: [{name: a, endpoint: "http://127.0.0.1:9/v1", model: m}]
rankers: {pairrm: {endpoint: "tier:8001"}}
ensembles: {main: {members: [a], ranker: pairrm}}
"""
        )


async def test_the_tier_continues_the_gateways_trace(local: tuple[PairRMRanker, GenFuser]) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.telemetry.tracing import Tracing

    gateway_spans, tier_spans = InMemorySpanExporter(), InMemorySpanExporter()
    gateway = Tracing.with_processor(SimpleSpanProcessor(gateway_spans))
    models = Models()
    models.rankers["pairrm"], models.fusers["genfuser"] = local
    app = create_tier_app(tier_config(), models=models, tracing=Tracing.with_processor(SimpleSpanProcessor(tier_spans)))
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        rr = RemoteRanker("r", remote("pairrm"), client, RETRY, BREAKER)
        with gateway.request("POST /generate", {}, {}) as span:
            await rr.rank(SOURCE, CANDIDATES)
    (request,) = [s for s in tier_spans.get_finished_spans() if s.name == "POST /v1/rank"]
    assert request.context.trace_id == span.get_span_context().trace_id
    assert request.parent is not None and request.parent.span_id == span.get_span_context().span_id
    (rank,) = [s for s in tier_spans.get_finished_spans() if s.name == "rank"]
    assert rank.parent is not None and rank.parent.span_id == request.context.span_id
