"""Tracing (service/telemetry/tracing.py) through the whole app, with the SDK's in-memory exporter:
the request's span and its stages, members reached over HTTP (httpx's mock transport) receiving the
member call's ``traceparent``, a client's ``traceparent`` continued, failures marked, and the
``OTEL_*`` variables read as the specification says."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.members.base import Member
from service.members.openai import OpenAIMember
from service.serving.app import create_app
from service.serving.build import Components
from service.telemetry.logs import setup_logging
from service.telemetry.tracing import Tracing, tracing_from_env
from tests.fakes import FAKE_CONFIG, JoinFuser, LengthRanker, fake_config

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"


class Servers:
    """The members' server, answering through httpx's mock transport; keeps each call's headers."""

    def __init__(self, failing: set[str] | None = None):
        self.calls: list[tuple[str, httpx.Headers]] = []
        self.failing = failing or set()

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # the health checks' /models
            return httpx.Response(200, json={"data": [{"id": m} for m in ("m-a", "m-b", "m-c")]})
        model = json.loads(request.content)["model"]
        self.calls.append((model, request.headers))
        if model in self.failing:
            return httpx.Response(503, text="down")
        text = {"m-a": "aa", "m-b": "bbbb", "m-c": "ccc"}[model]
        body = {
            "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": len(text)},
        }
        return httpx.Response(200, json=body)


def make_client(servers: Servers, tracing: Tracing | None, extra: str = "") -> tuple[TestClient, httpx.AsyncClient]:
    config = fake_config(FAKE_CONFIG + extra)
    http = httpx.AsyncClient(transport=httpx.MockTransport(servers.handle))
    members: dict[str, Member] = {m.name: OpenAIMember(m, "http://members.test/v1", http) for m in config.members}
    parts = Components(members=members, rankers={"length": LengthRanker()}, fusers={"join": JoinFuser()})
    app = create_app(config, parts=parts, tracing=tracing)
    return TestClient(app, raise_server_exceptions=False), http


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(exporter: InMemorySpanExporter) -> Tracing:
    return Tracing.with_processor(SimpleSpanProcessor(exporter))


def by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def test_a_request_is_one_trace_with_a_span_per_stage_and_members_continue_it(
    traced: Tracing, exporter: InMemorySpanExporter
) -> None:
    servers = Servers()
    c, _ = make_client(servers, traced)
    with c:
        r = c.post("/generate", json={"prompt": "q", "ensemble": "main"}, headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()
    names = by_name(spans)
    (request,) = names["POST /generate"]
    assert request.kind == SpanKind.SERVER
    # The client's trace is continued: same trace id, the client's span as the parent.
    assert format(request.context.trace_id, "032x") == CLIENT_TRACE
    assert parent_id(request) == int(CLIENT_SPAN, 16)
    assert request.attributes is not None and request.attributes["http.response.status_code"] == 200
    assert request.attributes["gateway.response_id"] == r.json()["id"]
    assert all(format(s.context.trace_id, "032x") == CLIENT_TRACE for s in spans)
    for stage in ("admission", "fan_out", "rank", "fuse", "respond"):
        (span,) = names[stage]
        assert parent_id(span) == request.context.span_id, stage
    (fan_out,) = names["fan_out"]
    members = [s for s in spans if s.name.startswith("member ")]
    assert sorted(s.name for s in members) == ["member a", "member b", "member c"]
    for s in members:
        assert s.kind == SpanKind.CLIENT and parent_id(s) == fan_out.context.span_id
        attrs = dict(s.attributes or {})
        assert attrs["gateway.attempt"] == 1 and attrs["gateway.status"] == "ok"
        assert attrs["server.address"] == "http://members.test/v1"
        assert attrs["gen_ai.usage.input_tokens"] == 5 and attrs["gen_ai.usage.output_tokens"] in (2, 3, 4)
    # Each member's server got the traceparent of its own call's span (what vLLM continues).
    spans_by_member = {s.name.split()[1]: s for s in members}
    assert len(servers.calls) == 3
    for model, headers in servers.calls:
        span = spans_by_member[model[-1]]
        version, trace_hex, span_hex, flags = headers["traceparent"].split("-")
        assert (version, flags) == ("00", "01")
        assert trace_hex == CLIENT_TRACE and int(span_hex, 16) == span.context.span_id
    assert dict(names["rank"][0].attributes or {})["gateway.candidates"] == 3


def test_a_failing_member_is_marked_per_attempt(traced: Tracing, exporter: InMemorySpanExporter) -> None:
    servers = Servers(failing={"m-b"})
    c, _ = make_client(servers, traced, "resilience: {retries: {attempts: 2, backoff_s: 0}}\n")
    with c:
        r = c.post("/generate", json={"prompt": "q", "ensemble": "plain"})
        assert r.status_code == 200
    spans = [s for s in exporter.get_finished_spans() if s.name == "member b"]
    assert [dict(s.attributes or {})["gateway.attempt"] for s in spans] == [1, 2]
    assert all(s.status.status_code == StatusCode.ERROR for s in spans)
    assert all(dict(s.attributes or {})["gateway.status"] == "http_5xx" for s in spans)
    (request,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert request.status.status_code != StatusCode.ERROR  # the answer came, degraded


def test_a_streamed_answer_ends_its_fuse_span(traced: Tracing, exporter: InMemorySpanExporter) -> None:
    c, _ = make_client(Servers(), traced)
    with c:
        body = {"model": "main", "stream": True, "messages": [{"role": "user", "content": "q"}]}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert "[DONE]" in "".join(r.iter_text())
    names = by_name(exporter.get_finished_spans())
    (request,) = names["POST /v1/chat/completions"]
    (fuse,) = names["fuse"]
    assert parent_id(fuse) == request.context.span_id and dict(fuse.attributes or {})["gateway.stream"] is True
    assert fuse.end_time is not None and request.end_time is not None and fuse.end_time <= request.end_time


def test_probes_are_not_traced_and_untraced_calls_carry_no_traceparent(
    traced: Tracing, exporter: InMemorySpanExporter
) -> None:
    servers = Servers()
    c, _ = make_client(servers, None)  # tracing off (no OTEL_* variables in the tests' environment)
    with c:
        assert c.post("/generate", json={"prompt": "q"}).status_code == 200
    assert servers.calls and all("traceparent" not in h for _, h in servers.calls)
    c, _ = make_client(Servers(), traced)
    with c:
        c.get("/health")
        c.get("/metrics")
    assert exporter.get_finished_spans() == ()


def test_the_access_log_names_the_answer_and_the_trace(
    traced: Tracing, exporter: InMemorySpanExporter, capsys: pytest.CaptureFixture[str]
) -> None:
    c, _ = make_client(Servers(), traced)
    with c:
        setup_logging("info", json_logs=True)
        r = c.post("/generate", json={"prompt": "q"}, headers={"traceparent": TRACEPARENT})
        logging.getLogger().handlers[:] = []
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (access,) = [x for x in lines if x.get("logger") == "service.access" and x.get("path") == "/generate"]
    assert access["response_id"] == r.json()["id"] and access["trace_id"] == CLIENT_TRACE


# --- the OTEL_* variables ---------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in (
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    ):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch


def exporter_of(t: Tracing) -> Any:
    assert t.provider is not None
    processors = t.provider._active_span_processor._span_processors
    return processors[0]._batch_processor._exporter  # type: ignore[attr-defined]


def test_off_unless_the_variables_ask(clean_env: pytest.MonkeyPatch) -> None:
    assert not tracing_from_env().enabled
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    t = tracing_from_env()
    assert t.enabled and type(exporter_of(t)).__module__.endswith("proto.http.trace_exporter")
    t.shutdown()
    clean_env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    t = tracing_from_env()
    assert type(exporter_of(t)).__module__.endswith("proto.grpc.trace_exporter")
    t.shutdown()
    clean_env.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing_from_env().enabled
    clean_env.delenv("OTEL_SDK_DISABLED")
    clean_env.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing_from_env().enabled


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin", "OTEL_TRACES_EXPORTER"),
        ("OTEL_TRACES_EXPORTER", "otlp,console", "OTEL_TRACES_EXPORTER"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ],
)
def test_an_unsupported_setting_is_refused_by_name(
    clean_env: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    clean_env.setenv(name, value)
    with pytest.raises(ValueError, match=says):
        tracing_from_env()
