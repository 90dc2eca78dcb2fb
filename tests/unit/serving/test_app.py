"""The HTTP contract, with fake parts behind the real app."""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.build import Components
from tests.fakes import FAKE_CONFIG, FakeMember, JoinFuser, LengthRanker, fake_config


def make_client(members: list[FakeMember]) -> TestClient:
    parts = Components(
        members={m.name: m for m in members},
        rankers={"length": LengthRanker()},
        fusers={"join": JoinFuser()},
    )
    return TestClient(create_app(fake_config(), parts=parts), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client([FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]) as c:
        yield c


def assert_openai_error(resp: Any, status: int, type_: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if type_:
        assert body["error"]["type"] == type_
    return body["error"]  # type: ignore[no-any-return]


def test_generate_contract(client: TestClient) -> None:
    resp = client.post("/generate", json={"prompt": "q", "return_candidates": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {
        "id",
        "ensemble",
        "output",
        "fused",
        "selected",
        "candidates",
        "failed_members",
        "not_called",
        "degraded",
        "degraded_reasons",
        "timings_ms",
        "usage",
    }
    assert body["output"] == "bbbb | ccc" and body["fused"] is True and body["degraded"] is False
    assert set(body["timings_ms"]) == {"members", "rank", "fuse", "total"}
    cand = body["candidates"][0]
    assert set(cand) == {"member", "text", "score", "rank", "latency_ms", "finish_reason"}
    assert "candidates" not in client.post("/generate", json={"prompt": "q"}).json()


def test_curl_style_body_without_json_content_type(client: TestClient) -> None:
    resp = client.post(
        "/generate",
        content=b'{"prompt": "q"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"prompt": 5}', "prompt"),
        (b'{"prompt": "q", "max_tokens": "many"}', "max_tokens"),
        (b'{"prompt": "q", "max_tokens": 0}', "max_tokens"),
        (b'{"prompt": "q", "temperature": 9}', "temperature"),
        (b'{"prompt": "q", "messages": [{"role": "user", "content": "x"}]}', None),
        (b"{}", None),
        (b'{"prompt": "q", "endpoint": "http://evil/v1"}', "endpoint"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages.0.role"),
        (b"[]", None),
    ],
)
def test_bad_input_is_400_in_openai_shape(client: TestClient, body: bytes, param: str | None) -> None:
    err = assert_openai_error(
        client.post("/generate", content=body, headers={"content-type": "application/json"}),
        400,
        "invalid_request_error",
    )
    if param:
        assert err["param"] == param


def test_unknown_ensemble_is_404(client: TestClient) -> None:
    err = assert_openai_error(client.post("/generate", json={"prompt": "q", "ensemble": "zz"}), 404)
    assert err["param"] == "ensemble"


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_openai_error(client.get("/nope"), 404)
    assert_openai_error(client.get("/generate"), 405)


def test_no_quorum_is_502() -> None:
    members = [
        FakeMember("a", "x", fail="connect"),
        FakeMember("b", "y", fail="http_5xx"),
        FakeMember("c", "z"),
    ]
    with make_client(members) as c:
        err = assert_openai_error(c.post("/generate", json={"prompt": "q"}), 502, "no_quorum")
        assert "a: connect" in err["message"]


def test_no_member_reachable_is_503_and_the_gateway_stays_ready() -> None:
    members = [FakeMember(name, "x", fail="connect") for name in ("a", "b", "c")]
    with make_client(members) as c:
        err = assert_openai_error(c.post("/generate", json={"prompt": "q"}), 503, "service_unavailable")
        assert err["code"] == "members_unavailable" and "0 of 3 members answered" in err["message"]
        chat = c.post("/v1/chat/completions", json={"model": "main", "messages": [{"role": "user", "content": "q"}]})
        assert assert_openai_error(chat, 503, "service_unavailable")["code"] == "members_unavailable"
        assert c.get("/ready", params={"scope": "gateway"}).status_code == 200
        assert c.get("/ready").status_code == 503  # for operators: the members are down


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    client.post("/generate", json={"prompt": "q"})
    client.post("/generate", json={"prompt": 1})
    text = client.get("/metrics").text
    assert 'gateway_requests_total{ensemble="main",status="200"} 1.0' in text
    assert 'gateway_requests_total{ensemble="-",status="400"} 1.0' in text
    for name in [
        "gateway_request_latency_seconds_bucket",
        'gateway_member_latency_seconds_count{member="a"}',
        'gateway_ranker_latency_seconds_count{ranker="length"}',
        'gateway_fuser_latency_seconds_count{fuser="join"}',
        'gateway_member_ranked_first_total{ensemble="main",member="b"}',
        'gateway_member_selected_total{ensemble="main",member="c"}',
    ]:
        assert name in text, name


def test_ready_is_503_when_quorum_unreachable() -> None:
    members = [
        FakeMember("a", "x", fail="connect"),
        FakeMember("b", "y", fail="connect"),
        FakeMember("c", "z"),
    ]
    with make_client(members) as c:
        resp = c.get("/ready")
        assert resp.status_code == 503
        body = resp.json()
        assert body["ensembles"]["main"] == {"up": 1, "needed": 2, "quorum": 3, "ready": False}
        assert body["members"]["a"]["up"] is False
        # The load balancer's probe: the gateway itself serves, so it stays in the Service and answers
        # in the OpenAI shape; the body still tells about the members.
        gw = c.get("/ready", params={"scope": "gateway"})
        assert gw.status_code == 200 and gw.json()["serving"] is True and gw.json()["ready"] is False
        assert gw.json()["members"]["a"]["up"] is False
        r = c.post("/generate", json={"prompt": "q"})
        assert r.status_code in (502, 504) and "error" in r.json()  # no quorum: a clear JSON error
        assert c.get("/ready", params={"scope": "nope"}).status_code == 400


def test_member_errors_are_counted() -> None:
    with make_client([FakeMember("a", "x", fail="timeout"), FakeMember("b", "y"), FakeMember("c", "z")]) as c:
        c.post("/generate", json={"prompt": "q"})
        text = c.get("/metrics").text
    assert 'gateway_member_errors_total{error_type="timeout",member="a"} 1.0' in text


def test_openapi_documents_generate(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/generate"]["post"]
    assert "GenerateRequest" in str(op["requestBody"])
    assert "GenerateResponse" in str(op["responses"]["200"])
    assert "ErrorResponse" in str(op["responses"]["502"])


def test_overload_is_429_with_retry_after_in_openai_shape() -> None:
    import concurrent.futures

    slow = [FakeMember("a", "aa", delay=0.5), FakeMember("b", "bbbb", delay=0.5), FakeMember("c", "ccc", delay=0.5)]
    with make_client(slow) as c:
        c.app.state.runtime.admission.configure(  # type: ignore[attr-defined]
            c.app.state.runtime.admission.limits.model_copy(update={"max_in_flight": 1, "max_queue": 0})  # type: ignore[attr-defined]
        )
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            resps = list(pool.map(lambda _: c.post("/generate", json={"prompt": "q"}), range(4)))
        codes = sorted(r.status_code for r in resps)
        assert codes[0] == 200 and 429 in codes
        shed = next(r for r in resps if r.status_code == 429)
        err = assert_openai_error(shed, 429, "rate_limit_error")
        assert err["code"] == "overloaded" and shed.headers["retry-after"] == "1"
        assert "gateway_shed_total" in c.get("/metrics").text


def test_ready_shows_circuit_and_draining(client: TestClient) -> None:
    body = client.get("/ready").json()
    assert body["members"]["a"]["circuit"] == "closed" and body["members"]["a"]["healthy"] is True
    assert body["draining"] is False
    client.app.state.runtime.admission.draining = True  # type: ignore[attr-defined]
    resp = client.get("/ready")
    assert resp.status_code == 503 and resp.json()["draining"] is True
    assert resp.headers["connection"] == "close"  # no client should reuse a draining gateway's connection
    assert_openai_error(client.post("/generate", json={"prompt": "q"}), 503, "shutting_down")


def test_status_json_and_page(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/generate", json={"prompt": "q"}).status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "status.json" in page.text and "<table" in page.text
    s = client.get("/status.json").json()
    members = {m["name"]: m for m in s["ensembles"]["main"]["members"]}
    assert set(members) == {"a", "b", "c"}
    assert members["b"]["win_rate"] == 1.0 and members["a"]["win_rate"] == 0.0  # LengthRanker: longest wins
    assert members["c"]["selection_share"] == 1.0 and members["a"]["selection_share"] == 0.0  # top_k 2
    assert members["a"]["calls"] == 3 and members["a"]["p50_ms"] is not None and members["a"]["up"] is True
    assert members["a"]["circuit"] == "closed"
    assert s["answered"] == 3 and len(s["recent"]) == 3
    last = s["recent"][0]
    assert [c["member"] for c in last["ranking"]] == ["b", "c", "a"] and last["selected"] == ["b", "c"]


def test_torch_threads_applies_before_the_models_run() -> None:
    import threading

    import torch

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    cfg = fake_config(FAKE_CONFIG + f"torch_threads: {want}\n")
    parts = Components(members={"a": FakeMember("a", "aa"), "b": FakeMember("b", "b")}, rankers={}, fusers={})
    parts.rankers, parts.fusers = {"length": LengthRanker()}, {"join": JoinFuser()}
    try:
        with TestClient(create_app(cfg, parts=parts)) as c:
            assert c.get("/ready").status_code in (200, 503)
            seen: list[int] = []
            worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            worker.start()
            worker.join()
            assert seen == [want]  # what a model worker thread started from now on runs with
    finally:
        torch.set_num_threads(before)
