"""What a reload does besides the swap: which server instances the new configuration uses (kept,
started, retired), the LoRA adapters to unload before a changed one loads under the same name, and
the clean-up of what only the old configuration used once its requests have finished."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from service.config import GatewayConfig
from service.errors import ConfigError, MemberFailure
from service.members.base import Member
from service.members.checks import startup_server_args
from service.members.openai import LoRAMember
from service.ops.launcher import Launcher, RunningServer
from service.pipeline.pipeline import Pipeline
from service.serving.build import Built

logger = logging.getLogger(__name__)

DRAIN_GRACE_S = 30.0


async def servers_for(
    launcher: Launcher | None, new: GatewayConfig
) -> tuple[dict[str, RunningServer], list[RunningServer], list[RunningServer]]:
    """The server instance each name will use, those started for it, and those retired."""
    if launcher is None:
        if new.servers:
            raise ConfigError("servers: launching servers needs single-node mode (ensemble-gateway serve)")
        return {}, [], []
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


async def unload_replaced_adapters(old: Pipeline, new: GatewayConfig, urls: dict[str, str]) -> None:
    """A LoRA member changed under the same name on the same server must be unloaded first:
    the server would otherwise keep serving the old weights under that name."""
    for m in new.members:
        prev = old.members.get(m.name)
        prev_cfg = next((o for o in old.config.members if o.name == m.name), None)
        if not isinstance(prev, LoRAMember) or prev_cfg is None or prev_cfg == m or m.kind != "lora":
            continue
        if prev.base_url == urls.get(m.server or "", m.endpoint or "").rstrip("/") and prev.lora.load == "runtime":
            await release(prev)


async def retire(old: Pipeline, new: Pipeline, retired: list[RunningServer], launcher: Launcher | None) -> None:
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
        await release(member)
    for name, ranker in old.rankers.items():
        if new.rankers.get(name) is not ranker:
            ranker.close()
    for name, fuser in old.fusers.items():
        if new.fusers.get(name) is not fuser:
            fuser.close()
    for name, router in old.routers.items():
        if new.routers.get(name) is not router:
            router.close()
    if retired and launcher is not None:
        await asyncio.to_thread(launcher.stop_instances, retired)


def _adapter_still_served(member: LoRAMember, new: Pipeline) -> bool:
    return any(
        isinstance(m, LoRAMember)
        and m.base_url == member.base_url
        and m.config.served_name == member.config.served_name
        for m in new.members.values()
    )


async def release(member: Member) -> None:
    try:
        await member.release()
    except MemberFailure as e:
        logger.warning("member %s not released: %s", member.name, e)


def summary(old: Pipeline, built: Built, started: list[RunningServer], retired: list[RunningServer]) -> dict[str, Any]:
    new = built.pipeline
    return {
        "members_added": sorted(set(new.members) - set(old.members)),
        "members_removed": sorted(set(old.members) - set(new.members)),
        "members_rebuilt": sorted(m.name for m in built.new_members if m.name in old.members),
        "rankers_loaded": sorted(r.name for r in built.new_rankers),
        "fusers_loaded": sorted(f.name for f in built.new_fusers),
        "routers_loaded": sorted(o.name for o in built.new_routers),
        "servers_started": sorted(s.name for s in started),
        "servers_retired": sorted(s.name for s in retired),
        "ensembles": sorted(new.config.ensembles),
        "unavailable": dict(new.unavailable),
    }
