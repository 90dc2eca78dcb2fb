"""The store's writer with a fake database: records never wait and never fail an answer; a full
queue, a failing or slow database drop them, counted by reason; an outage is logged once, and
writing resumes by itself."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from service.store import writer as writer_module
from service.store.writer import Writer
from service.telemetry.metrics import Metrics
from tests.fakes import sample


class Database:
    def __init__(self) -> None:
        self.rows: list[Mapping[str, Any]] = []
        self.batches: list[int] = []
        self.down = False
        self.slow_s = 0.0

    async def write(self, rows: list[Mapping[str, Any]]) -> None:
        await asyncio.sleep(self.slow_s)
        if self.down:
            raise ConnectionRefusedError("connection refused")
        self.batches.append(len(rows))
        self.rows += rows


def make(db: Database, metrics: Metrics, queue: int = 100, batch: int = 10, timeout: float = 1.0) -> Writer:
    return Writer(db.write, metrics, queue_size=queue, batch_size=batch, timeout_s=timeout)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "BACKOFF_S", (0.01,))


async def test_records_are_written_in_batches_and_flush_waits_for_them() -> None:
    db, metrics = Database(), Metrics()
    w = make(db, metrics, batch=10)
    for i in range(25):
        w.put({"i": i})
    assert db.rows == []  # put never waits for the database
    task = asyncio.create_task(w.run())
    assert await w.flush(2.0)
    task.cancel()
    assert [r["i"] for r in db.rows] == list(range(25))
    assert db.batches == [10, 10, 5]
    assert w.written == 25 and sample(metrics, "gateway_store_records_written_total") == 25
    assert sample(metrics, "gateway_store_queue_depth") == 0


async def test_a_full_queue_drops_records_and_counts_them() -> None:
    db, metrics = Database(), Metrics()
    w = make(db, metrics, queue=5)
    for i in range(8):
        w.put({"i": i})
    assert w.dropped == {"queue_full": 3}
    assert sample(metrics, "gateway_store_records_dropped_total", reason="queue_full") == 3
    task = asyncio.create_task(w.run())
    assert await w.flush(2.0)
    task.cancel()
    assert len(db.rows) == 5


async def test_an_outage_drops_counts_logs_once_and_writing_resumes(caplog: pytest.LogCaptureFixture) -> None:
    db, metrics = Database(), Metrics()
    w = make(db, metrics, batch=1)
    task = asyncio.create_task(w.run())
    db.down = True
    with caplog.at_level(logging.WARNING, logger="service.store"):
        for i in range(3):
            w.put({"i": i})
            assert await w.flush(2.0)
        assert w.up is False and w.last_error is not None and "refused" in w.last_error
        db.down = False
        w.put({"i": 3})
        assert await w.flush(2.0)
    task.cancel()
    assert [r["i"] for r in db.rows] == [3] and w.up is True
    assert sample(metrics, "gateway_store_records_dropped_total", reason="db_error") == 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("store unavailable" in m for m in messages) == 1
    assert sum("store writes resumed" in m for m in messages) == 1


async def test_a_slow_database_times_out_and_the_batch_is_dropped() -> None:
    db, metrics = Database(), Metrics()
    db.slow_s = 0.5
    w = make(db, metrics, timeout=0.05)
    task = asyncio.create_task(w.run())
    w.put({"i": 0})
    assert await w.flush(2.0)
    task.cancel()
    assert w.dropped == {"timeout": 1} and db.rows == []


async def test_flush_gives_up_at_its_timeout_and_drain_counts_what_is_left() -> None:
    db, metrics = Database(), Metrics()
    w = make(db, metrics)
    w.put({"i": 0})
    assert not await w.flush(0.05)  # no writer task: nothing is written
    assert await w.drain(0.05) == 1
    assert w.dropped == {"shutdown": 1}
