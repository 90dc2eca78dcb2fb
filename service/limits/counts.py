"""The counts behind per-key limits, in this process (``LocalCounts``) or in Redis (``RedisCounts``),
with one algorithm in both.

Requests and tokens per minute are leaky buckets (GCRA, the generic cell rate algorithm, kept as a
level rather than a time so that a reloaded limit applies at once): each key's level drains at
``limit / 60`` per second; a request adds 1 to its requests' level and is refused when that would
pass the limit, so a key may burst one minute's requests and then one every ``60 / rpm`` s, and its
``Retry-After`` is exact: when the request would fit. Tokens are known only when the answer is
done: they are added then, and a request is refused while the level is over the limit (more than a
minute's tokens spent), until it has drained to the limit. Concurrency is a set of leases, each with
an expiry (the request's deadline and a margin), so a replica that died holding leases frees them.

In Redis each check is one Lua script (atomic, on the server's clock, so replicas agree); keys carry
the client key's id in braces (one Redis Cluster slot per client key).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.config import KeyLimits

WINDOW_S = 60.0

REQUESTS = "requests_per_minute"
TOKENS = "tokens_per_minute"
CONCURRENT = "concurrent"
_CODES = {1: CONCURRENT, 2: REQUESTS, 3: TOKENS}


@dataclass(frozen=True)
class Decision:
    """Allowed, or refused by ``limit`` (one of ``REQUESTS``, ``TOKENS``, ``CONCURRENT``) until
    ``retry_after_s`` from now."""

    allowed: bool
    limit: str | None = None
    retry_after_s: float = 0.0


class Counts(Protocol):
    async def admit(self, key: str, limits: KeyLimits, lease: str, lease_ttl_s: float) -> Decision: ...

    async def release(self, key: str, lease: str) -> None: ...

    async def charge(self, key: str, limits: KeyLimits, tokens: int) -> None: ...

    async def finish(self, key: str, limits: KeyLimits, lease: str, tokens: int) -> None:
        """``release`` and ``charge`` at once (one round trip to Redis)."""


@dataclass
class _Bucket:
    level: float = 0.0
    at: float = 0.0

    def drained(self, now: float, per_minute: int) -> float:
        """The level now: what was in it, less what drained since ``at`` at ``per_minute / 60`` per second."""
        return max(0.0, self.level - (now - self.at) * per_minute / WINDOW_S)


@dataclass
class _Key:
    requests: _Bucket = field(default_factory=_Bucket)
    tokens: _Bucket = field(default_factory=_Bucket)
    leases: dict[str, float] = field(default_factory=dict)  # lease -> expiry


class LocalCounts:
    """The counts of this process (one replica, or every replica on its own while Redis is away)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._keys: dict[str, _Key] = {}

    def _key(self, key: str) -> _Key:
        k = self._keys.get(key)
        if k is None:
            k = self._keys[key] = _Key()
        return k

    def in_flight(self, key: str) -> int:
        k = self._keys.get(key)
        return 0 if k is None else len(k.leases)

    async def admit(self, key: str, limits: KeyLimits, lease: str, lease_ttl_s: float) -> Decision:
        now = self.clock()
        k = self._key(key)
        if limits.concurrent is not None:
            for name, expiry in list(k.leases.items()):
                if expiry <= now:
                    del k.leases[name]
            if len(k.leases) >= limits.concurrent:
                return Decision(False, CONCURRENT, 1.0)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        requests = k.requests.drained(now, rpm) if rpm is not None else 0.0
        if rpm is not None and requests + 1 > rpm:
            return Decision(False, REQUESTS, (requests + 1 - rpm) * WINDOW_S / rpm)
        if tpm is not None:
            tokens = k.tokens.drained(now, tpm)
            if tokens > tpm:
                return Decision(False, TOKENS, (tokens - tpm) * WINDOW_S / tpm)
        if rpm is not None:
            k.requests.level, k.requests.at = requests + 1, now
        if limits.concurrent is not None:
            k.leases[lease] = now + lease_ttl_s
        return Decision(True)

    async def release(self, key: str, lease: str) -> None:
        k = self._keys.get(key)
        if k is not None:
            k.leases.pop(lease, None)

    async def finish(self, key: str, limits: KeyLimits, lease: str, tokens: int) -> None:
        await self.release(key, lease)
        await self.charge(key, limits, tokens)

    async def charge(self, key: str, limits: KeyLimits, tokens: int) -> None:
        if limits.tokens_per_minute is None or tokens <= 0:
            return
        now = self.clock()
        bucket = self._key(key).tokens
        bucket.level, bucket.at = bucket.drained(now, limits.tokens_per_minute) + tokens, now


# Times in the scripts are milliseconds of the Redis server's clock; a bucket is a hash {level, at}.
_LUA_HEAD = """
local t = redis.call('TIME'); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local function drained(key, per_minute)
  local b = redis.call('HMGET', key, 'level', 'at')
  local level, at = tonumber(b[1] or '0'), tonumber(b[2] or now)
  return math.max(0, level - (now - at) * per_minute / 60000)
end
local function keep(key, level, per_minute)
  redis.call('HSET', key, 'level', tostring(level), 'at', now)
  redis.call('PEXPIRE', key, math.ceil(level * 60000 / per_minute) + 1000)
end
"""

# KEYS: leases (zset), requests' bucket, tokens' bucket. ARGV: concurrent, rpm, tpm (0: none), lease, ttl ms.
_ADMIT = (
    _LUA_HEAD
    + """
local conc, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= conc then return {0, 1, 1000} end
end
local requests = 0
if rpm > 0 then
  requests = drained(KEYS[2], rpm)
  if requests + 1 > rpm then return {0, 2, math.ceil((requests + 1 - rpm) * 60000 / rpm)} end
end
if tpm > 0 then
  local tokens = drained(KEYS[3], tpm)
  if tokens > tpm then return {0, 3, math.ceil((tokens - tpm) * 60000 / tpm)} end
end
if rpm > 0 then keep(KEYS[2], requests + 1, rpm) end
if conc > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]) + 1000)
end
return {1, 0, 0}
"""
)

# KEYS: tokens' bucket. ARGV: tokens, tpm.
_CHARGE = (
    _LUA_HEAD
    + """
local tpm = tonumber(ARGV[2])
keep(KEYS[1], drained(KEYS[1], tpm) + tonumber(ARGV[1]), tpm)
return 1
"""
)

# KEYS: leases (zset), tokens' bucket. ARGV: lease ('' for none), tokens, tpm (0: none).
_FINISH = (
    _LUA_HEAD
    + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local tokens, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and tokens > 0 then keep(KEYS[2], drained(KEYS[2], tpm) + tokens, tpm) end
return 1
"""
)


class RedisCounts:
    """The counts in Redis, shared by every replica that names the same server. Each call raises
    what redis-py raises when the server cannot answer (the limiter falls back on ``LocalCounts``)."""

    def __init__(self, url: str, timeout_s: float, prefix: str = "ensemble-gateway:limits"):
        import redis.asyncio as redis

        self.url = url
        self.prefix = prefix
        self.client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False
        )
        self._admit = self.client.register_script(_ADMIT)
        self._charge = self.client.register_script(_CHARGE)
        self._finish = self.client.register_script(_FINISH)

    def _keys(self, key: str) -> list[str]:
        base = f"{self.prefix}:{{{key}}}"
        return [f"{base}:leases", f"{base}:requests", f"{base}:tokens"]

    async def admit(self, key: str, limits: KeyLimits, lease: str, lease_ttl_s: float) -> Decision:
        args: list[str | int] = [limits.concurrent or 0, limits.requests_per_minute or 0, limits.tokens_per_minute or 0]
        args += [lease, math.ceil(lease_ttl_s * 1000)]
        allowed, code, retry_ms = await self._admit(keys=self._keys(key), args=args)
        if int(allowed):
            return Decision(True)
        return Decision(False, _CODES[int(code)], int(retry_ms) / 1000)

    async def release(self, key: str, lease: str) -> None:
        await self.client.zrem(self._keys(key)[0], lease)

    async def charge(self, key: str, limits: KeyLimits, tokens: int) -> None:
        if limits.tokens_per_minute is None or tokens <= 0:
            return
        await self._charge(keys=[self._keys(key)[2]], args=[tokens, limits.tokens_per_minute])

    async def finish(self, key: str, limits: KeyLimits, lease: str, tokens: int) -> None:
        keys = self._keys(key)
        lease_arg = lease if limits.concurrent is not None else ""
        await self._finish(keys=[keys[0], keys[2]], args=[lease_arg, tokens, limits.tokens_per_minute or 0])

    async def ping(self) -> None:
        await self.client.ping()

    async def close(self) -> None:
        await self.client.aclose()
