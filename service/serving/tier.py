"""The model tier: ``ensemble-gateway serve-models`` serves the configured rankers and fusers over
HTTP, so that gateway replicas need no GPU and every one of them shares the tier's batches (the
ranker's pair batches and the fuser's batched beam search work across all callers, as they do
across one gateway's requests).

    POST /v1/rank      {model, source, candidates}                      -> {model, scores, ranks}
    POST /v1/fuse      {model, instruction, input, candidates, max_new_tokens, stream?}
                                                                        -> {model, text}, or events
                                                                           data: {"text": piece} ... [DONE]
    POST /v1/tokenize  {model, text}                                    -> {model, count}
    GET  /v1/models, /health, /ready, /metrics

The models are the gateway's own (``PairRMRanker``, ``GenFuser``), so a remote ranker's scores and
a remote fuser's texts are the in-process ones. Errors leave in the OpenAI shape; with keys
(``api_keys_env``) every route but /health, /ready and /metrics needs one. A request's
``traceparent`` is continued by the tier's own spans when tracing is configured (``OTEL_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field

from service.config import TierConfig
from service.errors import AuthenticationError, GatewayError, ModelError, NotFoundError, NotReadyError
from service.models.fusers.base import Fuser
from service.models.fusers.genfuser import GenFuser
from service.models.rankers.pairrm import PairRMRanker
from service.models.rankers.ranking import Ranker
from service.protocol import error_payload
from service.serving.app import install_error_handlers
from service.serving.edge.auth import key_matches
from service.telemetry.tracing import Tracing, stage, tracing_from_env

logger = logging.getLogger(__name__)

OPEN = frozenset({"/health", "/ready", "/metrics"})
Model = TypeVar("Model", Ranker, Fuser)
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RankBody(BaseModel):
    model: str
    source: str
    candidates: list[str] = Field(min_length=1, max_length=64)


class FuseBody(BaseModel):
    model: str
    instruction: str = ""
    input: str
    candidates: list[str] = Field(min_length=1, max_length=64)
    max_new_tokens: int | None = Field(None, ge=1)
    stream: bool = False


class TokenizeBody(BaseModel):
    model: str
    text: str


class Models:
    """The tier's loaded models and its metrics (a registry of its own)."""

    def __init__(self) -> None:
        self.rankers: dict[str, Ranker] = {}
        self.fusers: dict[str, Fuser] = {}
        self.ready = False
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tier_requests", "Calls by model, operation and status.", ["model", "op", "status"], registry=r
        )
        self.latency = Histogram(
            "tier_latency_seconds",
            "Time a call took, queueing included.",
            ["model", "op"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.queue = Gauge(
            "tier_queue_depth", "Calls in progress or waiting for their model's batch.", ["model"], registry=r
        )
        r.register(_BatchCollector(self))

    def ranker(self, name: str) -> Ranker:
        return _named(self, self.rankers, "ranker", name)

    def fuser(self, name: str) -> Fuser:
        return _named(self, self.fusers, "fuser", name)

    def close(self) -> None:
        for ranker in self.rankers.values():
            ranker.close()
        for fuser in self.fusers.values():
            fuser.close()


def _named(models: Models, table: dict[str, Model], kind: str, name: str) -> Model:
    """The loaded ``kind`` called ``name``: 503 while loading, 404 naming the client's field if none."""
    if not models.ready:
        raise NotReadyError("the model tier is still loading its models")
    if name not in table:
        raise NotFoundError(f"no {kind} {name!r} here ({kind}s: {sorted(table)})", param="model")
    return table[name]


class _BatchCollector:
    """The batches the models ran, read at scrape time: pairs per ranker forward pass, and the most
    fusions that shared a decoding step."""

    def __init__(self, models: Models):
        self.models = models

    def collect(self) -> Iterator[Any]:
        forwards = CounterMetricFamily("tier_ranker_forwards", "Ranker forward passes run.", labels=["model"])
        pairs = CounterMetricFamily("tier_ranker_pairs", "Candidate pairs compared.", labels=["model"])
        for name, r in self.models.rankers.items():
            forwards.add_metric([name], float(getattr(r, "forwards", 0)))
            pairs.add_metric([name], float(getattr(r, "pairs_scored", 0)))
        largest = GaugeMetricFamily("tier_fuser_largest_batch", "Most fusions that shared a step.", labels=["model"])
        for name, f in self.models.fusers.items():
            batcher = getattr(f, "batcher", None)
            largest.add_metric([name], float(getattr(batcher, "largest_batch", 1) if batcher is not None else 1))
        yield from (forwards, pairs, largest)


class _Call:
    """One call's accounting: its queue place, latency and status."""

    def __init__(self, models: Models, model: str, op: str):
        self.models, self.model, self.op = models, model, op
        self.start = time.perf_counter()
        models.queue.labels(model).inc()
        self.done = False

    def end(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self.models.queue.labels(self.model).dec()
        self.models.requests.labels(self.model, self.op, str(status)).inc()
        self.models.latency.labels(self.model, self.op).observe(time.perf_counter() - self.start)


@contextlib.contextmanager
def _accounted(call: _Call) -> Iterator[None]:
    """End ``call`` with 200, or with the status of the error that leaves the block."""
    status = 500
    try:
        yield
        status = 200
    except GatewayError as e:
        status = e.status
        raise
    finally:
        call.end(status)


def _keys(config: TierConfig) -> list[str]:
    if not config.api_keys_env:
        return []
    return [k.strip() for k in os.environ.get(config.api_keys_env, "").split(",") if k.strip()]


def create_tier_app(config: TierConfig, *, models: Models | None = None, tracing: Tracing | None = None) -> FastAPI:
    """The tier's app; its models load in the lifespan, off the event loop (``models``: given,
    already loaded, by tests)."""
    given = models is not None
    tier = models or Models()
    tracer = tracing if tracing is not None else tracing_from_env()
    keys = _keys(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not given:
            if config.torch_threads is not None:
                import torch

                torch.set_num_threads(config.torch_threads)
            for name, rcfg in config.rankers.items():
                tier.rankers[name] = await asyncio.to_thread(PairRMRanker, name, rcfg)
            for name, fcfg in config.fusers.items():
                tier.fusers[name] = await asyncio.to_thread(GenFuser, name, fcfg, config.cache_root())
        tier.ready = True
        logger.info("model tier ready: rankers %s, fusers %s", sorted(tier.rankers), sorted(tier.fusers))
        try:
            yield
        finally:
            if not given:
                tier.close()
            await asyncio.to_thread(tracer.shutdown)

    app = FastAPI(title="ensemble-gateway model tier", lifespan=lifespan)
    app.state.models = tier

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        path = request.url.path
        if keys and path not in OPEN:
            scheme, _, given_key = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(given_key.strip(), keys):
                error = AuthenticationError(
                    "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key"
                )
                return JSONResponse(error_payload(error), status_code=error.status)
        if path in OPEN:
            return await call_next(request)
        headers = {k: v for k, v in request.headers.items() if k in ("traceparent", "tracestate")}
        with tracer.request(f"{request.method} {path}", headers, {"url.path": path}):
            return await call_next(request)

    install_error_handlers(app)  # the gateway's: every error in the OpenAI shape

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if not tier.ready:
            error = NotReadyError("the model tier is still loading its models")
            return JSONResponse(error_payload(error), status_code=503)
        return JSONResponse({"status": "ready", "rankers": sorted(tier.rankers), "fusers": sorted(tier.fusers)})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(tier.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [{"id": n, "object": "model", "kind": "ranker"} for n in sorted(tier.rankers)]
        data += [{"id": n, "object": "model", "kind": "fuser"} for n in sorted(tier.fusers)]
        return {"object": "list", "data": data}

    @app.post("/v1/rank")
    async def rank(body: RankBody) -> dict[str, Any]:
        ranker = tier.ranker(body.model)
        attrs = {"gateway.ranker": body.model, "gateway.candidates": len(body.candidates)}
        with _accounted(_Call(tier, body.model, "rank")), stage("rank", attrs):
            ranking = await ranker.rank(body.source, body.candidates)
        return {"model": body.model, "scores": list(ranking.scores), "ranks": list(ranking.ranks)}

    @app.post("/v1/fuse", response_model=None)
    async def fuse(body: FuseBody) -> dict[str, Any] | StreamingResponse:
        fuser = tier.fuser(body.model)
        args = (body.instruction, body.input, body.candidates, body.max_new_tokens)
        call = _Call(tier, body.model, "fuse_stream" if body.stream else "fuse")
        if body.stream:
            return StreamingResponse(_pieces(fuser, args, call), media_type="text/event-stream")
        attrs = {"gateway.fuser": body.model, "gateway.fused": len(body.candidates)}
        with _accounted(call), stage("fuse", attrs):
            text = await fuser.fuse(*args)
        return {"model": body.model, "text": text}

    @app.post("/v1/tokenize")
    async def tokenize(body: TokenizeBody) -> dict[str, Any]:
        fuser = tier.fuser(body.model)
        return {"model": body.model, "count": await fuser.count_tokens(body.text)}

    return app


async def _pieces(fuser: Fuser, args: tuple[str, str, list[str], int | None], call: _Call) -> AsyncIterator[str]:
    """A streamed fusion as server-sent events; an error after the first piece is one error event."""
    status = 500
    try:
        async for piece in fuser.fuse_stream(*args):
            yield f"data: {json.dumps({'text': piece}, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
        status = 200
    except ModelError as e:
        yield f"data: {json.dumps(error_payload(e))}\n\n"
    finally:
        call.end(status)


def serve_models(config_path: Path, host: str, port: int) -> int:
    """``ensemble-gateway serve-models``: load the tier's configuration (an error names the field and
    nothing starts), then serve it with uvicorn until SIGTERM or Ctrl-C."""
    import uvicorn

    from service.config import load_tier_config

    try:
        config = load_tier_config(config_path)
    except GatewayError as e:
        print(f"ensemble-gateway serve-models: {e.message}", file=sys.stderr)
        return 2
    app = create_tier_app(config)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=30)
    return 0
