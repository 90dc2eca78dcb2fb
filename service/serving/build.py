"""Build the runtime parts from a configuration: members of every kind, rankers, fusers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.config import (
    FuserConfig,
    GatewayConfig,
    LLMFuserConfig,
    MemberConfig,
    RemoteModelConfig,
    ResilienceConfig,
    RouterConfig,
)
from service.errors import ConfigError, MemberFailure
from service.members.base import Member
from service.members.checks import base_checkpoint
from service.members.gate import ClassGate
from service.members.openai import LoRAMember, OpenAIMember
from service.members.soft_prompt import BaseModelCache, SoftPromptMember, load_prompt_embeddings
from service.models.build.materialize import cache_root
from service.models.fusers.base import Fuser
from service.models.fusers.genfuser import GenFuser
from service.models.fusers.llm import LLMFuser
from service.models.rankers.pairrm import PairRMRanker
from service.models.rankers.ranking import Ranker
from service.models.remote import RemoteFuser, RemoteRanker
from service.models.routers.base import Router
from service.models.routers.encoder import EncoderRouter
from service.models.routers.random import RandomRouter
from service.pipeline.pipeline import Lasting, Pipeline

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """Pre-built parts, for tests and embedding; anything missing is built from the config."""

    members: dict[str, Member] | None = None
    rankers: dict[str, Ranker] | None = None
    fusers: dict[str, Fuser] | None = None
    routers: dict[str, Router] | None = None


def target_url(what: str, endpoint: str | None, server: str | None, server_urls: dict[str, str]) -> str:
    if endpoint is not None:
        return endpoint
    assert server is not None  # guaranteed by the config's validation
    if server not in server_urls:
        raise ConfigError(f"{what}.server: server {server!r} is not running")
    return server_urls[server]


def prompt_embeds_gates(config: GatewayConfig, server_urls: dict[str, str]) -> dict[str, ClassGate]:
    """A gate per server URL where soft-prompt members share the server with token requests."""
    if not config.isolate_prompt_embeds:
        return {}
    kinds: dict[str, set[bool]] = {}
    for m in config.members:
        url = target_url(f"members.{m.name}", m.endpoint, m.server, server_urls).rstrip("/")
        kinds.setdefault(url, set()).add(m.kind == "soft_prompt")
    for name, f in config.fusers.items():
        if isinstance(f, LLMFuserConfig):
            url = target_url(f"fusers.{name}", f.endpoint, f.server, server_urls).rstrip("/")
            kinds.setdefault(url, set()).add(False)
    return {url: ClassGate() for url, k in kinds.items() if k == {True, False}}


async def build_member(
    config: GatewayConfig,
    m: MemberConfig,
    client: httpx.AsyncClient,
    server_urls: dict[str, str],
    bases: BaseModelCache,
    gates: dict[str, ClassGate] | None = None,
) -> Member:
    url = target_url(f"members.{m.name}", m.endpoint, m.server, server_urls)
    gate = (gates or {}).get(url.rstrip("/"))
    if m.kind == "lora":
        return LoRAMember(m, url, client, gate)
    if m.kind == "soft_prompt":
        base = await asyncio.to_thread(bases.get, base_checkpoint(config, m))
        prompt = await asyncio.to_thread(load_prompt_embeddings, m)
        if prompt.shape[1] != base.embeddings.shape[1]:
            raise ConfigError(
                f"members.{m.name}: soft prompt hidden size {prompt.shape[1]} differs from the "
                f"base's {base.embeddings.shape[1]}"
            )
        return SoftPromptMember(m, url, client, base, prompt, gate)
    return OpenAIMember(m, url, client, gate)


async def prepare_members(members: Mapping[str, Member]) -> dict[str, str]:
    """Prepare every member at once; the reasons of those that could not be prepared."""

    async def one(member: Member) -> str | None:
        try:
            await member.prepare()
        except MemberFailure as e:
            logger.error("member %s unavailable: %s", member.name, e)  # the server's words: logged by the member
            return e.for_operators()
        return None

    results = await asyncio.gather(*(one(m) for m in members.values()))
    return {name: r for name, r in zip(members, results, strict=True) if r is not None}


async def build_fuser(
    name: str,
    cfg: FuserConfig | LLMFuserConfig | RemoteModelConfig,
    client: httpx.AsyncClient,
    server_urls: dict[str, str],
    gates: dict[str, ClassGate] | None = None,
    cache: Path | None = None,
    resilience: ResilienceConfig | None = None,
) -> Fuser:
    if isinstance(cfg, RemoteModelConfig):  # on the model tier
        res = resilience or ResilienceConfig()
        return RemoteFuser(name, cfg, client, res.retries, res.breaker)
    if isinstance(cfg, LLMFuserConfig):
        url = target_url(f"fusers.{name}", cfg.endpoint, cfg.server, server_urls)
        return LLMFuser(name, cfg, url, client, (gates or {}).get(url.rstrip("/")))
    return await asyncio.to_thread(GenFuser, name, cfg, cache)


def build_router(name: str, cfg: RouterConfig, config: GatewayConfig) -> Router:
    """A router (blocking: an encoder router loads its model; call it off the event loop)."""
    if cfg.kind == "random":
        return RandomRouter(name, cfg, [m.name for m in config.members])
    return EncoderRouter(name, cfg)


@dataclass
class Built:
    """A pipeline, and which of its parts were made for it (not taken over from the previous one)."""

    pipeline: Pipeline
    new_members: list[Member]
    new_rankers: list[Ranker]
    new_fusers: list[Fuser]
    new_routers: list[Router] = field(default_factory=list)


def _same_member(prev: Pipeline, config: GatewayConfig, m: MemberConfig, url: str, gate: ClassGate | None) -> bool:
    old_cfg = next((o for o in prev.config.members if o.name == m.name), None)
    if old_cfg != m or m.name not in prev.members:
        return False
    old_url = target_url(f"members.{m.name}", m.endpoint, m.server, prev.server_urls)
    return old_url == url and getattr(prev.members[m.name], "gate", None) is gate


async def build_pipeline(
    config: GatewayConfig,
    lasting: Lasting,
    client: httpx.AsyncClient,
    server_urls: dict[str, str],
    parts: Components,
    bases: BaseModelCache,
    *,
    previous: Pipeline | None = None,
    gates: dict[str, ClassGate] | None = None,
) -> Built:
    """Everything a configuration needs, taking over unchanged parts of ``previous``. The member
    files were checked by the caller (``check_members``), once per load.

    A ``ConfigError`` names what is wrong; on any failure the parts made here are closed again.
    """
    prebuilt = dict(parts.members or {})
    gates = {} if gates is None else gates
    for url in prompt_embeds_gates(config, server_urls) if not prebuilt else {}:
        gates.setdefault(url, ClassGate())
    members: dict[str, Member] = {}
    new_members: list[Member] = []
    new_rankers: list[Ranker] = []
    new_fusers: list[Fuser] = []
    new_routers: list[Router] = []
    to_prepare: dict[str, Member] = {}
    try:
        for m in config.members:
            if m.name in prebuilt:
                members[m.name] = prebuilt[m.name]
                to_prepare[m.name] = prebuilt[m.name]
                continue
            url = target_url(f"members.{m.name}", m.endpoint, m.server, server_urls)
            gate = gates.get(url.rstrip("/"))
            if previous is not None and _same_member(previous, config, m, url, gate):
                members[m.name] = previous.members[m.name]
                if m.name in previous.unavailable:
                    to_prepare[m.name] = members[m.name]  # try again: the cause may be gone
                continue
            member = await build_member(config, m, client, server_urls, bases, gates)
            members[m.name] = member
            new_members.append(member)
            to_prepare[m.name] = member
        unavailable = await prepare_members(to_prepare)
        rankers: dict[str, Ranker] = dict(parts.rankers or {})
        for name, rcfg in config.rankers.items():
            if name in rankers:
                continue
            if previous is not None and previous.config.rankers.get(name) == rcfg and name in previous.rankers:
                rankers[name] = previous.rankers[name]
                continue
            if isinstance(rcfg, RemoteModelConfig):  # on the model tier: an HTTP client, nothing loaded
                res = config.resilience
                ranker: Ranker = RemoteRanker(name, rcfg, client, res.retries, res.breaker)
            else:
                ranker = await asyncio.to_thread(PairRMRanker, name, rcfg)
            rankers[name] = ranker
            new_rankers.append(ranker)
        fusers: dict[str, Fuser] = dict(parts.fusers or {})
        for name, fcfg in config.fusers.items():
            if name in fusers:
                continue
            if previous is not None and name in previous.fusers and previous.config.fusers.get(name) == fcfg:
                same_url = not isinstance(fcfg, LLMFuserConfig) or target_url(
                    name, fcfg.endpoint, fcfg.server, previous.server_urls
                ) == target_url(name, fcfg.endpoint, fcfg.server, server_urls)
                if same_url:
                    fusers[name] = previous.fusers[name]
                    continue
            fuser = await build_fuser(name, fcfg, client, server_urls, gates, cache_root(config), config.resilience)
            fusers[name] = fuser
            new_fusers.append(fuser)
        routers: dict[str, Router] = dict(parts.routers or {})
        for name, ocfg in config.routers.items():
            if name in routers:
                continue
            kept = previous.routers.get(name) if previous is not None else None
            same_config = previous is not None and previous.config.routers.get(name) == ocfg
            # A random router holds the member list: kept only while the members are the same.
            same_members = previous is not None and [m.name for m in previous.config.members] == [
                m.name for m in config.members
            ]
            if kept is not None and same_config and (ocfg.kind == "encoder" or same_members):
                routers[name] = kept
                continue
            router = await asyncio.to_thread(build_router, name, ocfg, config)
            routers[name] = router
            new_routers.append(router)
    except BaseException:
        for r in new_rankers:
            r.close()
        for f in new_fusers:
            f.close()
        for o in new_routers:
            o.close()
        raise
    if previous is not None:
        unavailable.update({n: r for n, r in previous.unavailable.items() if n in members and n not in to_prepare})
    for name in members:
        lasting.metrics.member_available.labels(name).set(0 if name in unavailable else 1)
    pipeline = Pipeline(config, members, rankers, fusers, lasting, unavailable, server_urls, routers)
    return Built(pipeline, new_members, new_rankers, new_fusers, new_routers)
