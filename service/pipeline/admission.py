"""Bounded admission: at most ``max_in_flight`` requests run, ``max_queue`` more wait, and the
rest are shed at once with 429 and ``Retry-After``; after SIGTERM new requests get 503."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from service.config import LimitsConfig
from service.errors import Overloaded, ShuttingDown
from service.telemetry.metrics import Metrics


class Admission:
    """At most ``max_in_flight`` requests run; ``max_queue`` more wait; the rest are shed at once."""

    def __init__(self, limits: LimitsConfig, metrics: Metrics):
        self.limits = limits
        self.metrics = metrics
        self.running = 0
        self.draining = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def configure(self, limits: LimitsConfig) -> None:
        self.limits = limits
        self._wake()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _shed(self, reason: str, message: str) -> Overloaded:
        self.metrics.shed.labels(reason).inc()
        return Overloaded(message, code="overloaded", headers={"Retry-After": str(self.limits.retry_after_s)})

    async def acquire(self, timeout_s: float) -> None:
        """Take a slot, waiting in the queue for at most ``timeout_s``; raise ``Overloaded`` if shed."""
        if self.draining:
            retry = {"Retry-After": str(self.limits.retry_after_s)}
            raise ShuttingDown("the gateway is shutting down", code="shutting_down", headers=retry)
        if self.running < self.limits.max_in_flight and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.limits.max_queue:
            raise self._shed(
                "queue_full",
                f"overloaded: {self.running} requests in flight and {len(self._waiters)} queued",
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.metrics.queue_depth.set(len(self._waiters))
        try:
            async with asyncio.timeout(min(timeout_s, self.limits.queue_timeout_s)):
                await waiter
        except TimeoutError:
            raise self._shed("queue_timeout", "overloaded: no slot came free in time") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over as we were cancelled: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            self.metrics.queue_depth.set(len(self._waiters))

    def release(self) -> None:
        self.running -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.running < self.limits.max_in_flight:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.running += 1
                waiter.set_result(None)
        self.metrics.queue_depth.set(len(self._waiters))
