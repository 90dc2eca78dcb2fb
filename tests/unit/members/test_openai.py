import asyncio
import json

import httpx
import pytest

from service.config import member_config
from service.errors import MemberFailure
from service.members.base import MemberRequest, render_prompt
from service.members.http import MemberClient
from service.members.openai import OpenAIMember

REQ = MemberRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=7, temperature=0.1, top_p=0.9, seed=3)


def member(handler, **cfg) -> OpenAIMember:  # type: ignore[no-untyped-def]
    config = member_config({"name": "m", "endpoint": "http://up/v1", "model": "tiny", **cfg})
    # The gateway's own client class, so that member calls take its direct path (send_direct).
    client = MemberClient(httpx.MockTransport(handler))
    return OpenAIMember(config, "http://up/v1", client)


def chat_ok(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    text = f"echo {body['messages'][-1]['content']}"
    return httpx.Response(
        200,
        json={
            "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        },
    )


async def test_chat_request_and_response() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return chat_ok(request)

    m = member(handler, system_prompt="be brief")
    out = await m.generate(REQ)
    assert out.text == "echo hi" and out.finish_reason == "length"
    assert (out.prompt_tokens, out.completion_tokens) == (3, 4)
    assert str(seen[0].url) == "http://up/v1/chat/completions"
    body = json.loads(seen[0].content)
    assert body["model"] == "tiny" and body["max_tokens"] == 7 and body["seed"] == 3
    assert body["messages"][0] == {"role": "system", "content": "be brief"}


async def test_completions_api() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        body = json.loads(request.content)
        return httpx.Response(200, json={"choices": [{"text": body["prompt"].upper(), "finish_reason": "stop"}]})

    out = await member(handler, api="completions").generate(REQ)
    assert out.text == "HI" and out.prompt_tokens == 0


def test_render_prompt() -> None:
    assert render_prompt([{"role": "user", "content": "x"}]) == "x"
    two = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert render_prompt(two) == "system: s\nuser: u\nassistant:"


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (httpx.Response(500, text="boom"), "http_5xx"),
        (httpx.Response(404, text="no such model"), "http_4xx"),
        (httpx.Response(200, text="{not json"), "invalid_response"),
        (httpx.Response(200, json={"choices": []}), "invalid_response"),
        (httpx.Response(200, json={"choices": [{"message": {"content": None}}]}), "invalid_response"),
    ],
)
async def test_bad_answers_become_member_failures(response: httpx.Response, kind: str) -> None:
    with pytest.raises(MemberFailure) as e:
        await member(lambda r: response).generate(REQ)
    assert e.value.kind == kind


async def test_connect_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(MemberFailure) as e:
        await member(handler).generate(REQ)
    assert e.value.kind == "connect"


async def test_total_timeout_bounds_a_slow_member() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return chat_ok(request)

    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(MemberFailure) as e:
        await member(handler, timeout_s=0.2).generate(REQ)
    assert e.value.kind == "timeout"
    assert loop.time() - start < 2


async def test_health() -> None:
    await member(lambda r: httpx.Response(200, json={"data": []})).health()
    with pytest.raises(MemberFailure):
        await member(lambda r: httpx.Response(503)).health()


async def test_an_upstream_body_stays_out_of_the_failure(caplog: pytest.LogCaptureFixture) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, text="Traceback: secret internals of the server")

    with pytest.raises(MemberFailure) as e:
        await member(handler).generate(MemberRequest([{"role": "user", "content": "q"}], 4, 0.0, 1.0))
    assert "secret" not in str(e.value) and "500" in str(e.value) and e.value.kind == "http_5xx"
    assert e.value.upstream is not None and "secret" in e.value.for_operators()
    assert "secret internals" in caplog.text  # the log keeps it


@pytest.mark.parametrize("mode", ["pass", "drop"])
async def test_sampling_extensions_pass_or_drop(mode: str) -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return chat_ok(request)

    ext = {"top_k": 40, "ignore_eos": True, "min_p": 0.05}
    req = MemberRequest(messages=REQ.messages, max_tokens=7, temperature=0.1, top_p=0.9, extensions=ext)
    await member(handler, extensions=mode).generate(req)
    sent = {k: seen[0][k] for k in ext if k in seen[0]}
    assert sent == (ext if mode == "pass" else {})
    assert seen[0]["max_tokens"] == 7  # OpenAI's own fields go either way
