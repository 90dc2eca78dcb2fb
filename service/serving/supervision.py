"""Single-node mode's supervision: a launched server that dies is started again, with a backoff
that doubles (reset once a server has run ``RESTART_RESET_S``), and the adapters loaded into it at
run time are loaded again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from service.config import GatewayConfig
from service.ops.launcher import Launcher, RunningServer
from service.telemetry.metrics import Metrics

logger = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_S = 120.0
RESTART_RESET_S = 300.0  # a server that has run this long starts its restart backoff afresh


class Supervisor:
    """``lock``: held while a server is swapped (a reload takes it too); ``restarted``: called with
    the new instance once it is healthy, to prepare what ran on the old one."""

    def __init__(
        self,
        launcher: Launcher,
        metrics: Metrics,
        config: Callable[[], GatewayConfig],
        lock: asyncio.Lock,
        restarted: Callable[[RunningServer], Awaitable[None]],
    ):
        self.launcher = launcher
        self.metrics = metrics
        self._config = config
        self._lock = lock
        self._restarted = restarted
        self._restarts: dict[str, int] = {}

    async def run(self, poll_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(poll_s)
            if not self._config().resilience.restart_servers:
                continue
            for name, srv in list(self.launcher.running.items()):
                code = srv.process.poll()
                if code is None:
                    if time.monotonic() - srv.started > RESTART_RESET_S:
                        self._restarts.pop(name, None)
                    continue
                try:
                    await self.restart(srv, code)
                except Exception:
                    logger.exception("restart of server %s failed; trying again", name)

    async def restart(self, srv: RunningServer, code: int) -> None:
        n = self._restarts.get(srv.name, 0)
        wait = min(RESTART_BACKOFF_MAX_S, self._config().resilience.restart_backoff_s * 2**n)
        self._restarts[srv.name] = n + 1
        logger.error(
            "server %s (pid %d) exited with code %s; restart %d in %.0fs; last log lines:\n%s",
            srv.name,
            srv.process.pid,
            code,
            n + 1,
            wait,
            srv.log_tail(10),
        )
        await asyncio.sleep(wait)
        async with self._lock:
            if self.launcher.running.get(srv.name) is not srv:
                return  # a reload replaced it meanwhile
            self.metrics.server_restarts.labels(srv.name).inc()
            new = await asyncio.to_thread(self.launcher.relaunch, srv)
            try:
                await asyncio.to_thread(self.launcher.wait_healthy, [new])
            except BaseException:
                await asyncio.to_thread(self.launcher.stop_instances, [new])
                raise
            self.launcher.running[srv.name] = new
            await self._restarted(new)
            logger.info("server %s restarted on port %d", srv.name, new.port)
