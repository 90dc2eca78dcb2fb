"""The running configuration, and its reload without a restart.

A reload validates the new file in full, starts what is new (servers, members, adapters, models)
while the old configuration keeps serving, swaps in one step, and cleans up what the old one
alone used only once its requests have finished. If anything fails before the swap, what was
started for the new configuration is stopped again and the old one serves on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from service.adapters import BaseModelCache, check_members, startup_lora_args
from service.build import Built, Components, build_pipeline
from service.config import GatewayConfig, load_config
from service.errors import ConfigError
from service.gate import ClassGate
from service.launcher import Launcher, RunningServer
from service.members import LoRAMember, Member, MemberFailure, make_http_client
from service.metrics import Metrics
from service.pipeline import Pipeline

logger = logging.getLogger(__name__)

DRAIN_GRACE_S = 30.0


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
    ):
        self.config = config
        self.metrics = metrics
        self.launcher = launcher
        self.config_path = config_path
        self.parts = parts or Components()
        self.bases = BaseModelCache()
        self.gates: dict[str, ClassGate] = {}
        self.client: httpx.AsyncClient | None = None
        self.pipeline: Pipeline | None = None
        self.reloads = 0
        self._lock = asyncio.Lock()
        self._cleanups: set[asyncio.Task[None]] = set()

    def server_urls(self) -> dict[str, str]:
        return self.launcher.base_urls() if self.launcher is not None else {}

    async def start(self) -> Pipeline:
        self.client = make_http_client(self.config.max_connections)
        try:
            built = await build_pipeline(
                self.config, self.metrics, self.client, self.server_urls(), self.parts, self.bases, gates=self.gates
            )
        except BaseException:
            await self.close()
            raise
        self.pipeline = built.pipeline
        return built.pipeline

    async def close(self) -> None:
        for task in list(self._cleanups):
            task.cancel()
        if self.client is not None:
            await self.client.aclose()
        if self.pipeline is not None:
            for ranker in self.pipeline.rankers.values():
                ranker.close()
            for fuser in self.pipeline.fusers.values():
                fuser.close()
        self.bases.close()
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
            await asyncio.to_thread(check_members, new)
            use, started, retired = await self._servers_for(new)
            urls = {name: srv.base_url for name, srv in use.items()}
            await self._unload_replaced_adapters(old, new, urls)
            try:
                built = await build_pipeline(
                    new, self.metrics, self.client, urls, self.parts, self.bases, previous=old, gates=self.gates
                )
            except BaseException:
                if started and self.launcher is not None:
                    await asyncio.to_thread(self.launcher.stop_instances, started)
                raise
            # The swap: requests from now on run on the new pipeline.
            self.pipeline = built.pipeline
            self.config = new
            if self.launcher is not None:
                self.launcher.running = dict(use)
            self.reloads += 1
            summary = _summary(old, built, started, retired)
            summary["took_ms"] = round((time.perf_counter() - start) * 1000, 1)
            task = asyncio.create_task(self._retire(old, built.pipeline, retired))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            logger.info("configuration reloaded", extra={"changes": summary})
            return summary

    async def _servers_for(
        self, new: GatewayConfig
    ) -> tuple[dict[str, RunningServer], list[RunningServer], list[RunningServer]]:
        """The server instance each name will use, those started for it, and those retired."""
        if self.launcher is None:
            if new.servers:
                raise ConfigError("servers: launching servers needs single-node mode (ensemble-gateway serve)")
            return {}, [], []
        launcher = self.launcher
        extra = startup_lora_args(new)
        use: dict[str, RunningServer] = {}
        started: list[RunningServer] = []
        for cfg in new.servers:
            current = launcher.running.get(cfg.name)
            if current is not None and current.same_as(cfg, extra.get(cfg.name, [])):
                use[cfg.name] = current
            else:
                srv = launcher.launch(cfg, extra.get(cfg.name, []))
                use[cfg.name] = srv
                started.append(srv)
        try:
            await asyncio.to_thread(launcher.wait_healthy, started)
        except BaseException:
            await asyncio.to_thread(launcher.stop_instances, started)
            raise
        retired = [srv for name, srv in launcher.running.items() if use.get(name) is not srv]
        return use, started, retired

    async def _unload_replaced_adapters(self, old: Pipeline, new: GatewayConfig, urls: dict[str, str]) -> None:
        """A LoRA member changed under the same name on the same server must be unloaded first:
        the server would otherwise keep serving the old weights under that name."""
        for m in new.members:
            prev = old.members.get(m.name)
            prev_cfg = next((o for o in old.config.members if o.name == m.name), None)
            if not isinstance(prev, LoRAMember) or prev_cfg is None or prev_cfg == m or m.kind != "lora":
                continue
            if (
                prev.base_url == urls.get(m.server or "", m.endpoint or "").rstrip("/")
                and prev.config.load == "runtime"
            ):
                await _release(prev)

    async def _retire(self, old: Pipeline, new: Pipeline, retired: list[RunningServer]) -> None:
        """Once the old pipeline's requests are done: release what only it used."""
        longest = max((e.deadline_s for e in old.config.ensembles.values()), default=60.0)
        if not await old.wait_idle(longest + DRAIN_GRACE_S):
            logger.warning("old configuration still busy after %.0fs; cleaning up anyway", longest + DRAIN_GRACE_S)
        kept: set[int] = {id(m) for m in new.members.values()}
        for member in old.members.values():
            if id(member) in kept:
                continue
            if isinstance(member, LoRAMember) and _adapter_still_served(member, new):
                continue
            await _release(member)
        for name, ranker in old.rankers.items():
            if new.rankers.get(name) is not ranker:
                ranker.close()
        for name, fuser in old.fusers.items():
            if new.fusers.get(name) is not fuser:
                fuser.close()
        if retired and self.launcher is not None:
            await asyncio.to_thread(self.launcher.stop_instances, retired)


def _adapter_still_served(member: LoRAMember, new: Pipeline) -> bool:
    return any(
        isinstance(m, LoRAMember)
        and m.base_url == member.base_url
        and m.config.served_name == member.config.served_name
        for m in new.members.values()
    )


async def _release(member: Member) -> None:
    try:
        await member.release()
    except MemberFailure as e:
        logger.warning("member %s not released: %s", member.name, e)


def _summary(old: Pipeline, built: Built, started: list[RunningServer], retired: list[RunningServer]) -> dict[str, Any]:
    new = built.pipeline
    return {
        "members_added": sorted(set(new.members) - set(old.members)),
        "members_removed": sorted(set(old.members) - set(new.members)),
        "members_rebuilt": sorted(m.name for m in built.new_members if m.name in old.members),
        "rankers_loaded": sorted(r.name for r in built.new_rankers),
        "fusers_loaded": sorted(f.name for f in built.new_fusers),
        "servers_started": sorted(s.name for s in started),
        "servers_retired": sorted(s.name for s in retired),
        "ensembles": sorted(new.config.ensembles),
        "unavailable": dict(new.unavailable),
    }
