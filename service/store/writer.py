"""Records written off the request path: a bounded queue, batches on their own task. Nothing here
can fail or slow an answer: a full queue, a slow or absent database drop records (counted by
reason), an outage is logged once when it starts and once when writing resumes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from service.telemetry.metrics import Metrics

logger = logging.getLogger("service.store")

Row = Mapping[str, Any]
BACKOFF_S = (0.25, 0.5, 1.0, 2.0, 5.0)  # waits after consecutive failed batches
# After a batch's first record, wait this long for more: under load a transaction per few records
# cost the gateway ~20% of its requests/s (bench --parts gateway); batches of tens cost less.
LINGER_S = 0.02


class Writer:
    """``put`` never waits; ``run`` (a task) writes batches with ``write``; ``flush`` waits until
    what was put before it has been written or dropped."""

    def __init__(
        self,
        write: Callable[[list[Row]], Awaitable[None]],
        metrics: Metrics,
        *,
        queue_size: int,
        batch_size: int,
        timeout_s: float,
    ):
        self._write = write
        self.metrics = metrics
        self.queue: asyncio.Queue[Row] = asyncio.Queue(queue_size)
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.put_count = 0  # records accepted into the queue
        self.done_count = 0  # of them, written or dropped
        self.written = 0
        self.dropped: dict[str, int] = {}
        self.up: bool | None = None  # None until the first batch
        self.last_error: str | None = None
        self.down_since: float | None = None
        self._failures = 0
        self._progress = asyncio.Event()

    def put(self, row: Row) -> None:
        try:
            self.queue.put_nowait(row)
        except asyncio.QueueFull:
            self._drop("queue_full", 1)
            return
        self.put_count += 1
        self.metrics.store_queue_depth.set(self.queue.qsize())

    def _drop(self, reason: str, n: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.metrics.store_dropped.labels(reason).inc(n)

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            if self.queue.qsize() < self.batch_size - 1:
                await asyncio.sleep(LINGER_S)
            while len(batch) < self.batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self.metrics.store_queue_depth.set(self.queue.qsize())
            ok = await self._batch(batch)
            self.done_count += len(batch)
            self._progress.set()
            if not ok:
                await asyncio.sleep(BACKOFF_S[min(self._failures, len(BACKOFF_S)) - 1])

    async def _batch(self, batch: list[Row]) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._write(batch)
        except Exception as e:  # any database failure: the batch is dropped, the gateway goes on
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # a cancellation a library turned into another error
                raise asyncio.CancelledError from e
            reason = "timeout" if isinstance(e, TimeoutError) else "db_error"
            self._drop(reason, len(batch))
            self._failures += 1
            self.last_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if self.up is not False:
                self.down_since = time.time()
                logger.warning("store unavailable, records are dropped until it is back: %s", self.last_error)
            self.up = False
            return False
        self.written += len(batch)
        self.metrics.store_written.inc(len(batch))
        if self.up is False:
            logger.warning("store writes resumed after %.1fs", time.time() - (self.down_since or time.time()))
        self.up, self._failures, self.down_since = True, 0, None
        return True

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every record put before this call is written or dropped; False on timeout."""
        target = self.put_count
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.done_count < target:
                    self._progress.clear()
                    await self._progress.wait()
        return self.done_count >= target

    async def drain(self, timeout_s: float) -> int:
        """At shutdown: write what is queued, for at most ``timeout_s``; the records left are dropped."""
        await self.flush(timeout_s)
        left = self.queue.qsize()
        if left:
            self._drop("shutdown", left)
        return left
