"""Build the runtime parts from a configuration: members of every kind, rankers, fusers."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

from service.adapters import BaseModelCache, base_checkpoint, check_members, load_prompt_embeddings
from service.config import FuserConfig, GatewayConfig, LLMFuserConfig, MemberConfig
from service.errors import ConfigError
from service.fusion import Fuser, GenFuser, LLMFuser
from service.gate import ClassGate
from service.members import LoRAMember, Member, MemberFailure, OpenAIMember, SoftPromptMember
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.ranking import PairRMRanker, Ranker

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """Pre-built parts, for tests and embedding; anything missing is built from the config."""

    members: dict[str, Member] | None = None
    rankers: dict[str, Ranker] | None = None
    fusers: dict[str, Fuser] | None = None


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


async def prepare_members(members: dict[str, Member]) -> dict[str, str]:
    """Prepare every member at once; the reasons of those that could not be prepared."""

    async def one(member: Member) -> str | None:
        try:
            await member.prepare()
        except MemberFailure as e:
            logger.error("member %s unavailable: %s", member.name, e)
            return str(e)
        return None

    results = await asyncio.gather(*(one(m) for m in members.values()))
    return {name: r for name, r in zip(members, results, strict=True) if r is not None}


async def build_fuser(
    name: str,
    cfg: FuserConfig | LLMFuserConfig,
    client: httpx.AsyncClient,
    server_urls: dict[str, str],
    gates: dict[str, ClassGate] | None = None,
) -> Fuser:
    if isinstance(cfg, LLMFuserConfig):
        url = target_url(f"fusers.{name}", cfg.endpoint, cfg.server, server_urls)
        return LLMFuser(name, cfg, url, client, (gates or {}).get(url.rstrip("/")))
    return await asyncio.to_thread(GenFuser, name, cfg)


async def build_pipeline(
    config: GatewayConfig,
    metrics: Metrics,
    client: httpx.AsyncClient,
    server_urls: dict[str, str],
    parts: Components,
    bases: BaseModelCache,
) -> Pipeline:
    """Everything a configuration needs; a ``ConfigError`` names what is wrong."""
    prebuilt = dict(parts.members or {})
    if not prebuilt:
        await asyncio.to_thread(check_members, config)
    gates = prompt_embeds_gates(config, server_urls) if not prebuilt else {}
    members: dict[str, Member] = {}
    for m in config.members:
        members[m.name] = prebuilt.get(m.name) or await build_member(config, m, client, server_urls, bases, gates)
    unavailable = await prepare_members(members)
    rankers: dict[str, Ranker] = dict(parts.rankers or {})
    for name, rcfg in config.rankers.items():
        if name not in rankers:
            rankers[name] = await asyncio.to_thread(PairRMRanker, name, rcfg)
    fusers: dict[str, Fuser] = dict(parts.fusers or {})
    for name, fcfg in config.fusers.items():
        if name not in fusers:
            fusers[name] = await build_fuser(name, fcfg, client, server_urls, gates)
    for name in members:
        metrics.member_available.labels(name).set(0 if name in unavailable else 1)
    return Pipeline(config, members, rankers, fusers, metrics, unavailable)
