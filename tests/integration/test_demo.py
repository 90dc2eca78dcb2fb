"""The demo ensemble over real HTTP: real vLLM-CPU members, real PairRM, real GenFuser."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from service.config import FuserConfig
from tests.integration.conftest import Gateway
from tests.reference import reference_fuse, reference_rank

pytestmark = pytest.mark.integration


def generate(gw: Gateway, **body: Any) -> httpx.Response:
    return httpx.post(f"{gw.url}/generate", json=body, timeout=120)


def test_generate_contract_and_ranks(gateway: Gateway) -> None:
    resp = generate(gateway, prompt="What is the capital of France?", return_candidates=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    members = gateway.config.ensembles["demo"].members
    assert body["ensemble"] == "demo" and body["fused"] is True
    assert body["failed_members"] == []
    cands = body["candidates"]
    assert sorted(c["member"] for c in cands) == sorted(members)
    for c in cands:
        assert isinstance(c["text"], str) and c["latency_ms"] > 0
        assert c["finish_reason"] in {"stop", "length"}
        better = sum(1 for o in cands if o["score"] > c["score"])
        assert c["rank"] == better + 1, "rank must follow score"
    assert [c["rank"] for c in cands] == sorted(c["rank"] for c in cands), "candidates come best first"
    assert body["selected"] == [c["member"] for c in cands[:3]]
    assert body["usage"]["completion_tokens"] > 0
    t = body["timings_ms"]
    assert t["total"] >= t["members"] > 0 and t["rank"] > 0 and t["fuse"] > 0


def test_scores_and_fusion_equal_llm_blender(gateway: Gateway, tiny_models: Any) -> None:
    """The response's scores and fused text equal llm-blender's on the same candidate texts."""
    instruction = "Answer briefly. "
    prompt = "Name a river in Paris."
    resp = generate(gateway, prompt=prompt, instruction=instruction, return_candidates=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    cands = body["candidates"]
    texts = [c["text"] for c in cands]
    ranker = gateway.config.local_ranker("pairrm").checkpoint
    ref_scores, ref_ranks = reference_rank(ranker, instruction + prompt, texts, "max_logits")
    for c, s, r in zip(cands, ref_scores, ref_ranks, strict=True):
        assert abs(c["score"] - s) <= 1e-4, (c, s)
        assert c["rank"] == r
    top = [c["text"] for c in cands[:3]]
    genfuser = gateway.config.fusers["genfuser"]
    assert isinstance(genfuser, FuserConfig)
    fuser = genfuser.checkpoint
    assert body["output"] == reference_fuse(fuser, instruction, prompt, top)


def test_greedy_member_equals_direct_vllm_call(gateway: Gateway) -> None:
    prompt = "Tell me about the sea."
    resp = generate(gateway, prompt=prompt, temperature=0.0, max_tokens=12, return_candidates=True)
    assert resp.status_code == 200, resp.text
    by_member = {c["member"]: c["text"] for c in resp.json()["candidates"]}
    for name in ("llama-a", "llama-b"):
        member = gateway.config.member(name)
        assert member.server is not None
        direct = httpx.post(
            f"{gateway.server_urls[member.server]}/chat/completions",
            json={
                "model": member.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 12,
                "temperature": 0.0,
                "top_p": member.sampling.top_p,
            },
            timeout=60,
        ).json()
        assert by_member[name] == direct["choices"][0]["message"]["content"]
    assert by_member["llama-a"] != by_member["llama-b"], "two base checkpoints give different text"


def test_messages_and_rank_only_ensemble(gateway: Gateway) -> None:
    resp = generate(
        gateway,
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello?"}],
        ensemble="rank-only",
        return_candidates=True,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["fused"] is False
    assert body["output"] == body["candidates"][0]["text"]
    assert body["selected"] == [body["candidates"][0]["member"]]


def test_curl_quickstart_body(gateway: Gateway) -> None:
    """The README's `curl -d '{...}'` sends form-encoded content type; it must still work."""
    resp = httpx.post(
        f"{gateway.url}/generate",
        content=b'{"prompt": "What is the capital of France?", "return_candidates": true}',
        headers={"content-type": "application/x-www-form-urlencoded"},
        timeout=120,
    )
    assert resp.status_code == 200, resp.text
    assert len(resp.json()["candidates"]) == 5


def test_errors_in_openai_shape(gateway: Gateway) -> None:
    cases = [
        (httpx.post(f"{gateway.url}/generate", content=b"{oops", timeout=30), 400),
        (generate(gateway, prompt=["x"]), 400),
        (generate(gateway, prompt="x", ensemble="missing"), 404),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_ready_and_metrics(gateway: Gateway) -> None:
    generate(gateway, prompt="warm")
    ready = httpx.get(f"{gateway.url}/ready", timeout=10)
    assert ready.status_code == 200
    assert all(m["up"] for m in ready.json()["members"].values())
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    assert 'gateway_requests_total{ensemble="demo",status="200"}' in text
    for member in gateway.config.ensembles["demo"].members:
        assert f'gateway_member_latency_seconds_count{{member="{member}"}}' in text
        assert f'gateway_member_candidates_total{{ensemble="demo",member="{member}"}}' in text
    for name in (
        'gateway_ranker_latency_seconds_count{ranker="pairrm"}',
        'gateway_fuser_latency_seconds_count{fuser="genfuser"}',
        "gateway_member_ranked_first_total",
        "gateway_member_selected_total",
        "gateway_request_latency_seconds_bucket",
    ):
        assert name in text, name
