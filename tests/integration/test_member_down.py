"""A member that is down is listed in failed_members and the answer still comes (real parts)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.config import FuserConfig, parse_config
from service.ops.launcher import free_port
from service.serving.app import create_app
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


def test_dead_member_degrades_the_answer(gateway: Gateway) -> None:
    base_a = gateway.server_urls["base-a"]
    base_b = gateway.server_urls["base-b"]
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens here
    ranker = gateway.config.local_ranker("pairrm").checkpoint
    genfuser = gateway.config.fusers["genfuser"]
    assert isinstance(genfuser, FuserConfig)
    fuser = genfuser.checkpoint
    config = parse_config(
        f"""
members:
  - {{name: a, endpoint: "{base_a}", model: tiny-llama-a, sampling: {{max_tokens: 8}}}}
  - {{name: ghost, endpoint: "{dead}", model: tiny-llama-a, timeout_s: 5}}
  - {{name: b, endpoint: "{base_b}", model: tiny-llama-b, sampling: {{max_tokens: 8}}}}
rankers: {{pairrm: {{checkpoint: "{ranker}"}}}}
fusers: {{genfuser: {{checkpoint: "{fuser}"}}}}
ensembles:
  e: {{members: [a, ghost, b], ranker: pairrm, fuser: genfuser, min_candidates: 2}}
  strict: {{members: [a, ghost, b], ranker: pairrm, min_candidates: 3}}
  gone: {{members: [ghost], ranker: pairrm}}
"""
    )
    with TestClient(create_app(config)) as client:
        resp = client.post("/generate", json={"prompt": "hello", "return_candidates": True})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert [f["member"] for f in body["failed_members"]] == ["ghost"]
        assert "connect" in body["failed_members"][0]["error"]
        assert sorted(c["member"] for c in body["candidates"]) == ["a", "b"]
        assert body["fused"] and body["selected"] and body["output"]

        strict = client.post("/generate", json={"prompt": "hello", "ensemble": "strict"})
        assert strict.status_code == 502
        assert strict.json()["error"]["type"] == "no_quorum"
        # Not one member reachable: 503 in the OpenAI shape, while the gateway itself stays Ready.
        gone = client.post(
            "/v1/chat/completions", json={"model": "gone", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert gone.status_code == 503, gone.text
        assert (
            gone.json()["error"]["type"] == "service_unavailable"
            and gone.json()["error"]["code"] == "members_unavailable"
        )
        assert client.get("/ready", params={"scope": "gateway"}).status_code == 200

        ready = client.get("/ready").json()
        assert ready["members"]["ghost"]["up"] is False
        assert ready["ensembles"]["e"]["ready"] is True and ready["ensembles"]["strict"]["ready"] is False
        metrics = client.get("/metrics").text
        assert 'gateway_member_errors_total{error_type="connect",member="ghost"} 3.0' in metrics
