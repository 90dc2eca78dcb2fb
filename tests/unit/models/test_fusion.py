"""The LLM fuser's token count: vLLM's /tokenize beside the endpoint's /v1, None where it is missing."""

from __future__ import annotations

import json

import httpx

from service.config import LLMFuserConfig
from service.models.fusion import LLMFuser


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
