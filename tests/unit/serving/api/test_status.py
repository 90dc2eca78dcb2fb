"""/status.json: members with health and shares, recent answers, and the start-up warnings."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.build import Components
from service.serving.probes import is_loopback
from tests.fakes import FAKE_CONFIG, FakeMember, JoinFuser, LengthRanker, fake_config


def client(host: str | None, extra: str = "") -> TestClient:
    parts = Components(
        members={m.name: m for m in [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]},
        rankers={"length": LengthRanker()},
        fusers={"join": JoinFuser()},
    )
    return TestClient(create_app(fake_config(FAKE_CONFIG + extra), parts=parts, host=host))


def test_status_lists_members_and_the_last_answer() -> None:
    with client("127.0.0.1") as c:
        assert c.post("/generate", json={"prompt": "q"}).status_code == 200
        s = c.get("/status.json").json()
    main = s["ensembles"]["main"]
    assert [m["name"] for m in main["members"]] == ["a", "b", "c"]
    assert main["members"][1]["win_rate"] == 1.0 and main["ranker"] == "length"
    assert s["answered"] == 1 and s["recent"][0]["ranking"][0]["member"] == "b"
    assert s["warnings"] == [] and s["auth"] == {"keys_required": False}


def test_an_open_gateway_on_a_public_address_is_warned_about() -> None:
    with client("0.0.0.0") as c:
        s = c.get("/status.json").json()
        assert len(s["warnings"]) == 1 and "no client API key" in s["warnings"][0]
    with client("0.0.0.0", "auth: {api_keys: [k]}\n") as c:
        assert c.get("/status.json", headers={"Authorization": "Bearer k"}).json()["warnings"] == []


def test_loopback_addresses() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "::", "example.org"))
