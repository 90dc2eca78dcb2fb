"""The OpenAI-compatible surface and streaming, with fake parts behind the real app."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from service.serving.app import create_app
from service.serving.build import Components
from tests.fakes import FakeMember, JoinFuser, LengthRanker, fake_config, fake_pipeline


def make_client(fuser: JoinFuser | None = None) -> TestClient:
    parts = Components(
        members={m.name: m for m in [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]},
        rankers={"length": LengthRanker()},
        fusers={"join": fuser or JoinFuser()},
    )
    return TestClient(create_app(fake_config(), parts=parts), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def events(resp: Any) -> list[Any]:
    assert resp.headers["content-type"].startswith("text/event-stream")
    out = []
    for block in resp.text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_lists_ensembles(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["main", "plain"]


def test_chat_completion(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={"model": "main", "messages": [{"role": "user", "content": "q"}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "main"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "bbbb | ccc"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 0


def test_text_completion_and_content_parts(client: TestClient) -> None:
    resp = client.post("/v1/completions", json={"model": "plain", "prompt": ["q"], "user": "u1"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["text"] == "aa"
    parts = {"role": "user", "content": [{"type": "text", "text": "q"}]}
    resp = client.post("/v1/chat/completions", json={"model": "main", "messages": [parts]})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"n": 2}, "n"),
        ("/v1/chat/completions", {"logprobs": True}, "logprobs"),
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("/v1/chat/completions", {"stop": ["\n"]}, "stop"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
    ],
)
def test_unsupported_fields_are_400_naming_the_field(
    client: TestClient, path: str, extra: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": "main", **extra}
    body.update({"messages": [{"role": "user", "content": "q"}]} if "chat" in path else {"prompt": "q"})
    resp = client.post(path, json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_harmless_fields_are_accepted(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": "main",
            "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "q"}],
            "user": "someone",
            "n": 1,
            "logprobs": False,
            "response_format": {"type": "text"},
            "presence_penalty": 0,
        },
    )
    assert resp.status_code == 200, resp.text


def test_unknown_model_is_404(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user", "content": "q"}]})
    assert resp.status_code == 404
    assert resp.json()["error"]["param"] == "model"


def test_chat_stream(client: TestClient) -> None:
    resp = client.post(
        "/v1/chat/completions",
        json={
            "model": "main",
            "messages": [{"role": "user", "content": "q"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.status_code == 200
    ev = events(resp)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "bbbb | ccc"
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 1
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_completion_stream(client: TestClient) -> None:
    resp = client.post("/v1/completions", json={"model": "main", "prompt": "q", "stream": True})
    ev = events(resp)
    assert ev[-1] == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in ev[:-1]) == "bbbb | ccc"
    assert ev[-2]["choices"][0]["finish_reason"] == "stop"


def test_generate_stream_ends_with_the_evidence(client: TestClient) -> None:
    resp = client.post("/generate", json={"prompt": "q", "stream": True, "return_candidates": True})
    ev = events(resp)
    assert ev[-1] == "[DONE]"
    result = ev[-2]
    assert result["object"] == "ensemble.result"
    assert result["output"] == "bbbb | ccc" and result["selected"] == ["b", "c"]
    assert [c["member"] for c in result["candidates"]] == ["b", "c", "a"]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in ev[:-2])
    assert streamed == result["output"]


def test_errors_before_the_stream_keep_their_status(client: TestClient) -> None:
    resp = client.post("/generate", json={"prompt": "q", "stream": True, "ensemble": "nope"})
    assert resp.status_code == 404


def test_fuser_failure_mid_stream_is_an_error_event() -> None:
    with make_client(JoinFuser(fail_after=1)) as c:
        resp = c.post(
            "/v1/chat/completions",
            json={"model": "main", "messages": [{"role": "user", "content": "q"}], "stream": True},
        )
        ev = events(resp)
        assert ev[-1] == "[DONE]"
        assert ev[-2]["error"]["type"] == "model_error"
        metrics = c.get("/metrics").text
        assert 'gateway_requests_total{ensemble="main",status="500"} 1.0' in metrics


def test_official_client_plain_and_streaming(client: TestClient) -> None:
    oa = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", http_client=client)
    out = oa.chat.completions.create(model="main", messages=[{"role": "user", "content": "q"}])
    assert out.choices[0].message.content == "bbbb | ccc"
    stream = oa.chat.completions.create(model="main", messages=[{"role": "user", "content": "q"}], stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == "bbbb | ccc"
    comp = oa.completions.create(model="plain", prompt="q")
    assert comp.choices[0].text == "aa"
    assert [m.id for m in oa.models.list()] == ["main", "plain"]
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model="main", messages=[{"role": "user", "content": "q"}], n=3)
    assert e.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "q"}])


async def test_stream_abandoned_before_its_first_byte_still_ends_its_accounting() -> None:
    from starlette.requests import ClientDisconnect

    from service.protocol import CompletionRequest
    from service.serving.accounting import Account
    from service.serving.serving_openai import ServingCompletion
    from service.telemetry.metrics import Metrics

    metrics = Metrics()
    members = {m.name: m for m in [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]}
    p = fake_pipeline(fake_config(), members, {"length": LengthRanker()}, {"join": JoinFuser()}, metrics)
    body = CompletionRequest.model_validate({"model": "main", "prompt": "q", "stream": True})
    resp = await ServingCompletion(p, Account(metrics)).create(body)

    async def receive() -> dict[str, str]:
        return {"type": "http.disconnect"}

    async def send(message: object) -> None:
        raise OSError("the client is gone")

    with pytest.raises((OSError, ClientDisconnect)):
        await resp({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
    # The event generator never ran; the request was still ended, as a client that left.
    assert metrics.registry.get_sample_value("gateway_requests_total", {"ensemble": "main", "status": "499"}) == 1
    assert metrics.registry.get_sample_value("gateway_requests_in_flight") == 0
    assert p.active == 0
