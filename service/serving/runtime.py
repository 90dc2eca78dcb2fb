"""The running configuration, and its reload without a restart.

A reload validates the new file in full, starts what is new (servers, members, adapters, models)
while the old configuration keeps serving, swaps in one step, and cleans up what the old one
alone used only once its requests have finished (``reload``). If anything fails before the swap,
what was started for the new configuration is stopped again and the old one serves on. The
members' health is ``probes``' job, restarting dead servers ``supervision``'s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from service.config import GatewayConfig, load_config
from service.errors import ConfigError, NotReadyError
from service.members.breakers import Guards
from service.members.gate import ClassGate
from service.members.http import make_http_client
from service.members.openai import LoRAMember
from service.members.soft_prompt import BaseModelCache
from service.models.build.materialize import materialize
from service.ops.launcher import Launcher, RunningServer
from service.pipeline.admission import Admission
from service.pipeline.pipeline import Lasting, Pipeline
from service.serving import reload
from service.serving.build import Components, build_pipeline, prepare_members
from service.serving.probes import MemberHealth, warnings
from service.serving.supervision import Supervisor
from service.telemetry.book import StatusBook
from service.telemetry.metrics import Metrics

logger = logging.getLogger(__name__)


class Runtime:
    """Owns the current pipeline and everything behind it: HTTP client, servers, models."""

    def __init__(
        self,
        config: GatewayConfig,
        metrics: Metrics,
        *,
        launcher: Launcher | None = None,
        config_path: Path | None = None,
        parts: Components | None = None,
        members_checked: bool = False,
        host: str | None = None,
    ):
        self.config = config
        self.started_at = time.time()
        self.host = host
        self._members_checked = members_checked or bool(parts and parts.members)
        self.metrics = metrics
        self.launcher = launcher
        self.config_path = config_path
        self.parts = parts or Components()
        self.bases = BaseModelCache()
        self.gates: dict[str, ClassGate] = {}
        self.client: httpx.AsyncClient | None = None
        self.pipeline: Pipeline | None = None
        self.reloads = 0
        self.lasting = Lasting.new(config, metrics)
        self.health = MemberHealth(self.guards, lambda: self.pipeline, lambda: self.config)
        self._lock = asyncio.Lock()  # one reload or server restart at a time
        self._cleanups: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []

    @property
    def guards(self) -> Guards:
        return self.lasting.guards

    @property
    def admission(self) -> Admission:
        return self.lasting.admission

    @property
    def status(self) -> StatusBook:
        return self.lasting.status

    def warnings(self) -> list[str]:
        """What an operator should know about this configuration (``probes.warnings``)."""
        return warnings(self.config, self.host)

    async def probe_members(self) -> dict[str, str | None]:
        """Each member's health (None = up), as /ready and the status page show it."""
        return await self.health.probe()

    def current(self) -> Pipeline:
        """The pipeline requests run on now; ``NotReadyError`` while the models still load."""
        if self.pipeline is None:
            raise NotReadyError("the gateway is still loading its models")
        return self.pipeline

    def server_urls(self) -> dict[str, str]:
        return self.launcher.base_urls() if self.launcher is not None else {}

    async def start(self) -> Pipeline:
        if self.lasting.store is not None:
            await self.lasting.store.start()
        if not self._members_checked:
            self.config = await asyncio.to_thread(materialize, self.config)
        self.client = make_http_client(self.config.max_connections, self.config.member_http)
        try:
            built = await build_pipeline(
                self.config, self.lasting, self.client, self.server_urls(), self.parts, self.bases, gates=self.gates
            )
        except BaseException:
            await self.close()
            raise
        self.pipeline = built.pipeline
        self._configure_guards(self.config, built.pipeline)
        self._background = [asyncio.create_task(self.health.run())]
        if self.launcher is not None:
            supervisor = Supervisor(self.launcher, self.metrics, lambda: self.config, self._lock, self._adopt)
            self._background.append(asyncio.create_task(supervisor.run()))
        return built.pipeline

    def _configure_guards(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        res = config.resilience
        self.guards.configure(list(pipeline.members), res.breaker, res.health_checks)
        self.admission.configure(config.limits)
        if self.lasting.limiter is not None:
            self.lasting.limiter.configure(config.limits)

    async def _adopt(self, new: RunningServer) -> None:
        """A restarted server: the adapters loaded at run time are gone with the old process."""
        pipeline = self.pipeline
        if pipeline is None:
            return
        again = {
            name: m
            for name, m in pipeline.members.items()
            if isinstance(m, LoRAMember) and m.base_url == new.base_url.rstrip("/")
        }
        failed = await prepare_members(again)
        for name in again:
            if name in failed:
                pipeline.unavailable[name] = failed[name]
            else:
                pipeline.unavailable.pop(name, None)
            self.metrics.member_available.labels(name).set(0 if name in failed else 1)

    async def close(self) -> None:
        for task in [*self._cleanups, *self._background]:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
        if self.pipeline is not None:
            for ranker in self.pipeline.rankers.values():
                ranker.close()
            for fuser in self.pipeline.fusers.values():
                fuser.close()
            for router in self.pipeline.routers.values():
                router.close()
        self.bases.close()
        if self.lasting.limiter is not None:
            await self.lasting.limiter.close()
        if self.lasting.store is not None:
            await self.lasting.store.close()
        # Runtime-loaded adapters stay loaded: other gateway replicas may share the server.
        # They are unloaded only when their member leaves the configuration.

    async def reload_from_file(self) -> dict[str, Any]:
        if self.config_path is None:
            raise ConfigError("the gateway was not started from a config file; nothing to reload")
        config = await asyncio.to_thread(load_config, self.config_path)
        return await self.reload(config)

    async def reload(self, new: GatewayConfig) -> dict[str, Any]:
        """Swap to ``new``; raise (and keep the old configuration) if it cannot serve."""
        async with self._lock:
            assert self.pipeline is not None and self.client is not None
            start = time.perf_counter()
            old = self.pipeline
            if not self.parts.members:
                # Merges and soups the new file asks for are built now, while the old configuration serves.
                new = await asyncio.to_thread(materialize, new)
            use, started, retired = await reload.servers_for(self.launcher, new)
            urls = {name: srv.base_url for name, srv in use.items()}
            await reload.unload_replaced_adapters(old, new, urls)
            try:
                built = await build_pipeline(
                    new, self.lasting, self.client, urls, self.parts, self.bases, previous=old, gates=self.gates
                )
            except BaseException:
                if started and self.launcher is not None:
                    await asyncio.to_thread(self.launcher.stop_instances, started)
                raise
            # The swap: requests from now on run on the new pipeline.
            self.pipeline = built.pipeline
            self.config = new
            self._configure_guards(new, built.pipeline)
            if self.launcher is not None:
                self.launcher.running = dict(use)
            self.reloads += 1
            summary = reload.summary(old, built, started, retired)
            summary["took_ms"] = round((time.perf_counter() - start) * 1000, 1)
            if new.store != old.config.store:
                summary["restart_needed"] = ["store"]  # the store is opened once, at start-up
            task = asyncio.create_task(reload.retire(old, built.pipeline, retired, self.launcher))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            logger.info("configuration reloaded", extra={"changes": summary})
            return summary
