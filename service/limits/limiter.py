"""Per-key limits: requests per minute, member tokens per minute and concurrent requests for each
client key (``limits.keys`` by name, ``limits.per_key`` for the rest), counted in Redis when
``limits.store`` names one (shared by every replica) or in this process.

A request takes a ``Ticket`` before it is admitted (``admit``, or ``RateLimited``: 429 with
``Retry-After``) and gives it back when it ends (``finish``: its concurrency lease freed, its
members' tokens charged). When Redis fails (an error, or no answer within ``store_timeout_s``)
the replica counts alone on ``LocalCounts`` for ``store_retry_s`` and then tries Redis again; it
says so in the log (once per outage), in ``gateway_limits_store_up`` and on the status page. A
ticket is given back where it was taken.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from service.config import KeyLimits, LimitsConfig
from service.errors import RateLimited
from service.limits.counts import CONCURRENT, REQUESTS, TOKENS, Counts, LocalCounts, RedisCounts
from service.telemetry.metrics import Metrics

logger = logging.getLogger(__name__)

LEASE_MARGIN_S = 30.0  # a concurrency lease outlives its request's deadline by this much at most
_WHAT = {REQUESTS: "requests per minute", TOKENS: "member tokens per minute", CONCURRENT: "concurrent requests"}


def label_of(key_id: str | None) -> str:
    """The metrics' label for a key: its name when it has one, else ``unnamed`` or ``anonymous``."""
    if key_id is None:
        return "anonymous"
    return "unnamed" if key_id.startswith("key-") else key_id


def redacted(url: str) -> str:
    """A store URL without its password, for the status page and the logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + netloc, parts.path, parts.query, parts.fragment))


@dataclass
class Ticket:
    """One request's claim on its key's limits; ``finish`` gives it back."""

    key: str
    label: str
    limits: KeyLimits
    lease: str
    counts: Counts
    done: bool = False


class Limiter:
    """The per-key limits of one gateway process; outlives reloads (``configure``)."""

    def __init__(self, config: LimitsConfig, metrics: Metrics):
        self.metrics = metrics
        self.local = LocalCounts()
        self.config = config
        self.redis: RedisCounts | None = None
        self.down_until = 0.0  # monotonic: Redis is not tried before this
        self.down_since: float | None = None  # wall clock of the outage's start, for the status page
        self.last_error: str | None = None
        self._stats: dict[str, dict[str, Any]] = {}
        self._closing: list[RedisCounts] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.configure(config)

    def configure(self, config: LimitsConfig) -> None:
        """Take a (re)loaded configuration; a changed store URL connects to the new store."""
        old = self.redis
        if config.store != (old.url if old is not None else None):
            self.redis = RedisCounts(config.store, config.store_timeout_s) if config.store else None
            self.down_until, self.down_since, self.last_error = 0.0, None, None
            if old is not None:
                self._closing.append(old)
                try:
                    task = asyncio.get_running_loop().create_task(self._close_old())
                except RuntimeError:  # no loop: closed at ``close``
                    pass
                else:
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        self.config = config
        self.metrics.limits_store_up.set(1 if self.redis is not None else 0)

    def limits_for(self, key_id: str | None) -> KeyLimits | None:
        own = self.config.keys.get(key_id) if key_id is not None else None
        limits = own if own is not None else self.config.per_key
        if limits is None or (limits.requests_per_minute, limits.tokens_per_minute, limits.concurrent) == (None,) * 3:
            return None
        return limits

    # --- the store, and falling back -----------------------------------------------------------

    def _store(self) -> Counts:
        if self.redis is not None and time.monotonic() >= self.down_until:
            return self.redis
        return self.local

    def _failed(self, error: BaseException) -> None:
        self.metrics.limits_store_errors.inc()
        self.metrics.limits_store_up.set(0)
        self.down_until = time.monotonic() + self.config.store_retry_s
        self.last_error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if self.down_since is None:
            self.down_since = time.time()
            logger.warning(
                "the per-key limits' store %s failed (%s): this replica counts alone until it answers again",
                redacted(self.redis.url) if self.redis else "-",
                self.last_error,
            )

    def _recovered(self) -> None:
        if self.down_since is not None:
            logger.warning("the per-key limits' store answers again: counts are shared across replicas")
            self.down_since, self.last_error = None, None
        self.metrics.limits_store_up.set(1)

    async def _call(self, what: str, counts: Counts, *args: Any) -> tuple[bool, Any]:
        """``(True, counts.<what>(*args))``; on Redis bounded by the store timeout, and ``(False,
        None)`` when it failed (this replica then counts alone for a while)."""
        if counts is self.local:
            return True, await getattr(counts, what)(*args)
        try:
            async with asyncio.timeout(self.config.store_timeout_s):
                result = await getattr(counts, what)(*args)
        except Exception as e:  # redis-py's errors, a timeout
            self._failed(e)
            return False, None
        self._recovered()
        return True, result

    # --- a request ------------------------------------------------------------------------------

    def _stat(self, label: str) -> dict[str, Any]:
        s = self._stats.get(label)
        if s is None:
            s = self._stats[label] = {"requests": 0, "limited": {}, "tokens": 0, "in_flight": 0}
        return s

    async def admit(self, key_id: str | None, ttl_s: float) -> Ticket | None:
        """A ticket for one request of ``key_id`` (None when no limit applies to it); raises
        ``RateLimited`` with ``Retry-After`` when one of its limits is reached."""
        label = label_of(key_id)
        limits = self.limits_for(key_id)
        stat = self._stat(label)
        if limits is None:
            stat["requests"] += 1
            self.metrics.key_requests.labels(label).inc()
            return None
        key = key_id or "anonymous"
        lease = uuid.uuid4().hex
        counts = self._store()
        ok, decision = await self._call("admit", counts, key, limits, lease, ttl_s + LEASE_MARGIN_S)
        if not ok:  # Redis failed just now: this replica's own counts decide
            counts = self.local
            decision = await self.local.admit(key, limits, lease, ttl_s + LEASE_MARGIN_S)
        if not decision.allowed:
            assert decision.limit is not None
            stat["limited"][decision.limit] = stat["limited"].get(decision.limit, 0) + 1
            self.metrics.key_limited.labels(label, decision.limit).inc()
            retry = max(1, math.ceil(decision.retry_after_s))
            limit_value = getattr(limits, decision.limit)
            raise RateLimited(
                f"rate limit reached for key {label}: {limit_value} {_WHAT[decision.limit]}; retry in {retry}s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )
        stat["requests"] += 1
        stat["in_flight"] += 1
        self.metrics.key_requests.labels(label).inc()
        self.metrics.key_in_flight.labels(label).inc()
        return Ticket(key, label, limits, lease, counts)

    async def finish(self, ticket: Ticket, tokens: int) -> None:
        """Give the ticket back: its lease freed, ``tokens`` (the members') charged. Once only."""
        if ticket.done:
            return
        ticket.done = True
        stat = self._stat(ticket.label)
        stat["in_flight"] -= 1
        stat["tokens"] += tokens
        self.metrics.key_in_flight.labels(ticket.label).dec()
        self.metrics.key_tokens.labels(ticket.label).inc(tokens)
        limits = ticket.limits
        charge = tokens > 0 and limits.tokens_per_minute is not None
        if not charge and limits.concurrent is None:
            return
        store = self._store()
        if store is ticket.counts:  # one call: the lease freed, the tokens charged
            ok, _ = await self._call("finish", store, ticket.key, limits, ticket.lease, tokens)
            if not ok and charge:
                await self.local.charge(ticket.key, limits, tokens)
            return
        # The store changed while the request ran (Redis failed, or came back): the lease is freed
        # where it was taken, the tokens charged where counting happens now. A lease Redis could not
        # free expires with its request's deadline (LEASE_MARGIN_S).
        if limits.concurrent is not None:
            await self._call("release", ticket.counts, ticket.key, ticket.lease)
        if charge:
            ok, _ = await self._call("charge", store, ticket.key, limits, tokens)
            if not ok:
                await self.local.charge(ticket.key, limits, tokens)

    def count_tokens(self, label: str, tokens: int) -> None:
        """Member tokens of a request no limit applied to (metrics and status only)."""
        self._stat(label)["tokens"] += tokens
        self.metrics.key_tokens.labels(label).inc(tokens)

    # --- what operators see ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For /status.json: where the counts live, whether the store answers, each key's figures."""
        store: dict[str, Any] = {"kind": "redis" if self.redis is not None else "process"}
        if self.redis is not None:
            store["url"] = redacted(self.redis.url)
            store["shared"] = self.down_since is None
            if self.down_since is not None:
                store["down_since"] = self.down_since
                store["error"] = self.last_error
        keys: dict[str, Any] = {}
        for label, stat in sorted(self._stats.items()):
            limits = self.config.keys.get(label, self.config.per_key)
            keys[label] = {**stat, "limited": dict(stat["limited"])}
            if limits is not None:
                keys[label]["limits"] = limits.model_dump(exclude_none=True)
        return {"store": store, "keys": keys}

    async def _close_old(self) -> None:
        old, self._closing = self._closing, []
        for counts in old:
            try:
                await counts.close()
            except Exception as e:  # closing a connection to a server that is gone
                logger.debug("closing the limits' old store: %s", e)

    async def close(self) -> None:
        for counts in [*self._closing, *([self.redis] if self.redis is not None else [])]:
            try:
                await counts.close()
            except Exception as e:  # closing a connection to a server that is gone
                logger.debug("closing the limits' store: %s", e)
        self._closing.clear()
