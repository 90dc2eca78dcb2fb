"""An answer stream's SSE response: its events, then the closing ones; a ``GatewayError`` during
fusion becomes the API's error events; the request's account ends once, with 200, the error's
status, or 499; the answer stream's hold is given back however the response ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from service.errors import GatewayError, ModelError
from service.pipeline.pipeline import AnswerStream, Pipeline
from service.pipeline.types import Query
from service.serving.accounting import Account
from service.serving.sse import DONE, AnswerEvents, sse
from service.telemetry.metrics import Metrics
from tests.fakes import FakeMember, JoinFuser, LengthRanker, fake_config, fake_pipeline


async def setup(fuser: JoinFuser) -> tuple[Pipeline, AnswerStream, Account, Metrics]:
    metrics = Metrics()
    members = {n: FakeMember(n, text) for n, text in (("a", "aa"), ("b", "bbbb"), ("c", "ccc"))}
    p = fake_pipeline(fake_config(), members, {"length": LengthRanker()}, {"join": fuser}, metrics)
    stream = await p.answer_stream(Query(prompt="q"))
    account = Account(metrics)
    account.ensemble = "main"
    return p, stream, account, metrics


async def pieces(stream: AnswerStream) -> AsyncIterator[str]:
    async for piece in stream.pieces():
        yield sse({"piece": piece})


def failed(e: GatewayError) -> list[str]:
    return [sse({"failed": e.message})]


async def run(response: AnswerEvents) -> str:
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await response({"type": "http", "asgi": {"spec_version": "2.4"}, "method": "POST"}, receive, send)
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()


def status_count(metrics: Metrics, status: str) -> float | None:
    return metrics.registry.get_sample_value("gateway_requests_total", {"ensemble": "main", "status": status})


async def test_the_events_then_the_closing_and_the_account_ends_with_200() -> None:
    p, stream, account, metrics = await setup(JoinFuser())
    body = await run(AnswerEvents(stream, account, pieces(stream), failed, [DONE]))
    assert body.startswith('data: {"piece":"bbb"}') and body.endswith(DONE) and "failed" not in body
    assert stream.answer is not None and stream.answer.output == "bbbb | ccc"
    assert status_count(metrics, "200") == 1 and p.active == 0


async def test_an_error_during_fusion_is_the_apis_error_event_and_its_status() -> None:
    p, stream, account, metrics = await setup(JoinFuser(fail_after=1))
    body = await run(AnswerEvents(stream, account, pieces(stream), failed, [DONE]))
    assert '"failed":"fuser join failed: RuntimeError: fuser exploded mid-stream"' in body and body.endswith(DONE)
    assert status_count(metrics, str(ModelError.status)) == 1 and status_count(metrics, "200") is None
    assert p.active == 0
