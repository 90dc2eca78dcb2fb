"""POST /v1/responses with fake parts behind the real app, read raw and through the official client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from service.members.base import Completion, MemberRequest
from service.serving.app import create_app
from service.serving.build import Components
from tests.fakes import FAKE_CONFIG, FakeMember, JoinFuser, LengthRanker, fake_config

EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


class CutMember(FakeMember):
    """Stops at its token limit (finish_reason ``length``)."""

    async def generate(self, request: MemberRequest) -> Completion:
        done = await super().generate(request)
        return Completion(done.text, "length", 5, request.max_tokens, 0.0)


def make(fuser: JoinFuser | None = None, config: str | None = None, delay: float = 0.0) -> TestClient:
    members = [FakeMember("a", "aa", delay=delay), FakeMember("b", "bbbb"), CutMember("c", "ccc")]
    parts = Components(
        members={m.name: m for m in members},
        rankers={"length": LengthRanker()},
        fusers={"join": fuser or JoinFuser()},
    )
    # The fake ensemble's 1 s deadline is for the fault tests: a loaded machine must not make a 504 here.
    cfg = fake_config((FAKE_CONFIG if config is None else config).replace("deadline_s: 1", "deadline_s: 30"))
    return TestClient(create_app(cfg, parts=parts), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make() as c:
        yield c


def sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        out.append((lines["event"], data))
    return out


def test_plain_response_object(client: TestClient) -> None:
    body = {"model": "main", "input": "q", "max_output_tokens": 9, "metadata": {"k": "v"}}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "response" and out["status"] == "completed" and out["model"] == "main"
    assert out["id"].startswith("resp_") and out["metadata"] == {"k": "v"} and out["max_output_tokens"] == 9
    (item,) = out["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"] == [{"type": "output_text", "text": "bbbb | ccc", "annotations": [], "logprobs": []}]
    u = out["usage"]
    assert (u["input_tokens"], u["output_tokens"]) == (15, len("bbbb | ccc"))
    assert u["total_tokens"] == 15 + 10 and set(u["members"]) == {"a", "b", "c"}
    assert "ensemble" not in out and out["error"] is None and out["incomplete_details"] is None


def test_input_messages_and_instructions_reach_the_members() -> None:
    parts_seen: list[list[dict[str, str]]] = []
    with make() as c:
        body = {
            "model": "plain",
            "instructions": "be brief",
            "input": [
                {"role": "developer", "content": "house rules"},
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hi "}, {"type": "input_text", "text": "there"}],
                },
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "yo", "annotations": []}],
                },
                {"role": "user", "content": "q"},
            ],
        }
        assert c.post("/v1/responses", json=body).status_code == 200
        members = c.app.state.runtime.pipeline.members  # type: ignore[attr-defined]
        parts_seen.append(members["a"].requests[-1].messages)
    assert parts_seen[0] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "house rules"},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
    ]


def test_stream_sends_openais_event_sequence(client: TestClient) -> None:
    r = client.post("/v1/responses", json={"model": "main", "input": "q", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    kinds = [k for k, _ in events]
    deltas = [d for k, d in events if k == "response.output_text.delta"]
    assert len(deltas) > 1 and kinds == EVENTS[:4] + ["response.output_text.delta"] * len(deltas) + EVENTS[5:]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    text = "".join(d["delta"] for d in deltas)
    assert text == "bbbb | ccc"
    done = dict(events)
    assert done["response.output_text.done"]["text"] == text
    assert done["response.created"]["response"]["status"] == "in_progress"
    final = done["response.completed"]["response"]
    assert final["status"] == "completed" and final["output"][0]["content"][0]["text"] == text
    assert final["usage"]["output_tokens"] == len(text)
    assert {d["item_id"] for d in deltas} == {final["output"][0]["id"]}


def test_answer_at_its_token_limit_is_incomplete(client: TestClient) -> None:
    body = {"model": "main", "input": "q", "ensemble": {"fusion": "never"}, "max_output_tokens": 3}
    # LengthRanker puts b's answer first, which stopped on its own: complete.
    assert client.post("/v1/responses", json=body).json()["status"] == "completed"
    # An ensemble of the one member that hits its limit:
    with make(config=CUT_CONFIG) as c:
        out = c.post("/v1/responses", json={"model": "cut", "input": "q", "max_output_tokens": 3}).json()
        assert out["status"] == "incomplete" and out["incomplete_details"] == {"reason": "max_output_tokens"}
        assert out["usage"]["output_tokens"] == 3
        events = sse(c.post("/v1/responses", json={"model": "cut", "input": "q", "stream": True}).text)
        assert events[-1][0] == "response.incomplete"


CUT_CONFIG = """
members:
  - {name: a, endpoint: "http://127.0.0.1:9/v1", model: m-a}
  - {name: b, endpoint: "http://127.0.0.1:9/v1", model: m-b}
  - {name: c, endpoint: "http://127.0.0.1:9/v1", model: m-c}
rankers: {length: {checkpoint: unused}}
fusers: {join: {checkpoint: unused}}
ensembles:
  cut: {members: [c], min_candidates: 1}
"""


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {}}}}, "text"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input.0"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
        ({"input": []}, "input"),
        ({"input": "x" * 200_001}, "input"),
        ({"text": {"format": "json"}}, "text"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
        ({"input": [{"role": "user", "content": 7}]}, "input.0.content"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_what_an_ensemble_cannot_honour_is_400_naming_it(client: TestClient, extra: dict[str, Any], param: str) -> None:
    r = client.post("/v1/responses", json={"model": "main", "input": "q", **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_harmless_fields_are_accepted(client: TestClient) -> None:
    body = {
        "model": "main",
        "input": "q",
        "store": True,
        "user": "u",
        "tools": [],
        "tool_choice": "auto",
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "parallel_tool_calls": True,
        "prompt_cache_key": "k",
        "service_tier": "auto",
    }
    assert client.post("/v1/responses", json=body).status_code == 200


def test_evidence_on_request(client: TestClient) -> None:
    body = {"model": "main", "input": "q", "ensemble": {"return_candidates": True}}
    out = client.post("/v1/responses", json=body).json()
    assert [c["member"] for c in out["ensemble"]["candidates"]] == ["b", "c", "a"]
    events = sse(client.post("/v1/responses", json={**body, "stream": True}).text)
    assert events[-1][1]["response"]["ensemble"]["selected"] == ["b", "c"]


def test_failure_mid_stream_is_response_failed() -> None:
    with make(JoinFuser(fail_after=1)) as c:
        events = sse(c.post("/v1/responses", json={"model": "main", "input": "q", "stream": True}).text)
        kind, data = events[-1]
        assert kind == "response.failed"
        assert data["response"]["status"] == "failed" and data["response"]["error"]["code"] == "model_error"
        assert 'gateway_requests_total{ensemble="main",status="500"} 1.0' in c.get("/metrics").text


def test_official_client(client: TestClient) -> None:
    oa = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", http_client=client)
    r = oa.responses.create(model="main", input="q", instructions="be brief")
    assert r.output_text == "bbbb | ccc" and r.status == "completed" and r.usage is not None
    assert r.usage.output_tokens == 10
    kinds, text = [], ""
    for event in oa.responses.create(model="main", input="q", stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            assert event.response.output_text == text
    assert text == "bbbb | ccc" and kinds[0] == EVENTS[0] and kinds[-1] == EVENTS[-1]
    with oa.responses.stream(model="main", input="q") as stream:
        final = stream.get_final_response()
    assert final.output_text == "bbbb | ccc"
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(model="main", input="q", previous_response_id="resp_1")
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        oa.responses.create(model="nope", input="q")


def test_official_client_gets_rate_limit_error_when_the_gateway_is_full() -> None:
    with make(config=FAKE_CONFIG + "limits: {max_in_flight: 1, max_queue: 0}\n", delay=1.0) as c:
        oa = openai.OpenAI(base_url=str(c.base_url) + "/v1", api_key="unused", http_client=c, max_retries=0)
        slow = threading.Thread(target=lambda: oa.responses.create(model="main", input="q"))
        slow.start()
        time.sleep(0.3)
        with pytest.raises(openai.RateLimitError):
            oa.responses.create(model="main", input="q")
        slow.join()
