"""Structured logs: one JSON object per line, each carrying the request id it belongs to (and the
trace id, while a trace is recorded)."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from dataclasses import dataclass

from opentelemetry import trace

request_id: ContextVar[str] = ContextVar("request_id", default="-")


@dataclass
class Exchange:
    """What one request's access-log line says beyond method, path and status: the answer's id,
    once the pipeline has minted it (``note_answer``)."""

    answer_id: str | None = None


exchange: ContextVar[Exchange | None] = ContextVar("exchange", default=None)


def note_answer(answer_id: str) -> None:
    """The current request's answer id, for its access-log line."""
    ex = exchange.get()
    if ex is not None:
        ex.answer_id = answer_id


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = format(ctx.trace_id, "032x")
        return True


def setup_logging(level: str = "info", json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if json_logs:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # httpx logs every member call at INFO; that is what metrics are for.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
