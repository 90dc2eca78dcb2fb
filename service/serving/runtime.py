"""The running configuration, and its reload without a restart.

A reload validates the new file in full, starts what is new (servers, members, adapters, models)
while the old configuration keeps serving, swaps in one step, and cleans up what the old one
alone used only once its requests have finished. If anything fails before the swap, what was
started for the new configuration is stopped again and the old one serves on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from service.config import GatewayConfig, load_config
from service.errors import ConfigError, MemberFailure, NotReadyError
from service.members.base import Member
from service.members.breakers import OPEN
from service.members.checks import startup_server_args
from service.members.gate import ClassGate
from service.members.http import make_http_client
from service.members.openai import LoRAMember
from service.members.soft_prompt import BaseModelCache
from service.models.build.materialize import materialize
from service.ops.launcher import Launcher, RunningServer
from service.pipeline.pipeline import Lasting, Pipeline
from service.serving.build import Built, Components, build_pipeline, prepare_members
from service.telemetry.metrics import Metrics

logger = logging.getLogger(__name__)

DRAIN_GRACE_S = 30.0
RESTART_BACKOFF_MAX_S = 120.0
RESTART_RESET_S = 300.0  # a server that has run this long starts its restart backoff afresh
READY_CACHE_S = 2.0  # /ready and /status.json reuse a health round this recent


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
        self.guards = self.lasting.guards
        self.admission = self.lasting.admission
        self.status = self.lasting.status
        self.health_lock = asyncio.Lock()
        self._lock = asyncio.Lock()
        self._cleanups: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._restarts: dict[str, int] = {}

    def warnings(self) -> list[str]:
        """What an operator should know about this configuration: shown at start-up, on the status
        page and in /status.json."""
        out = []
        if self.host is not None and not is_loopback(self.host) and not self.config.auth.client_keys():
            out.append(
                f"no client API key is configured and the gateway listens on {self.host}: anyone who can "
                "reach it can use it (set auth.api_keys_env, default GATEWAY_API_KEYS)"
            )
        for m in self.config.members:
            if m.samples > 1 and m.sampling.temperature == 0:
                out.append(
                    f"member {m.name} gives {m.samples} samples at temperature 0: greedy samples are identical "
                    "unless a request sets a temperature"
                )
        return out

    async def probe_members(self) -> dict[str, str | None]:
        """Each member's health (None = up): the last active check, or a fresh one when that is
        older than a couple of seconds. A member whose circuit is open counts as down."""
        pipeline = self.pipeline
        if pipeline is None:
            return {}
        guards = self.guards
        async with self.health_lock:
            if guards.clock() - guards.last_round > READY_CACHE_S or set(guards.health) != set(pipeline.members):
                await guards.check(pipeline.members, pipeline.unavailable)
        out: dict[str, str | None] = {}
        for name in pipeline.members:
            h = guards.health.get(name)
            out[name] = h.error if h is not None and h.error else None
            if out[name] is None and guards.breaker(name).state == OPEN:
                out[name] = f"circuit_open: {guards.breaker(name).reason}"
        return out

    def current(self) -> Pipeline:
        """The pipeline requests run on now; ``NotReadyError`` while the models still load."""
        if self.pipeline is None:
            raise NotReadyError("the gateway is still loading its models")
        return self.pipeline

    def server_urls(self) -> dict[str, str]:
        return self.launcher.base_urls() if self.launcher is not None else {}

    async def start(self) -> Pipeline:
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
        self._background = [asyncio.create_task(self._health_checks())]
        if self.launcher is not None:
            self._background.append(asyncio.create_task(self._supervise()))
        return built.pipeline

    def _configure_guards(self, config: GatewayConfig, pipeline: Pipeline) -> None:
        res = config.resilience
        self.guards.configure(list(pipeline.members), res.breaker, res.health_checks)
        self.admission.configure(config.limits)

    async def _health_checks(self) -> None:
        """Active health checks, every ``interval_s``; they open the circuit of a member that fails them."""
        while True:
            interval = self.config.resilience.health_checks.interval_s
            pipeline = self.pipeline
            if interval > 0 and pipeline is not None:
                try:
                    async with self.health_lock:
                        await self.guards.check(pipeline.members, pipeline.unavailable)
                except Exception:
                    logger.exception("health check round failed")
            await asyncio.sleep(interval or 1.0)

    async def _supervise(self, poll_s: float = 1.0) -> None:
        """Single-node mode: restart a launched server that died, with a backoff that doubles."""
        assert self.launcher is not None
        while True:
            await asyncio.sleep(poll_s)
            if not self.config.resilience.restart_servers:
                continue
            for name, srv in list(self.launcher.running.items()):
                code = srv.process.poll()
                if code is None:
                    if time.monotonic() - srv.started > RESTART_RESET_S:
                        self._restarts.pop(name, None)
                    continue
                try:
                    await self._restart(srv, code)
                except Exception:
                    logger.exception("restart of server %s failed; trying again", name)

    async def _restart(self, srv: RunningServer, code: int) -> None:
        assert self.launcher is not None
        n = self._restarts.get(srv.name, 0)
        wait = min(RESTART_BACKOFF_MAX_S, self.config.resilience.restart_backoff_s * 2**n)
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
            pipeline = self.pipeline
            if pipeline is None:
                return
            # Adapters loaded at run time are gone with the old process: load them again.
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
            logger.info("server %s restarted on port %d", srv.name, new.port)

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
            if not self.parts.members:
                # Merges and soups the new file asks for are built now, while the old configuration serves.
                new = await asyncio.to_thread(materialize, new)
            use, started, retired = await self._servers_for(new)
            urls = {name: srv.base_url for name, srv in use.items()}
            await self._unload_replaced_adapters(old, new, urls)
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
        extra = startup_server_args(new)
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


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


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
