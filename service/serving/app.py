"""The HTTP application: ``create_app`` and a lifespan that builds the pipeline onto ``app.state``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.config import GatewayConfig, package_version
from service.errors import GatewayError, NotFoundError, RequestError
from service.ops.launcher import Launcher
from service.protocol import error_payload
from service.serving import edge
from service.serving.api import admin, feedback, generate, health, openai, responses, status
from service.serving.build import Components
from service.serving.runtime import Runtime
from service.serving.summary import startup_summary
from service.telemetry.metrics import Metrics
from service.telemetry.tracing import Tracing, tracing_from_env

logger = logging.getLogger(__name__)


def install_error_handlers(app: FastAPI) -> None:
    """The one place where exceptions become HTTP responses, all through ``error_payload`` (the
    requests are counted where they are taken: ``service.serving.accounting``)."""

    def error_response(error: GatewayError, status: int | None = None) -> JSONResponse:
        return JSONResponse(error_payload(error), status_code=status or error.status, headers=error.headers)

    @app.exception_handler(GatewayError)
    async def _gateway(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc)

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
        return error_response(RequestError(message, param=param, code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = NotFoundError(str(exc.detail)) if exc.status_code == 404 else RequestError(str(exc.detail))
        error.code = error.type
        return error_response(error, exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(GatewayError("internal error", code="internal_error"))


def create_app(
    config: GatewayConfig,
    *,
    parts: Components | None = None,
    launcher: Launcher | None = None,
    config_path: Path | None = None,
    members_checked: bool = False,
    host: str | None = None,
    port: int | None = None,
    tracing: Tracing | None = None,
    ops_port: int | None = None,
) -> FastAPI:
    """Build the app. Models load in the lifespan (off the event loop); a failure stops start-up.
    ``members_checked``: the caller ran ``materialize`` on this config already (``serve`` does,
    before it starts any server). ``host`` and ``port``: where it will listen, for the start-up
    warnings and summary (printed to stderr once ready, when the port is known). ``tracing``: as the
    ``OTEL_*`` variables say, unless given (tests pass one over the SDK's in-memory exporter).
    ``ops_port``: the operators' port, where metrics, status and the status page are served alone."""
    metrics = Metrics()
    tracer = tracing if tracing is not None else tracing_from_env()

    runtime = Runtime(
        config,
        metrics,
        launcher=launcher,
        config_path=config_path,
        parts=parts,
        members_checked=members_checked,
        host=host,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = time.perf_counter()
        if config.torch_threads is not None and (config.rankers or config.fusers):
            import torch

            # Before the model workers start: a thread takes up the setting only when it starts.
            torch.set_num_threads(config.torch_threads)
        await runtime.start()
        for warning in runtime.warnings():
            logger.warning("WARNING: %s", warning)
        logger.info("pipeline ready in %.1fs: ensembles %s", time.perf_counter() - start, list(config.ensembles))
        if port is not None:
            health = await runtime.probe_members()
            base_url = f"http://{host or '127.0.0.1'}:{port}"
            ops_url = f"http://{host or '127.0.0.1'}:{ops_port}" if ops_port is not None else None
            summary = startup_summary(
                config, health, base_url, time.perf_counter() - start, package_version(), ops_url=ops_url
            )
            print(summary, file=sys.stderr, flush=True)
        hup = _install_sighup(runtime)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await runtime.close()
            await asyncio.to_thread(tracer.shutdown)  # the spans still queued are exported

    app = FastAPI(
        title="ensemble-gateway",
        summary="Several LLMs answering as one: fan-out, PairRM ranking, GenFuser fusion.",
        version=package_version(),
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.tracing = tracer
    edge.install(
        app,
        config=lambda: runtime.config,
        draining=lambda: runtime.admission.draining,
        tracing=lambda: tracer,
        ops_port=ops_port,
    )
    install_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    app.include_router(feedback.router)
    app.include_router(admin.router)
    app.include_router(status.router)
    return app


def _install_sighup(runtime: Runtime) -> bool:
    """SIGHUP reloads the config file (only where signals can be handled: the main thread)."""
    if runtime.config_path is None:
        return False

    def on_hup() -> None:
        async def reload() -> None:
            try:
                await runtime.reload_from_file()
            except Exception as e:
                logger.error("reload on SIGHUP failed; the previous configuration keeps serving: %s", e)

        task = asyncio.create_task(reload())
        _background.add(task)
        task.add_done_callback(_background.discard)

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_hup)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


_background: set[asyncio.Task[None]] = set()
