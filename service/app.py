"""The HTTP application: ``create_app`` and a lifespan that builds the pipeline onto ``app.state``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import generate, health
from service.config import GatewayConfig
from service.errors import ConfigError, GatewayError, error_body
from service.fusion import Fuser, GenFuser
from service.members import Member, MemberFailure, OpenAIMember, make_http_client
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.ranking import PairRMRanker, Ranker

logger = logging.getLogger(__name__)

READY_CACHE_S = 2.0


@dataclass
class Components:
    """Pre-built parts, for tests and embedding; anything missing is built from the config."""

    members: dict[str, Member] | None = None
    rankers: dict[str, Ranker] | None = None
    fusers: dict[str, Fuser] | None = None


@dataclass
class Readiness:
    """Cached member probes behind /ready."""

    checked_at: float = 0.0
    members: dict[str, str | None] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def member_base_url(config: GatewayConfig, name: str, server_urls: dict[str, str]) -> str:
    member = config.member(name)
    if member.endpoint is not None:
        return member.endpoint
    assert member.server is not None  # guaranteed by the config's validation
    if member.server not in server_urls:
        raise ConfigError(f"members.{name}.server: server {member.server!r} is not running")
    return server_urls[member.server]


async def build_pipeline(
    config: GatewayConfig,
    metrics: Metrics,
    client: httpx.AsyncClient,
    server_urls: dict[str, str],
    parts: Components,
) -> Pipeline:
    members: dict[str, Member] = dict(parts.members or {})
    for m in config.members:
        if m.name not in members:
            members[m.name] = OpenAIMember(m, member_base_url(config, m.name, server_urls), client)
    rankers: dict[str, Ranker] = dict(parts.rankers or {})
    for name, rcfg in config.rankers.items():
        if name not in rankers:
            rankers[name] = await asyncio.to_thread(PairRMRanker, name, rcfg)
    fusers: dict[str, Fuser] = dict(parts.fusers or {})
    for name, fcfg in config.fusers.items():
        if name not in fusers:
            fusers[name] = await asyncio.to_thread(GenFuser, name, fcfg)
    return Pipeline(config, members, rankers, fusers, metrics)


class _JsonBodyDefault:
    """Treat a POST body sent without a JSON content type (``curl -d``) as JSON."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            ctype = dict(scope["headers"]).get(b"content-type", b"")
            if ctype in (b"", b"application/x-www-form-urlencoded"):
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    """The one place where exceptions become HTTP responses, all in the OpenAI error shape."""

    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "request body is not valid JSON"
        message = f"{param}: {msg}" if param else str(msg)
        if request.url.path == "/generate":
            request.app.state.metrics.requests.labels("-", "400").inc()
        return JSONResponse(
            error_body(message, "invalid_request_error", param, "invalid_request"), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_, None, type_), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(
            error_body("internal error", "internal_error", None, "internal_error"), status_code=500
        )


def create_app(
    config: GatewayConfig,
    *,
    server_urls: dict[str, str] | None = None,
    parts: Components | None = None,
) -> FastAPI:
    """Build the app. Models load in the lifespan (off the event loop); a failure stops start-up."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_http_client(config.max_connections)
        start = time.perf_counter()
        try:
            pipeline = await build_pipeline(config, metrics, client, server_urls or {}, parts or Components())
        except BaseException:
            await client.aclose()
            raise
        logger.info(
            "pipeline ready in %.1fs: ensembles %s", time.perf_counter() - start, list(config.ensembles)
        )
        app.state.pipeline = pipeline
        try:
            yield
        finally:
            await client.aclose()
            for ranker in pipeline.rankers.values():
                ranker.close()
            for fuser in pipeline.fusers.values():
                fuser.close()

    app = FastAPI(
        title="ensemble-gateway",
        summary="Several LLMs answering as one: fan-out, PairRM ranking, GenFuser fusion.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.metrics = metrics
    app.state.readiness = Readiness()
    app.add_middleware(_JsonBodyDefault)
    _install_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(health.router)
    return app


async def probe_members(app: FastAPI) -> dict[str, str | None]:
    """Each member's health (None = up), cached for a couple of seconds."""
    state: Readiness = app.state.readiness
    pipeline: Pipeline | None = getattr(app.state, "pipeline", None)
    if pipeline is None:
        return {}
    async with state.lock:
        if time.monotonic() - state.checked_at < READY_CACHE_S and state.members:
            return state.members
        names = list(pipeline.members)

        async def check(name: str) -> str | None:
            try:
                await pipeline.members[name].health()
            except MemberFailure as e:
                return str(e)
            return None

        results = await asyncio.gather(*(check(n) for n in names))
        state.members = dict(zip(names, results, strict=True))
        state.checked_at = time.monotonic()
        return state.members


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ensemble-gateway")
    except PackageNotFoundError:
        return "0.0.0"


__all__: list[Any] = ["Components", "create_app"]
