"""What the runtime knows of its members' health, and what it warns an operator about.

``MemberHealth`` answers /ready and the status page (the last active round, or a fresh one when
that is older than ``READY_CACHE_S``) and runs the active health checks every
``resilience.health_checks.interval_s``; a member whose checks fail has its circuit opened
(``service.members.breakers``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable

from service.config import GatewayConfig
from service.members.breakers import OPEN, Guards
from service.pipeline.pipeline import Pipeline

logger = logging.getLogger(__name__)

READY_CACHE_S = 2.0  # /ready and /status.json reuse a health round this recent


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def warnings(config: GatewayConfig, host: str | None) -> list[str]:
    """What an operator should know about this configuration: shown at start-up, on the status
    page and in /status.json."""
    out = []
    if host is not None and not is_loopback(host) and not config.auth.client_keys():
        out.append(
            f"no client API key is configured and the gateway listens on {host}: anyone who can "
            "reach it can use it (set auth.api_keys_env, default GATEWAY_API_KEYS)"
        )
    for m in config.members:
        if m.samples > 1 and m.sampling.temperature == 0:
            out.append(
                f"member {m.name} gives {m.samples} samples at temperature 0: greedy samples are identical "
                "unless a request sets a temperature"
            )
    return out


class MemberHealth:
    """The members' health as the running pipeline (``pipeline()``) sees it."""

    def __init__(self, guards: Guards, pipeline: Callable[[], Pipeline | None], config: Callable[[], GatewayConfig]):
        self.guards = guards
        self._pipeline = pipeline
        self._config = config
        self._lock = asyncio.Lock()

    async def probe(self) -> dict[str, str | None]:
        """Each member's health (None = up): the last active check, or a fresh one when that is
        older than a couple of seconds. A member whose circuit is open counts as down."""
        pipeline = self._pipeline()
        if pipeline is None:
            return {}
        guards = self.guards
        async with self._lock:
            if guards.clock() - guards.last_round > READY_CACHE_S or set(guards.health) != set(pipeline.members):
                await guards.check(pipeline.members, pipeline.unavailable)
        out: dict[str, str | None] = {}
        for name in pipeline.members:
            h = guards.health.get(name)
            out[name] = h.error if h is not None and h.error else None
            if out[name] is None and guards.breaker(name).state == OPEN:
                out[name] = f"circuit_open: {guards.breaker(name).reason}"
        return out

    async def run(self) -> None:
        """Active health checks, every ``interval_s``; they open the circuit of a member that fails them."""
        while True:
            interval = self._config().resilience.health_checks.interval_s
            pipeline = self._pipeline()
            if interval > 0 and pipeline is not None:
                try:
                    async with self._lock:
                        await self.guards.check(pipeline.members, pipeline.unavailable)
                except Exception:
                    logger.exception("health check round failed")
            await asyncio.sleep(interval or 1.0)
