"""The gateway's edge (service/serving/edge): keys, limits, request ids and logs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.build import Components
from service.telemetry.logs import setup_logging
from tests.fakes import FAKE_CONFIG, FakeMember, JoinFuser, LengthRanker, fake_config

AUTH = """
auth:
  api_keys: [k-one, k-two]
  api_keys_env: null
  admin_key_env: TEST_ADMIN_KEY
limits: {max_body_bytes: 2048, max_prompt_chars: 50, max_messages: 3, max_tokens: 64}
"""


def client(extra: str = AUTH) -> TestClient:
    parts = Components(
        members={m.name: m for m in [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]},
        rankers={"length": LengthRanker()},
        fusers={"join": JoinFuser()},
    )
    return TestClient(create_app(fake_config(FAKE_CONFIG + extra), parts=parts), raise_server_exceptions=False)


def test_keys_are_required_when_configured() -> None:
    with client() as c:
        r = c.post("/generate", json={"prompt": "q"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/generate", json={"prompt": "q"}, headers={"Authorization": "Bearer nope"}).status_code == 401
        for key in ("k-one", "k-two"):
            ok = c.post("/generate", json={"prompt": "q"}, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, ok.text
        assert c.get("/v1/models").status_code == 401
        # Open by default: liveness, readiness, metrics, docs.
        for path in ("/health", "/ready", "/metrics", "/openapi.json", "/docs"):
            assert c.get(path).status_code == 200, path


def test_health_and_metrics_can_be_protected() -> None:
    with client(AUTH.replace("admin_key_env: TEST_ADMIN_KEY", "protect_health: true\n  protect_metrics: true")) as c:
        assert c.get("/health").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer k-one"}).status_code == 200


def test_the_operators_port_serves_metrics_and_status_alone() -> None:
    """``serve --ops-port``: the app tells the two listeners apart by the port in the request's scope."""
    parts = Components(
        members={m: FakeMember(m, m * 2) for m in "abc"},
        rankers={"length": LengthRanker()},
        fusers={"join": JoinFuser()},
    )
    app = create_app(fake_config(FAKE_CONFIG), parts=parts, ops_port=9000)
    with TestClient(app, raise_server_exceptions=False) as c:
        api, ops = "http://gw:8000", "http://gw:9000"
        for path in ("/metrics", "/status.json", "/"):
            assert c.get(ops + path).status_code == 200, path
            refused = c.get(api + path)
            assert refused.status_code == 404 and refused.json()["error"]["type"] == "not_found_error", path
            assert "operators' port" in refused.json()["error"]["message"]
        for path in ("/health", "/ready"):
            assert c.get(api + path).status_code == 200 and c.get(ops + path).status_code == 200, path
        assert c.post(api + "/generate", json={"prompt": "q"}).status_code == 200
        for path in ("/generate", "/v1/chat/completions", "/admin/reload"):
            assert c.post(ops + path, json={}).status_code == 404, path
        assert c.get(ops + "/docs").status_code == 404 and c.get(api + "/docs").status_code == 200


def test_no_keys_means_open() -> None:
    with client("auth: {api_keys_env: null}\n") as c:
        assert c.post("/generate", json={"prompt": "q"}).status_code == 200


def test_admin_needs_the_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with client() as c:
        assert c.post("/admin/reload").status_code == 403  # no admin key set: disabled
    monkeypatch.setenv("TEST_ADMIN_KEY", "adm")
    with client() as c:
        assert c.post("/admin/reload", headers={"Authorization": "Bearer k-one"}).status_code == 401


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "x" * 51}, 400, "prompt"),
        ({"messages": [{"role": "user", "content": "x"}] * 4}, 400, "messages"),
        ({"prompt": "q", "max_tokens": 65}, 400, "max_tokens"),
        ({"prompt": "q", "top_k": 4}, 400, "top_k"),
    ],
)
def test_limits(body: dict[str, object], status: int, param: str) -> None:
    with client() as c:
        r = c.post("/generate", json=body, headers={"Authorization": "Bearer k-one"})
        assert r.status_code == status, r.text
        assert r.json()["error"]["param"] == param


def test_body_too_large_is_413() -> None:
    with client() as c:
        r = c.post(
            "/generate",
            content=b'{"prompt": "' + b"x" * 4000 + b'"}',
            headers={"Authorization": "Bearer k-one", "content-type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

        def chunks() -> Iterator[bytes]:
            for _ in range(10):
                yield b"x" * 500

        r = c.post("/generate", content=chunks(), headers={"Authorization": "Bearer k-one"})
        assert r.status_code == 413


def test_request_id_is_taken_or_made_and_logged(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("info", json_logs=True)
    try:
        with client("auth: {api_keys_env: null}\n") as c:
            r = c.post("/generate", json={"prompt": "secret prompt"}, headers={"X-Request-ID": "abc-123"})
            assert r.headers["x-request-id"] == "abc-123"
            made = c.post("/generate", json={"prompt": "q"}, headers={"X-Request-ID": "bad id!"})
            assert len(made.headers["x-request-id"]) == 32
    finally:
        logging.getLogger().handlers[:] = []
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    mine = [entry for entry in lines if entry.get("request_id") == "abc-123"]
    assert {"answered", "request"} <= {entry["message"] for entry in mine}
    access = next(entry for entry in mine if entry["message"] == "request")
    assert access["status"] == 200 and access["path"] == "/generate"
    assert "secret prompt" not in json.dumps(lines), "prompts stay out of the logs unless log_prompts"
