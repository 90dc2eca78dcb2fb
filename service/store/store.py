"""``Store``: the answers and feedback database. Answers arrive through the writer's queue (off the
request path); feedback, reads and deletes are awaited by the request that asks for them and fail
as ``StoreUnavailable`` (503) when the database is down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.config.store import STORE_DRIVERS, StoreConfig
from service.errors import GatewayError, StoreUnavailable
from service.store import migrate
from service.store.records import AnswerRecord, FeedbackRecord
from service.store.schema import answers, feedback
from service.store.writer import Row, Writer
from service.telemetry.metrics import Metrics

logger = logging.getLogger("service.store")

CONNECT_TIMEOUT_S = 3.0
RETENTION_EVERY_S = 3600.0
READ_FLUSH_S = 2.0  # a read waits this long at most for the records queued before it


def store_url(config: StoreConfig, cache_dir: Path) -> sa.URL:
    """The configured URL on its async driver; the default is ``store.db`` in the cache directory."""
    raw = config.url or f"sqlite:///{cache_dir / 'store.db'}"
    url = make_url(raw)
    return url.set(drivername=STORE_DRIVERS[url.drivername])


def _json(value: Any) -> str:
    """JSON columns through orjson: json.dumps took 35 µs of the ~50 µs a record cost to write
    (9 JSON columns; /tmp profile of 2,000 records), on the event loop's thread."""
    return orjson.dumps(value).decode()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")  # feedback only beside an answer, as on PostgreSQL
    cursor.close()


class Store:
    def __init__(self, config: StoreConfig, cache_dir: Path, metrics: Metrics):
        self.config = config
        self.url = store_url(config, cache_dir)
        self.metrics = metrics
        if self.url.get_backend_name() == "sqlite":
            if self.url.database:
                Path(self.url.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(self.url, json_serializer=_json)
            sa.event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_async_engine(
                self.url,
                json_serializer=_json,
                pool_pre_ping=True,
                connect_args={"timeout": CONNECT_TIMEOUT_S, "command_timeout": config.write_timeout_s},
            )
        self.migrated = False
        # Alembic keeps its environment in module globals: two migrations at once in one process
        # (the writer, a read, retention) break each other; one at a time, each re-checking.
        self._migrating = asyncio.Lock()
        self.writer = Writer(
            self._write,
            metrics,
            queue_size=config.queue_size,
            batch_size=config.batch_size,
            timeout_s=config.write_timeout_s,
        )
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def where(self) -> str:
        """The URL without its password, for logs and the status page."""
        return self.url.render_as_string(hide_password=True)

    # --- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Migrate (a database that is down now is migrated when it comes back) and start writing."""
        try:
            await self.ensure_schema()
        except Exception as e:
            logger.warning("store %s unavailable at start; answers are served, records dropped: %s", self.where, e)
        self._tasks = [asyncio.create_task(self.writer.run()), asyncio.create_task(self._retention())]

    async def close(self, timeout_s: float = 5.0) -> None:
        left = await self.writer.drain(timeout_s)
        if left:
            logger.warning("store: %d records not written at shutdown", left)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)
        await self.engine.dispose()

    async def ensure_schema(self) -> None:
        if self.migrated:
            return
        async with self._migrating:
            if not self.migrated:
                async with self.engine.begin() as conn:
                    await conn.run_sync(migrate.upgrade)
                self.migrated = True

    # --- answers -------------------------------------------------------------------------

    def put(self, record: AnswerRecord) -> None:
        """Queue an answer's record; never waits, never raises."""
        self.writer.put(record.row())

    async def _write(self, rows: list[Row]) -> None:
        await self.ensure_schema()
        async with self.engine.begin() as conn:
            await conn.execute(answers.insert(), list(rows))

    async def answer(self, answer_id: str) -> dict[str, Any] | None:
        """An answer's record, once the records queued before this call are written."""
        await self.writer.flush(READ_FLUSH_S)
        rows = await self._read(sa.select(answers).where(answers.c.id == answer_id))
        return rows[0] if rows else None

    async def delete(self, answer_id: str) -> bool:
        """Remove an answer and its feedback (the Responses API's DELETE); False if it was not there."""
        async with self._guard(), self.engine.begin() as conn:
            await conn.execute(feedback.delete().where(feedback.c.answer_id == answer_id))
            result = await conn.execute(answers.delete().where(answers.c.id == answer_id))
        return bool(result.rowcount)

    # --- feedback ------------------------------------------------------------------------

    async def add_feedback(self, record: FeedbackRecord) -> None:
        async with self._guard(), self.engine.begin() as conn:
            await conn.execute(feedback.insert(), [record.row()])

    async def feedback_of(self, answer_id: str) -> list[dict[str, Any]]:
        return await self._read(sa.select(feedback).where(feedback.c.answer_id == answer_id))

    # --- reading many (export, training) ---------------------------------------------------

    async def with_feedback(self, ensemble: str | None = None) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        """Each answer that has feedback, with its feedback, oldest first."""
        await self.writer.flush(READ_FLUSH_S)
        q = sa.select(answers).where(answers.c.id.in_(sa.select(feedback.c.answer_id)))
        if ensemble is not None:
            q = q.where(answers.c.ensemble == ensemble)
        rows = await self._read(q.order_by(answers.c.created_at))
        notes_q = sa.select(feedback).order_by(feedback.c.created_at)
        if ensemble is not None:  # only the feedback on this ensemble's answers
            mine = sa.select(answers.c.id).where(answers.c.ensemble == ensemble)
            notes_q = notes_q.where(feedback.c.answer_id.in_(mine))
        notes = await self._read(notes_q)
        by_answer: dict[str, list[dict[str, Any]]] = {}
        for n in notes:
            by_answer.setdefault(n["answer_id"], []).append(n)
        return [(row, by_answer.get(row["id"], [])) for row in rows]

    async def all_answers(self, ensemble: str | None = None) -> list[dict[str, Any]]:
        await self.writer.flush(READ_FLUSH_S)
        q = sa.select(answers)
        if ensemble is not None:
            q = q.where(answers.c.ensemble == ensemble)
        return await self._read(q.order_by(answers.c.created_at))

    async def _read(self, query: sa.Select[Any]) -> list[dict[str, Any]]:
        async with self._guard():
            await self.ensure_schema()
            async with self.engine.connect() as conn:
                result = await conn.execute(query)
                return [dict(m) for m in result.mappings()]

    # --- retention -------------------------------------------------------------------------

    async def expire(self, now: float | None = None) -> int:
        """Delete the answers (and their feedback) older than ``retention_days``; how many went."""
        days = self.config.retention_days
        if days is None:
            return 0
        cutoff = (now or time.time()) - days * 86400
        old = sa.select(answers.c.id).where(answers.c.created_at < cutoff)
        async with self.engine.begin() as conn:
            await conn.execute(feedback.delete().where(feedback.c.answer_id.in_(old)))
            result = await conn.execute(answers.delete().where(answers.c.created_at < cutoff))
        return int(result.rowcount or 0)

    async def _retention(self) -> None:
        while True:
            try:
                await self.ensure_schema()
                if gone := await self.expire():
                    logger.info("store: %d answers past retention deleted", gone)
            except Exception as e:
                if _cancelling():  # a cancellation a library turned into another error
                    raise asyncio.CancelledError from e
                logger.debug("store retention skipped: %s", e)
            await asyncio.sleep(RETENTION_EVERY_S)

    # --- state ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        w = self.writer
        return {
            "url": self.where,
            "up": w.up,
            "queued": w.queue.qsize(),
            "written": w.written,
            "dropped": dict(w.dropped),
            "last_error": w.last_error if w.up is False else None,
            "down_since": w.down_since,
        }

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """A database failure on an awaited operation becomes a 503 the client can read."""
        try:
            yield
        except (GatewayError, asyncio.CancelledError):
            raise
        except Exception as e:
            logger.warning("store %s: %s: %s", self.where, type(e).__name__, e)
            raise StoreUnavailable("the store is unavailable; try again later", code="store_unavailable") from e


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
