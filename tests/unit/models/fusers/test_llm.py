"""The LLM fuser's token count: vLLM's /tokenize beside the endpoint's /v1, None where it is missing."""

from __future__ import annotations

import json

import httpx
import pytest

from service.config import LLMFuserConfig
from service.errors import ModelError
from service.models.fusers.llm import LLMFuser


def fuser(handler: object) -> LLMFuser:
    config = LLMFuserConfig(kind="llm", endpoint="http://up:8000/v1", model="agg")
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))  # type: ignore[arg-type]
    return LLMFuser("moa", config, "http://up:8000/v1", client)


async def test_count_tokens_asks_vllms_tokenize() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"count": 4, "tokens": [1, 2, 3, 4], "max_model_len": 64})

    assert await fuser(handler).count_tokens("four tokens of text") == 4
    assert str(seen[0].url) == "http://up:8000/tokenize"
    assert json.loads(seen[0].content) == {"model": "agg", "prompt": "four tokens of text", "add_special_tokens": False}


async def test_count_tokens_is_none_where_the_server_cannot_tell() -> None:
    assert await fuser(lambda r: httpx.Response(404, json={"detail": "Not Found"})).count_tokens("x") is None
    assert await fuser(lambda r: httpx.Response(200, text="not json")).count_tokens("x") is None

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    assert await fuser(down).count_tokens("x") is None


async def test_fuse_asks_the_models_chat_completions_with_the_template() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        assert str(request.url) == "http://up:8000/v1/chat/completions"
        return httpx.Response(200, json={"choices": [{"message": {"content": "fused"}, "finish_reason": "stop"}]})

    assert await fuser(handler).fuse("Sort.", "cab", ["abc", "acb"], max_new_tokens=5) == "fused"
    body = seen[0]
    assert body["model"] == "agg" and body["max_tokens"] == 5 and "stream" not in body
    messages = body["messages"]
    assert isinstance(messages, list) and messages[1] == {"role": "user", "content": "Sort.\n\ncab"}
    assert "[1] abc" in messages[0]["content"] and "[2] acb" in messages[0]["content"]


async def test_fuse_stream_yields_the_streamed_text() -> None:
    events = [
        {"choices": [{"delta": {"role": "assistant"}}]},
        *({"choices": [{"delta": {"content": p}}]} for p in "ab"),
    ]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    assert [p async for p in fuser(handler).fuse_stream("", "q", ["x"])] == ["a", "b"]


@pytest.mark.parametrize(
    ("response", "said"),
    [
        (httpx.Response(500, text="boom"), "HTTP 500"),
        (httpx.Response(200, json={"choices": []}), "invalid_response"),
        (httpx.Response(200, json={"choices": [{"message": {"content": None}}]}), "invalid_response"),
    ],
)
async def test_a_failing_model_is_the_fusers_model_error(response: httpx.Response, said: str) -> None:
    with pytest.raises(ModelError, match=said):
        await fuser(lambda r: response).fuse("", "q", ["x"])
    streamed = response if response.status_code != 200 else httpx.Response(200, text="data: {}\n\n")
    with pytest.raises(ModelError, match=r"HTTP 500|bad stream"):
        [p async for p in fuser(lambda r: streamed).fuse_stream("", "q", ["x"])]
