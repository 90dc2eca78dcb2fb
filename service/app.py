"""The HTTP application: ``create_app`` and a lifespan that builds the pipeline onto ``app.state``."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import admin, generate, health, openai, status
from service.build import Components
from service.config import GatewayConfig
from service.errors import GatewayError, error_body
from service.launcher import Launcher
from service.metrics import Metrics
from service.middleware import EdgeMiddleware
from service.runtime import Runtime

logger = logging.getLogger(__name__)


def _install_error_handlers(app: FastAPI) -> None:
    """The one place where exceptions become HTTP responses, all in the OpenAI error shape."""

    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

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
        if request.url.path in ("/generate", "/v1/chat/completions", "/v1/completions"):
            request.app.state.metrics.requests.labels("-", "400").inc()
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_, None, type_), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body("internal error", "internal_error", None, "internal_error"), status_code=500)


def create_app(
    config: GatewayConfig,
    *,
    parts: Components | None = None,
    launcher: Launcher | None = None,
    config_path: Path | None = None,
) -> FastAPI:
    """Build the app. Models load in the lifespan (off the event loop); a failure stops start-up."""
    metrics = Metrics()

    runtime = Runtime(config, metrics, launcher=launcher, config_path=config_path, parts=parts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        start = time.perf_counter()
        await runtime.start()
        logger.info("pipeline ready in %.1fs: ensembles %s", time.perf_counter() - start, list(config.ensembles))
        hup = _install_sighup(runtime)
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await runtime.close()

    app = FastAPI(
        title="ensemble-gateway",
        summary="Several LLMs answering as one: fan-out, PairRM ranking, GenFuser fusion.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.started_at = time.time()
    app.state.metrics = metrics
    app.state.admission = runtime.admission
    app.add_middleware(EdgeMiddleware, config=lambda: runtime.config, draining=lambda: runtime.admission.draining)
    _install_error_handlers(app)
    app.include_router(generate.router)
    app.include_router(health.router)
    app.include_router(openai.router)
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ensemble-gateway")
    except PackageNotFoundError:
        return "0.0.0"
