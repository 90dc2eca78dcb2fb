"""Per-key limits through the app (fake members, limits counted in process): named keys, 429 in the
OpenAI shape with Retry-After, one key's limit never touching another's, member tokens charged,
metrics by key name, the status page, hot reload, and bad configurations refused by field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import parse_config
from service.serving.app import create_app
from service.serving.build import Components
from tests.fakes import FakeMember, JoinFuser, LengthRanker, sample

CONFIG = """
auth:
  api_keys: [plain-key]
  api_keys_env: null
  admin_key_env: TEST_ADMIN
  keys:
    team-a: {{env: TEST_KEY_A}}
    team-b: {{key: key-of-b}}
members:
  - {{name: a, endpoint: "http://127.0.0.1:9/v1", model: m}}
  - {{name: b, endpoint: "http://127.0.0.1:9/v1", model: m}}
  - {{name: slow, endpoint: "http://127.0.0.1:9/v1", model: m}}
rankers: {{length: {{checkpoint: unused}}}}
fusers: {{join: {{checkpoint: unused}}}}
ensembles:
  main: {{members: [a, b], ranker: length}}
  slow: {{members: [slow]}}
limits:
{limits}
"""
LIMITS = """
  per_key: {requests_per_minute: 100}
  keys:
    team-a: {requests_per_minute: 3}
    team-b: {tokens_per_minute: 20, concurrent: 1}
"""
A = {"Authorization": "Bearer secret-of-a"}
B = {"Authorization": "Bearer key-of-b"}
PLAIN = {"Authorization": "Bearer plain-key"}
ADMIN = {"Authorization": "Bearer admin"}


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEY_A", "secret-of-a")
    monkeypatch.setenv("TEST_ADMIN", "admin")


def parts() -> Components:
    members = [FakeMember("a", "aa"), FakeMember("b", "bb bb"), FakeMember("slow", "zz", delay=0.3)]
    return Components(
        members={m.name: m for m in members}, rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()}
    )


def client(tmp_path: Path, limits: str = LIMITS) -> TestClient:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG.format(limits=limits))
    return TestClient(create_app(parse_config(path.read_text()), parts=parts(), config_path=path))


def test_a_key_over_its_requests_per_minute_gets_429_and_others_do_not(tmp_path: Path) -> None:
    with client(tmp_path) as c:
        for _ in range(3):
            assert c.post("/generate", json={"prompt": "q"}, headers=A).status_code == 200
        chat = {"model": "main", "messages": [{"role": "user", "content": "q"}]}
        r = c.post("/v1/chat/completions", json=chat, headers=A)
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        assert "team-a" in err["message"] and "3 requests per minute" in err["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 20  # one every 20 s: the next fits within 20 s
        # Other keys are untouched; an unnamed key falls under per_key.
        assert c.post("/generate", json={"prompt": "q"}, headers=B).status_code == 200
        assert c.post("/generate", json={"prompt": "q"}, headers=PLAIN).status_code == 200
        metrics = c.app.state.metrics  # type: ignore[attr-defined]
        assert sample(metrics, "gateway_key_rate_limited_total", key="team-a", limit="requests_per_minute") == 1
        assert sample(metrics, "gateway_key_requests_total", key="team-a") == 3
        assert sample(metrics, "gateway_key_requests_total", key="unnamed") == 1
        text = c.get("/metrics").text
        assert "secret-of-a" not in text and "key-of-b" not in text and "plain-key" not in text
        status = c.get("/status.json").json()["limits"]
        assert status["store"] == {"kind": "process"}
        assert status["keys"]["team-a"]["requests"] == 3 and status["keys"]["team-a"]["limited"] == {
            "requests_per_minute": 1
        }
        assert status["keys"]["team-a"]["limits"] == {"requests_per_minute": 3}
        # The store keeps the key's name, not a digest.
        assert c.app.state.runtime.status.recent  # type: ignore[attr-defined]


def test_member_tokens_are_charged_to_the_key(tmp_path: Path) -> None:
    with client(tmp_path) as c:
        r = c.post("/generate", json={"prompt": "q", "return_candidates": True}, headers=B)
        assert r.status_code == 200
        spent = sum(u["prompt_tokens"] + u["completion_tokens"] for u in r.json()["usage"]["members"].values())
        assert spent == (5 + 1) + (5 + 2)  # two fake members: 5 prompt tokens each, 1 and 2 words
        assert c.post("/generate", json={"prompt": "q"}, headers=B).status_code == 200  # 13 of 20 spent
        r = c.post("/generate", json={"prompt": "q"}, headers=B)  # 26 spent: over a minute's
        assert r.status_code == 429 and "member tokens per minute" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        metrics = c.app.state.metrics  # type: ignore[attr-defined]
        assert sample(metrics, "gateway_key_member_tokens_total", key="team-b") == 26


async def test_concurrent_requests_of_a_key(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG.format(limits=LIMITS))
    app = create_app(parse_config(path.read_text()), parts=parts(), config_path=path)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            body = {"prompt": "q", "ensemble": "slow"}
            first, second, other = await asyncio.gather(
                c.post("/generate", json=body, headers=B),
                c.post("/generate", json=body, headers=B),
                c.post("/generate", json=body, headers=A),
            )
            codes = sorted([first.status_code, second.status_code])
            assert codes == [200, 429] and other.status_code == 200
            refused = first if first.status_code == 429 else second
            assert "1 concurrent requests" in refused.json()["error"]["message"]
            # The slot is given back when the answer is done (the finish runs off the request's path).
            await asyncio.sleep(0.05)
            assert (await c.post("/generate", json=body, headers=B)).status_code == 200
            await asyncio.sleep(0.05)
            assert app.state.metrics.registry.get_sample_value("gateway_key_requests_in_flight", {"key": "team-b"}) == 0


def test_limits_hot_reload(tmp_path: Path) -> None:
    with client(tmp_path) as c:
        for _ in range(3):
            c.post("/generate", json={"prompt": "q"}, headers=A)
        assert c.post("/generate", json={"prompt": "q"}, headers=A).status_code == 429
        path = tmp_path / "gw.yaml"
        path.write_text(CONFIG.format(limits=LIMITS.replace("requests_per_minute: 3", "requests_per_minute: 600")))
        assert c.post("/admin/reload", headers=ADMIN).status_code == 200
        assert c.post("/generate", json={"prompt": "q"}, headers=A).status_code == 200
        # A reload naming a key that does not exist is refused with the field; the old limits serve.
        path.write_text(CONFIG.format(limits=LIMITS + "    team-z: {concurrent: 1}\n"))
        r = c.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 400 and "limits.keys.team-z" in r.text
        assert c.post("/generate", json={"prompt": "q"}, headers=A).status_code == 200


@pytest.mark.parametrize(
    ("limits", "says"),
    [
        ("  keys: {nobody: {concurrent: 1}}", "limits.keys.nobody"),
        ("  per_key: {requests_per_minute: 0}", "requests_per_minute"),
        ("  store: http://127.0.0.1:6379", "limits.store"),
        ("  per_key: {rpm: 5}", "rpm"),
    ],
)
def test_bad_limits_are_refused_by_field(limits: str, says: str) -> None:
    with pytest.raises(Exception, match=says):
        parse_config(CONFIG.format(limits=limits))


def test_a_named_key_without_its_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_KEY_A")
    with pytest.raises(Exception, match="TEST_KEY_A"):
        parse_config(CONFIG.format(limits=LIMITS))


def test_redis_unreachable_counts_in_process_and_says_so(tmp_path: Path) -> None:
    # Nothing listens on port 1: every Redis call fails at once; the gateway serves on its own counts.
    with client(tmp_path, LIMITS + "  store: redis://127.0.0.1:1/0\n  store_retry_s: 60\n") as c:
        for _ in range(3):
            assert c.post("/generate", json={"prompt": "q"}, headers=A).status_code == 200
        assert c.post("/generate", json={"prompt": "q"}, headers=A).status_code == 429  # still limited
        status = c.get("/status.json").json()["limits"]["store"]
        assert status["kind"] == "redis" and status["shared"] is False and status["error"]
        metrics = c.app.state.metrics  # type: ignore[attr-defined]
        assert sample(metrics, "gateway_limits_store_up") == 0
        assert sample(metrics, "gateway_limits_store_errors_total") == 1  # tried once, then not for 60 s
