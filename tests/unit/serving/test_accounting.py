"""Request accounting in one place: every request to an ensemble endpoint is counted once, with
its ensemble (``-`` where none was named that exists) and the status it ended with, refused before
the pipeline took it or not; other endpoints are not counted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.build import Components
from service.telemetry.metrics import Metrics
from tests.fakes import FakeMember, JoinFuser, LengthRanker, fake_config

Q = [{"role": "user", "content": "q"}]


@pytest.fixture
def client() -> Iterator[TestClient]:
    members = [FakeMember("a", "aa"), FakeMember("b", "bb", fail="connect"), FakeMember("c", "cc", fail="connect")]
    parts = Components(
        members={m.name: m for m in members}, rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()}
    )
    with TestClient(create_app(fake_config(), parts=parts), raise_server_exceptions=False) as c:
        yield c


def counts(client: TestClient) -> dict[tuple[str, str], float]:
    metrics: Metrics = client.app.state.metrics  # type: ignore[attr-defined]
    out = {}
    for metric in metrics.requests.collect():
        for s in metric.samples:
            if s.name == "gateway_requests_total":
                out[(s.labels["ensemble"], s.labels["status"])] = s.value
    return out


def test_each_outcome_is_counted_once_with_its_ensemble(client: TestClient) -> None:
    assert client.post("/generate", json={"prompt": "q", "ensemble": "plain"}).status_code == 200
    assert client.post("/v1/chat/completions", json={"model": "main", "messages": Q}).status_code == 502  # b and c fail
    assert client.post("/generate", json={"prompt": 1}).status_code == 400  # does not validate
    assert client.post("/v1/chat/completions", json={"model": "main", "messages": Q, "n": 2}).status_code == 400
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "q"}).status_code == 404
    stream = client.post("/v1/responses", json={"model": "plain", "input": "q", "stream": True})
    assert stream.status_code == 200 and "response.completed" in stream.text
    client.get("/health")
    client.get("/v1/models")
    assert counts(client) == {("plain", "200"): 2, ("main", "502"): 1, ("-", "400"): 2, ("-", "404"): 1}
    metrics: Metrics = client.app.state.metrics  # type: ignore[attr-defined]
    assert metrics.registry.get_sample_value("gateway_requests_in_flight") == 0
    assert metrics.registry.get_sample_value("gateway_request_latency_seconds_count", {"ensemble": "plain"}) == 2
