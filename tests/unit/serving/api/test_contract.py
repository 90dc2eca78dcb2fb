"""The request contract as clients read it: vLLM's sampling extensions, the ensemble's own knobs in
one object, token limits and usage (fake parts behind the real app)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.members.base import MemberRequest
from service.serving.app import create_app
from service.serving.build import Components
from tests.fakes import FAKE_CONFIG, FakeMember, JoinFuser, LengthRanker, fake_config

Q = [{"role": "user", "content": "q"}]
# The fake ensemble's 1 s deadline is for the fault tests; here a loaded CI machine must not turn an
# answer into a 504.
RELAXED = FAKE_CONFIG.replace("deadline_s: 1", "deadline_s: 30")


@dataclass
class Parts:
    members: dict[str, FakeMember]
    fuser: JoinFuser


@pytest.fixture
def parts() -> Parts:
    members = [FakeMember("a", "aa"), FakeMember("b", "bbbb"), FakeMember("c", "ccc")]
    return Parts({m.name: m for m in members}, JoinFuser())


@pytest.fixture
def client(parts: Parts) -> Iterator[TestClient]:
    components = Components(
        members=dict(parts.members), rankers={"length": LengthRanker()}, fusers={"join": parts.fuser}
    )
    with TestClient(create_app(fake_config(RELAXED), parts=components), raise_server_exceptions=False) as c:
        yield c


def sent(parts: Parts, member: str) -> MemberRequest:
    return parts.members[member].requests[-1]


def data_events(text: str) -> list[Any]:
    return [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]


def test_vllm_benchmark_clients_request_is_served(client: TestClient, parts: Parts) -> None:
    """The body `vllm bench serve` (openai-chat backend) sends: content parts, max_completion_tokens,
    a stream with usage, and vLLM's ignore_eos; top_k here is vLLM's top-k sampling."""
    body = {
        "model": "main",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
        "max_completion_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "top_k": 40,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "min_tokens": 2,
        "stop_token_ids": [7],
    }
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    for m in "abc":
        req = sent(parts, m)
        assert req.max_tokens == 4
        assert req.extensions == {
            "ignore_eos": True,
            "top_k": 40,
            "min_p": 0.1,
            "repetition_penalty": 1.1,
            "min_tokens": 2,
            "stop_token_ids": [7],
        }
    chunks = data_events(resp.text)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "bbbb | ccc"  # top_k did not change the candidates fused (the ensemble's 2)
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == len(text)  # the fused answer's tokens (JoinFuser: one per character)
    assert set(usage["members"]) == {"a", "b", "c"}
    assert parts.fuser.limits[-1] == 4


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"min_p": 2}, "min_p"), ({"top_k": -2}, "top_k"), ({"ignore_eos": "sure"}, "ignore_eos")],
)
def test_a_bad_extension_value_is_400_naming_it(client: TestClient, extra: dict[str, Any], param: str) -> None:
    resp = client.post("/v1/chat/completions", json={"model": "main", "messages": Q, **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_no_extensions_sends_none(client: TestClient, parts: Parts) -> None:
    assert client.post("/v1/completions", json={"model": "main", "prompt": "q"}).status_code == 200
    assert sent(parts, "a").extensions is None


def test_the_ensemble_object_carries_the_ensembles_knobs(client: TestClient, parts: Parts) -> None:
    body = {
        "model": "main",
        "messages": Q,
        "ensemble": {"fuse_top_k": 1, "return_candidates": True, "instruction": "I: "},
    }
    r = client.post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["message"]["content"] == "bbbb"  # one candidate fused
    evidence = r["ensemble"]
    assert [c["member"] for c in evidence["candidates"]] == ["b", "c", "a"]
    assert evidence["selected"] == ["b"] and evidence["fused"] is True and "output" not in evidence
    assert parts.fuser.calls[-1][0] == "I: "
    plain = client.post("/v1/chat/completions", json={"model": "main", "messages": Q}).json()
    assert "ensemble" not in plain
    never = client.post("/v1/completions", json={"model": "main", "prompt": "q", "ensemble": {"fusion": "never"}})
    assert never.json()["choices"][0]["text"] == "bbbb"


def test_the_evidence_streams_in_its_own_chunk(client: TestClient) -> None:
    body = {"model": "main", "messages": Q, "stream": True, "ensemble": {"return_candidates": True}}
    chunks = data_events(client.post("/v1/chat/completions", json=body).text)
    proof = [c for c in chunks if "ensemble" in c]
    assert len(proof) == 1 and proof[0]["choices"] == [] and proof[0]["ensemble"]["selected"] == ["b", "c"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": Q, "ensemble": {"fuse_top_k": 9}}, "fuse_top_k"),
        ("/v1/chat/completions", {"messages": Q, "ensemble": {"colour": "red"}}, "ensemble.colour"),
        ("/generate", {"prompt": "q", "fuse_top_k": 9}, "fuse_top_k"),
        ("/generate", {"prompt": "q", "top_k": 9}, "top_k"),
    ],
)
def test_bad_ensemble_knobs_name_their_field(client: TestClient, path: str, body: dict[str, Any], param: str) -> None:
    resp = client.post(path, json={"model": "main", **body} if path.startswith("/v1") else body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


def test_generate_keeps_top_k_as_the_old_name(client: TestClient, parts: Parts) -> None:
    old = client.post("/generate", json={"prompt": "q", "top_k": 1}).json()
    new = client.post("/generate", json={"prompt": "q", "fuse_top_k": 1}).json()
    assert old["selected"] == new["selected"] == ["b"]
    both = client.post("/generate", json={"prompt": "q", "top_k": 1, "fuse_top_k": 2})
    assert both.status_code == 400 and "fuse_top_k" in both.json()["error"]["message"]
    ext = client.post("/generate", json={"prompt": "q", "sampling_extensions": {"top_k": 5}})
    assert ext.status_code == 200 and sent(parts, "a").extensions == {"top_k": 5}


def test_unfused_answer_counts_the_top_candidates_tokens(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "plain", "prompt": "q"}).json()
    assert r["choices"][0]["text"] == "aa"
    # plain has no ranker: the first member's answer, and its own count (FakeMember: one per word)
    assert r["usage"]["completion_tokens"] == 1 and r["usage"]["members"]["a"] == {
        "prompt_tokens": 5,
        "completion_tokens": 1,
    }
