"""The pipeline's own types: the request as the engine needs it (``Query``) and the answer with
its evidence (``Answer``). The serving layer turns wire models into a ``Query`` and an ``Answer``
back into each API's body; nothing here knows HTTP or any API's field names but the ones a client's
error must name (``Query.ensemble_param``, ``Query.fuse_top_k_param``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Fusion = Literal["always", "adaptive", "never"]


@dataclass(frozen=True)
class Message:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Origin:
    """Who asked, through which API: what the store keeps beside the answer. ``key_id`` names the
    client's key (a digest, never the key); ``echo``: the request's fields that the API's stored
    object repeats when it is read again; ``retrievable``: whether it may be (the Responses
    API's ``store``)."""

    api: str = "generate"
    key_id: str | None = None
    metadata: Mapping[str, str] | None = None
    echo: Mapping[str, object] | None = None
    retrievable: bool = True


@dataclass(frozen=True)
class Query:
    """One request to an ensemble: ``prompt`` or ``messages`` (exactly one), and what overrides the
    ensemble's settings. ``None`` means "the ensemble's (or the member's) own"."""

    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    instruction: str | None = None
    ensemble: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    fuse_top_k: int | None = None
    fusion: Fusion | None = None
    deadline_s: float | None = None
    extensions: Mapping[str, object] | None = None  # vLLM's sampling extensions, for every member
    max_members: int | None = None  # members called at most (only lowers the ensemble's cap)
    origin: Origin = field(default_factory=Origin)
    # The client's field names, for the errors that point at them.
    ensemble_param: str = "ensemble"
    fuse_top_k_param: str = "fuse_top_k"
    max_members_param: str = "max_members"

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a query has exactly one of prompt or messages")


@dataclass(frozen=True)
class TokenCounts:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Usage:
    """Tokens as a client accounts for them: the answer is the completion; ``members``: each
    answering member's own counts."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    members: dict[str, TokenCounts] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    """One member's answer (``member``: its name, or ``name#i`` for its i-th sample) and how it fared."""

    member: str
    text: str
    score: float | None
    rank: int
    latency_ms: float
    finish_reason: str | None
    votes: int | None = None


@dataclass(frozen=True)
class Failure:
    """A member that gave no candidate, and why (``kind`` labels it: timeout, connect, ...)."""

    member: str
    error: str
    kind: str | None = None


@dataclass(frozen=True)
class NotCalled:
    """A member the request did not call, and why: ``routed`` (the router put it below the ensemble's
    `route`), ``cascade_not_needed`` (the first wave's answer was certain) or ``cap`` (over
    `max_member_calls` or the request's `max_members`)."""

    member: str
    reason: str


@dataclass(frozen=True)
class Timings:
    """Milliseconds: fan-out, ranking (and voting), fusion (and counting), the whole request."""

    members: float
    rank: float
    fuse: float
    total: float


@dataclass(frozen=True)
class Answer:
    """The ensemble's answer with its evidence. ``candidates`` are in rank order, best first;
    ``selected``: the members fed to the fuser (or the one returned); ``finish_reason``: ``stop``
    for a fused answer, else the top candidate's own."""

    id: str  # hex, minted once per request; each API prefixes it as it names its objects
    ensemble: str
    output: str
    fused: bool
    selected: list[str]
    candidates: list[Candidate]
    failed_members: list[Failure]
    degraded: bool
    degraded_reasons: list[str]
    timings_ms: Timings
    usage: Usage
    finish_reason: str
    not_called: list[NotCalled] = field(default_factory=list)
