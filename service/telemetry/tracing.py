"""Traces with OpenTelemetry: a span per request and one per stage (admission, route, each member
call, rank, vote, fuse, respond), the W3C ``traceparent`` taken from clients and passed on to
members, so that a vLLM started with ``--otlp-traces-endpoint`` continues the same trace.

Off unless the standard variables ask for it (``tracing_from_env``): an OTLP endpoint
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``) or an explicit
``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``); ``OTEL_SDK_DISABLED=true`` or
``OTEL_TRACES_EXPORTER=none`` turn it off. The SDK reads the rest itself: ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER(_ARG)``, ``OTEL_BSP_*``, the exporter's
headers, timeout and certificates. ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` picks ``grpc`` or
``http/protobuf`` (the specification's default).

Off, ``Tracing`` holds the API's no-op tracer: a stage's span costs a function call and nothing is
injected into member calls. The provider is the gateway's own (not the process-wide global), so
tests and two apps in one process do not share spans.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

SCOPE = "ensemble-gateway"
_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent / tracestate, what vLLM reads

# The tracer of the app serving the current request (set by the request span's middleware), so that
# the pipeline's stages and the members' HTTP calls need no tracer passed down to them.
_current: ContextVar[Tracing | None] = ContextVar("tracing", default=None)


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _exporter_from_env() -> SpanExporter | None:
    """The exporter the ``OTEL_*`` variables name, or None when tracing is off."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return None
    kinds = [k.strip().lower() for k in _env("OTEL_TRACES_EXPORTER").split(",") if k.strip()]
    endpoint = _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not kinds:
        kinds = ["otlp"] if endpoint else []
    if not kinds or kinds == ["none"]:
        return None
    if len(kinds) > 1:
        raise ValueError(f"OTEL_TRACES_EXPORTER: one exporter is supported, not {','.join(kinds)}")
    kind = kinds[0]
    if kind == "console":
        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: {kind!r} is not supported (otlp, console or none)")
    protocol = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()  # endpoint, headers, insecure, timeout: from the environment
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (grpc or http/protobuf)")


class Tracing:
    """The gateway's tracer, or the no-op one (``enabled`` False)."""

    def __init__(self, provider: TracerProvider | None = None):
        self.provider = provider
        self.enabled = provider is not None
        self.tracer: Tracer = provider.get_tracer(SCOPE) if provider is not None else trace.NoOpTracer()

    @classmethod
    def with_processor(cls, processor: SpanProcessor, service_name: str = SCOPE) -> Tracing:
        """Tracing that hands every finished span to ``processor`` (tests: a ``SimpleSpanProcessor``
        over the SDK's ``InMemorySpanExporter``)."""
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        provider.add_span_processor(processor)
        return cls(provider)

    def shutdown(self) -> None:
        """Export what is still queued, then stop (at the gateway's exit)."""
        if self.provider is not None:
            self.provider.shutdown()

    # --- the request span ----------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, name: str, headers: Mapping[str, str], attributes: Mapping[str, Any]) -> Iterator[Span]:
        """The request's span, a child of the client's ``traceparent`` when it sent a valid one; the
        stages' spans below it find this tracer through the context."""
        token = _current.set(self)
        try:
            if not self.enabled:
                yield trace.INVALID_SPAN
                return
            parent = _PROPAGATOR.extract(headers)
            with self.tracer.start_as_current_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes), end_on_exit=True
            ) as span:
                yield span
        finally:
            _current.reset(token)


def tracing_from_env() -> Tracing:
    """Tracing as the ``OTEL_*`` variables configure it (module docstring); off when they do not.
    A variable that names something unsupported stops the start-up with its name."""
    exporter = _exporter_from_env()
    if exporter is None:
        return Tracing()
    resource = Resource.create({SERVICE_NAME: _env("OTEL_SERVICE_NAME") or SCOPE})
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER, read by the SDK
    provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_*: read by the SDK
    logger.info("tracing on: spans go to %s.%s", type(exporter).__module__, type(exporter).__name__)
    return Tracing(provider)


# --- what the stages use ----------------------------------------------------------------------------


def tracer() -> Tracer | None:
    """The current request's tracer when tracing is on and the request is sampled, else None: the
    stages of a request whose span is not recorded make no spans of their own (what they would cost
    is most of tracing's cost), and member calls pass on the request's unsampled ``traceparent``."""
    t = _current.get()
    if t is None or not t.enabled:
        return None
    return t.tracer if trace.get_current_span().is_recording() else None


@contextlib.contextmanager
def stage(name: str, attributes: Mapping[str, Any] | None = None, kind: SpanKind = SpanKind.INTERNAL) -> Iterator[Span]:
    """A child span of the current one for a pipeline stage (no-op when tracing is off). An
    exception that leaves it marks it as an error (and is recorded), then propagates."""
    t = tracer()
    if t is None:
        yield trace.INVALID_SPAN
        return
    with t.start_as_current_span(name, kind=kind, attributes=dict(attributes or {})) as span:
        yield span


def fail(span: Span, description: str) -> None:
    """Mark ``span`` failed (a member that did not answer, a ranker that failed) without an exception."""
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, description))


def propagating() -> bool:
    """Whether outgoing calls carry a ``traceparent`` (tracing is on, sampled or not)."""
    t = _current.get()
    return t is not None and t.enabled


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent`` (and ``tracestate``) to an outgoing call's headers."""
    if propagating():
        _PROPAGATOR.inject(headers)


def trace_id() -> str | None:
    """The current trace's id (32 hex digits), for the access log; None outside a sampled trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def open_span(name: str, attributes: Mapping[str, Any] | None = None) -> Span:
    """A child span of the current one that is not made current: for work that spans the yields of
    a generator (a streamed fusion), where the context may change between pieces. The caller ends it."""
    t = tracer()
    if t is None:
        return trace.INVALID_SPAN
    return t.start_span(name, attributes=dict(attributes or {}))
