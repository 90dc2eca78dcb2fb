"""The store of answers on real databases, each test on an SQLite file and on a real PostgreSQL server
(tests/postgres.py): the migrations bring an empty database to head and create exactly the schema
of service/store/schema.py, records and feedback come back whole, delete and retention work, a second
store on the same database migrates nothing; and on PostgreSQL, a server that goes away while
records are put costs records (counted, logged once), never an answer, and writing resumes on its
own when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.config.store import StoreConfig
from service.errors import StoreUnavailable
from service.store import AnswerRecord, FeedbackRecord, Store, migrate, store_url
from service.store.schema import metadata
from service.telemetry.metrics import Metrics
from tests.postgres import Postgres

pytestmark = pytest.mark.integration

HEAD = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
REVISIONS = len(list(ScriptDirectory.from_config(migrate.alembic_config()).walk_revisions()))
OUTAGE_LOG = "store unavailable, records are dropped"
RESUMED_LOG = "store writes resumed"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database: an SQLite file, or a database of its own on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'store.db'}"
    postgres: Postgres = request.getfixturevalue("postgres")
    return postgres.create_database()


@contextlib.asynccontextmanager
async def opened(url: str, tmp_path: Path, metrics: Metrics | None = None, **settings: Any) -> AsyncIterator[Store]:
    store = Store(StoreConfig(url=url, **settings), tmp_path, metrics or Metrics())
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def engine_on(url: str, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine of the test's own on the store's database, to look at it from outside."""
    engine = create_async_engine(store_url(StoreConfig(url=url), tmp_path))
    try:
        yield engine
    finally:
        await engine.dispose()


async def revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(migrate.current)


async def version_rows(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalars())


def answer(n: int, created_at: float, ensemble: str = "tiny") -> AnswerRecord:
    """A record with every kind of field filled, nested JSON and non-ASCII text included."""
    return AnswerRecord(
        id=f"{n:032x}",
        created_at=created_at,
        api=("generate", "chat", "completions", "responses")[n % 4],
        ensemble=ensemble,
        config_digest="0123456789abcdef",
        key_id=None if n % 3 == 0 else f"key-{n % 3}",
        metadata=None if n % 2 else {"user": f"u{n}", "note": 'ünïcode ✓ "quoted"'},
        inputs_hashed=n % 5 == 0,
        input={
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {n} ✓"}],
            "instruction": "answer the question",
            "input_text": None,
        },
        output=f"answer {n}\nsecond line, 'quotes' \"and\" ünïcode ✓",
        fused=n % 2 == 0,
        fusion={"policy": "adaptive", "skipped": None if n % 2 == 0 else "agreement", "selected": [0, 1]},
        candidates=[
            {"member": "a", "text": f"a says {n}", "score": 0.1 * n + 0.123456789, "logprob": -1.5e-7, "tokens": 3},
            {"member": "b", "text": f"b says {n} ✓", "score": -2.5, "logprob": None, "tokens": 4, "rank": 1},
        ],
        failed=[{"member": "c", "kind": "timeout", "message": "no answer in 30s"}] if n % 4 == 0 else [],
        degraded_reasons=["fuser_failed"] if n % 7 == 0 else [],
        timings_ms={"members": 12.5 + n, "rank": 3.25, "fuse": 0.0, "total": 1234.0625},
        usage={
            "prompt_tokens": n,
            "completion_tokens": 2 * n,
            "total_tokens": 3 * n,
            "members": {"a": {"prompt_tokens": n, "completion_tokens": n}, "b": {"prompt_tokens": n}},
        },
        finish_reason="stop" if n % 3 else "length",
        request={"model": "tiny", "temperature": 0.7, "max_tokens": 16, "stream": False} if n % 2 == 0 else None,
        retrievable=n % 6 != 5,
    )


def note(n: int, answer_id: str, created_at: float) -> FeedbackRecord:
    return FeedbackRecord(
        id=f"fb{n:030x}",
        answer_id=answer_id,
        created_at=created_at,
        key_id=f"key-{n}",
        preferred="a" if n % 2 else None,
        rejected=["b", "c"] if n % 2 else [],
        reference=f"the reference answer ✓ {n}" if n % 3 else None,
        rating=0.75 if n % 2 else None,
        comment='good, "mostly"' if n % 2 else None,
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    """How many captured log lines contain ``text``."""
    return sum(text in r.getMessage() for r in caplog.records)


async def test_a_store_from_before_routing_is_upgraded_in_place(url: str, tmp_path: Path) -> None:
    """0001's answers stay, 0002 adds `not_called` (SQLite in batch mode: the table is copied)."""
    from alembic import command

    store = Store(StoreConfig(url=url), tmp_path, Metrics())  # makes an SQLite file's directory
    async with engine_on(url, tmp_path) as engine:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(migrate.alembic_config(c), "0001"))
            row = {k: v for k, v in answer(1, time.time()).row().items() if k != "not_called"}
            cols = [sa.column(c.name, c.type) for c in metadata.tables["answers"].columns if c.name in row]
            await conn.execute(sa.table("answers", *cols).insert(), [row])
        assert await revision(engine) == "0001"
    try:
        await store.start()
        old = await store.answer(row["id"])
        assert old is not None and old["output"] == row["output"] and old["not_called"] is None
        routed = dataclasses.replace(answer(2, time.time()), not_called=[{"member": "b", "reason": "routed"}])
        store.put(routed)
        assert (await store.answer(routed.id) or {})["not_called"] == [{"member": "b", "reason": "routed"}]
    finally:
        await store.close()


async def test_migrates_an_empty_database_to_head(url: str, tmp_path: Path) -> None:
    store = Store(StoreConfig(url=url), tmp_path, Metrics())  # makes an SQLite file's directory
    try:
        async with engine_on(url, tmp_path) as engine:
            assert await revision(engine) is None
            await store.start()
            assert store.migrated
            assert HEAD is not None and await revision(engine) == HEAD
            async with engine.connect() as conn:
                tables = await conn.run_sync(lambda c: set(sa.inspect(c).get_table_names()))
            assert tables == {"alembic_version", "answers", "feedback"}
            assert await version_rows(engine) == [HEAD]
    finally:
        await store.close()


async def test_schema_equals_what_the_migrations_create(url: str, tmp_path: Path) -> None:
    async with opened(url, tmp_path) as store, store.engine.connect() as conn:
        diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), metadata))
    assert diff == [], f"service/store/schema.py and the migrations differ: {diff}"


async def test_records_come_back_whole(url: str, tmp_path: Path) -> None:
    metrics = Metrics()
    base = time.time()
    records = [answer(n, base + n / 1000, ensemble="other" if n % 10 == 3 else "tiny") for n in range(600)]
    async with opened(url, tmp_path, metrics, batch_size=50) as store:
        started = time.perf_counter()
        for r in records:
            store.put(r)
        assert time.perf_counter() - started < 0.5  # queued, not written, by put
        # answer() waits for the records queued before it
        assert await store.answer(records[-1].id) == records[-1].row()
        assert await store.answer(records[0].id) == records[0].row()
        assert await store.answer("0" * 64) is None
        assert await store.all_answers() == [r.row() for r in records]
        assert await store.all_answers("other") == [r.row() for r in records if r.ensemble == "other"]
        state = store.state()
        assert state["up"] is True
        assert (state["written"], state["queued"], state["dropped"], state["last_error"]) == (600, 0, {}, None)
    assert sample(metrics, "gateway_store_records_written_total") == 600
    assert sample(metrics, "gateway_store_queue_depth") == 0


async def test_feedback_is_kept_beside_its_answer(url: str, tmp_path: Path) -> None:
    base = time.time()
    a, b, c = answer(1, base), answer(2, base + 1), answer(3, base + 2, ensemble="other")
    async with opened(url, tmp_path) as store:
        for r in (a, b, c):
            store.put(r)
        assert await store.answer(c.id) is not None
        notes = [note(1, a.id, base + 10), note(2, c.id, base + 11), note(3, a.id, base + 12)]
        for n in notes:
            await store.add_feedback(n)
        assert await store.feedback_of(a.id) == [notes[0].row(), notes[2].row()]
        assert await store.feedback_of(b.id) == []
        assert await store.with_feedback() == [
            (a.row(), [notes[0].row(), notes[2].row()]),
            (c.row(), [notes[1].row()]),
        ]
        assert await store.with_feedback("other") == [(c.row(), [notes[1].row()])]
        assert await store.with_feedback("absent") == []
        with pytest.raises(StoreUnavailable):  # the same id twice: the database refuses it
            await store.add_feedback(notes[0])


async def test_delete_removes_an_answer_and_its_feedback(url: str, tmp_path: Path) -> None:
    base = time.time()
    a, b = answer(2, base), answer(4, base + 1)
    async with opened(url, tmp_path) as store:
        store.put(a)
        store.put(b)
        assert (await store.answer(b.id) or {})["retrievable"] is True
        await store.add_feedback(FeedbackRecord(id="fb_del", answer_id=a.id, created_at=base, key_id=None, rating=1.0))
        assert await store.delete(a.id) is True
        assert await store.answer(a.id) is None and await store.feedback_of(a.id) == []
        assert await store.answer(b.id) == b.row()
        assert await store.delete("f" * 32) is False


async def test_expire_deletes_old_answers_and_their_feedback(url: str, tmp_path: Path) -> None:
    # Times from now on (the store's own retention task runs at start with the real clock: it must
    # find nothing to delete), expired with a clock 2 days ahead.
    base = time.time()
    day = 86400.0
    old = [answer(n, base + n) for n in range(3)]
    new = [answer(n, base + 1.5 * day + n) for n in range(3, 6)]
    async with opened(url, tmp_path, retention_days=1) as store:
        for r in old + new:
            store.put(r)
        assert await store.answer(new[-1].id) is not None
        await store.add_feedback(note(1, old[0].id, base + 10))
        await store.add_feedback(note(2, new[0].id, base + 1.5 * day + 10))
        assert await store.expire(base + 0.5 * day) == 0
        assert await store.expire(base + 2 * day) == len(old)
        assert await store.all_answers() == [r.row() for r in new]
        assert await store.feedback_of(old[0].id) == []
        assert await store.with_feedback() == [(new[0].row(), [note(2, new[0].id, base + 1.5 * day + 10).row()])]
        assert await store.expire(base + 2 * day) == 0
    async with opened(url, tmp_path, retention_days=None) as store:
        assert await store.expire(base + 1000 * day) == 0  # kept forever
        assert len(await store.all_answers()) == len(new)


async def test_a_second_store_migrates_nothing(url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="service.store")
    caplog.set_level(logging.INFO, logger="alembic")  # last: the capture's own level, too
    base = time.time()
    first = [answer(n, base + n) for n in range(5)]
    second = [answer(n, base + n) for n in range(5, 10)]
    async with opened(url, tmp_path) as store:
        for r in first:
            store.put(r)
        assert await store.answer(first[-1].id) == first[-1].row()
    assert logged(caplog, "Running upgrade") == REVISIONS  # one line per migration, each run once
    caplog.clear()
    async with opened(url, tmp_path) as again:
        assert again.migrated
        assert logged(caplog, "Running upgrade") == 0
        for r in second:
            again.put(r)
        assert await again.answer(second[-1].id) == second[-1].row()
        assert await again.all_answers() == [r.row() for r in first + second]
        assert again.state()["dropped"] == {}
    assert not [r for r in caplog.records if r.name == "service.store"], caplog.text
    async with engine_on(url, tmp_path) as engine:
        assert await version_rows(engine) == [HEAD]


# --- PostgreSQL: several gateways, outages ---------------------------------------------------------


async def test_replicas_starting_together_migrate_once(postgres: Postgres, tmp_path: Path) -> None:
    url = postgres.create_database()
    stores = [Store(StoreConfig(url=url), tmp_path, Metrics()) for _ in range(4)]
    try:
        await asyncio.gather(*(s.start() for s in stores))  # one migrates, the others wait for it
        assert all(s.migrated for s in stores)
        records = [answer(i, time.time() + i) for i in range(len(stores))]
        for s, r in zip(stores, records, strict=True):
            s.put(r)
        for s in stores:
            assert await s.writer.flush(5)
        assert await stores[0].all_answers() == [r.row() for r in records]
    finally:
        for s in stores:
            await s.close()
    async with engine_on(url, tmp_path) as engine:
        assert await version_rows(engine) == [HEAD]


async def test_writing_survives_a_database_outage(
    postgres: Postgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.store")
    url = postgres.create_database()
    metrics = Metrics()
    base = time.time()
    before = [answer(n, base + n) for n in range(5)]
    during = [answer(n, base + n) for n in range(100, 110)]
    burst = [answer(n, base + n) for n in range(200, 400)]
    after = [answer(n, base + n) for n in range(500, 505)]
    async with opened(url, tmp_path, metrics, queue_size=50, batch_size=50, write_timeout_s=2.0) as store:
        for r in before:
            store.put(r)
        assert await store.answer(before[-1].id) == before[-1].row()
        assert store.state()["up"] is True

        postgres.stop()
        try:
            slowest = 0.0
            for group in (during[:5], during[5:]):  # two batches, each failing
                for r in group:
                    started = time.perf_counter()
                    store.put(r)
                    slowest = max(slowest, time.perf_counter() - started)
                assert await store.writer.flush(10)
            assert slowest < 0.05  # an answer never waits for the store
            # A burst beyond the queue: put still returns at once, the excess is dropped.
            started = time.perf_counter()
            for r in burst:
                store.put(r)
            assert time.perf_counter() - started < 0.5
            assert await store.writer.flush(10)

            state = store.state()
            assert state["up"] is False and state["last_error"] and state["down_since"]
            lost = state["dropped"].get("db_error", 0) + state["dropped"].get("timeout", 0)
            assert lost == len(during) + 50, state
            assert state["dropped"].get("queue_full") == len(burst) - 50, state
            assert set(state["dropped"]) <= {"db_error", "timeout", "queue_full"}, state
            counted = sum(
                sample(metrics, "gateway_store_records_dropped_total", reason=k) for k in ("db_error", "timeout")
            )
            assert counted == lost
            assert sample(metrics, "gateway_store_records_dropped_total", reason="queue_full") == len(burst) - 50
            assert logged(caplog, OUTAGE_LOG) == 1, caplog.text  # three failed batches, one line

            # What a request awaits fails as a 503, not as a driver's exception.
            with pytest.raises(StoreUnavailable):
                await store.answer(before[0].id)
            with pytest.raises(StoreUnavailable):
                await store.add_feedback(note(1, before[0].id, base + 10))
        finally:
            postgres.start()

        # Back: the same store writes again, by itself.
        for r in after:
            store.put(r)
        assert await store.writer.flush(15)
        assert await store.answer(after[-1].id) == after[-1].row()
        assert await store.all_answers() == [r.row() for r in before + after]
        state = store.state()
        assert (state["up"], state["last_error"], state["down_since"]) == (True, None, None)
        assert state["written"] == len(before) + len(after)
        assert logged(caplog, RESUMED_LOG) == 1, caplog.text
        assert logged(caplog, OUTAGE_LOG) == 1, caplog.text
        await store.add_feedback(note(1, before[0].id, base + 10))
        assert len(await store.feedback_of(before[0].id)) == 1
    assert sample(metrics, "gateway_store_records_written_total") == len(before) + len(after)


async def test_a_database_down_at_start_is_migrated_when_it_is_back(
    postgres: Postgres, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.store")
    url = postgres.create_database()
    base = time.time()
    postgres.stop()
    store = Store(StoreConfig(url=url), tmp_path, Metrics())
    try:
        try:
            await store.start()  # the gateway starts without its store
            assert not store.migrated
            assert logged(caplog, "unavailable at start") == 1, caplog.text
            store.put(answer(1, base))
            assert await store.writer.flush(10)
            assert store.state()["dropped"] == {"db_error": 1}
        finally:
            postgres.start()
        store.put(answer(2, base + 1))
        assert await store.writer.flush(10)
        assert await store.answer(answer(2, base + 1).id) == answer(2, base + 1).row()
        assert store.migrated and store.state()["up"] is True
        async with engine_on(url, tmp_path) as engine:
            assert await revision(engine) == HEAD
    finally:
        await store.close()
