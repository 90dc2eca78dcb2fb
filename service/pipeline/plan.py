"""The first stage: what a query asks of its ensemble, fixed once, before any work is done.

The ensemble is looked up, the request's limits checked, the deadline fixed (admission queueing
counts against it), the instruction, input text and fusion settings chosen, each member's request
made, and the answer's id minted. Every later stage reads the ``Plan``; none of them recomputes any of it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from service.config import EnsembleConfig, GatewayConfig, LimitsConfig
from service.errors import NotFoundError, RequestError
from service.members.base import MemberRequest
from service.pipeline.types import Fusion, Query


@dataclass(frozen=True)
class Plan:
    id: str  # the answer's id (hex), minted here once
    query: Query
    name: str  # the ensemble
    ensemble: EnsembleConfig
    instruction: str
    input_text: str  # what ranker and fuser see besides the instruction
    fuse_top_k: int  # candidates fused
    fusion: Fusion  # the policy in force: the query's, else the ensemble's
    max_tokens: int | None  # the query's own limit, which also bounds the fuser
    requests: dict[str, MemberRequest]  # each candidate's: ``name``, or ``name#i`` per sample
    max_calls: int | None  # members called at most: the ensemble's cap, lowered by the query's
    start: float  # time.perf_counter() when the request began
    deadline_at: float  # time.monotonic() by which it must be answered

    def remaining_s(self) -> float:
        return self.deadline_at - time.monotonic()

    def members_until(self) -> float:
        """When the fan-out must stop waiting: the ensemble's share of what is left of the deadline."""
        now = time.monotonic()
        return now + (self.deadline_at - now) * self.ensemble.members_share


def ensemble_label(config: GatewayConfig, name: str | None) -> str:
    """The ensemble a request names (or the default), as metrics label it: ``-`` if it does not exist."""
    name = name or config.default
    return name if name in config.ensembles else "-"


def plan(config: GatewayConfig, query: Query) -> Plan:
    """The query's plan; raises ``NotFoundError`` for an unknown ensemble and ``RequestError`` for a
    request over a limit, each naming the client's field."""
    start = time.perf_counter()
    now = time.monotonic()
    name = query.ensemble or config.default
    if name not in config.ensembles:
        raise NotFoundError(
            f"the model (ensemble) {name!r} does not exist", param=query.ensemble_param, code="model_not_found"
        )
    ens = config.ensembles[name]
    check_limits(query, config.limits)
    if query.fuse_top_k is not None and query.fuse_top_k > (most := candidates_of(config, ens)):
        field = query.fuse_top_k_param
        raise RequestError(
            f"{field}={query.fuse_top_k} exceeds the {most} candidates of ensemble {name!r}", param=field
        )
    max_calls = call_cap(query, ens, name)
    deadline_s = ens.deadline_s if query.deadline_s is None else min(ens.deadline_s, query.deadline_s)
    instruction = query.instruction if query.instruction is not None else ens.instruction
    return Plan(
        id=uuid.uuid4().hex,
        query=query,
        name=name,
        ensemble=ens,
        instruction=instruction,
        input_text=input_text(query),
        fuse_top_k=query.fuse_top_k or ens.fuse_top_k,
        fusion=query.fusion or ens.fusion,
        max_tokens=query.max_tokens,
        requests=member_requests(config, ens, instruction, query),
        max_calls=max_calls,
        start=start,
        deadline_at=now + deadline_s,
    )


def call_cap(query: Query, ens: EnsembleConfig, name: str) -> int | None:
    """Members a request may call: the ensemble's ``max_member_calls``, which the query's
    ``max_members`` may only lower; refused below what the ensemble needs to answer."""
    if query.max_members is not None and query.max_members < ens.min_candidates:
        field = query.max_members_param
        raise RequestError(
            f"{field}={query.max_members} is below the {ens.min_candidates} candidates ensemble {name!r} needs",
            param=field,
        )
    caps = [c for c in (ens.max_member_calls, query.max_members) if c is not None]
    return min(caps) if caps else None


def candidates_of(config: GatewayConfig, ens: EnsembleConfig) -> int:
    """The candidates an ensemble's request can have: a candidate per member sample."""
    return sum(config.member(name).samples for name in ens.members)


def check_limits(query: Query, limits: LimitsConfig) -> None:
    """Refuse a request over the configured size limits, naming the field."""
    chars = len(query.prompt or "") + len(query.instruction or "")
    chars += sum(len(m.content) for m in query.messages or ())
    if chars > limits.max_prompt_chars:
        raise RequestError(
            f"the prompt has {chars} characters; the limit is {limits.max_prompt_chars}",
            param="messages" if query.messages else "prompt",
            code="prompt_too_long",
        )
    if query.messages and len(query.messages) > limits.max_messages:
        raise RequestError(
            f"{len(query.messages)} messages; the limit is {limits.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    if query.max_tokens is not None and query.max_tokens > limits.max_tokens:
        raise RequestError(
            f"max_tokens={query.max_tokens} exceeds the limit {limits.max_tokens}",
            param="max_tokens",
            code="max_tokens_too_large",
        )


def input_text(query: Query) -> str:
    """The ``input`` that ranker and fuser see: the prompt itself, or for messages the content of
    a lone user message, else each message as a ``role: content`` line."""
    if query.prompt is not None:
        return query.prompt
    messages = query.messages or ()
    if len(messages) == 1 and messages[0].role == "user":
        return messages[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


def member_messages(query: Query, instruction: str) -> list[dict[str, str]]:
    """The conversation members receive: the instruction, if any, leads the first user turn."""
    if query.prompt is not None:
        messages = [{"role": "user", "content": query.prompt}]
    else:
        messages = [{"role": m.role, "content": m.content} for m in query.messages or ()]
    if instruction:
        for m in messages:
            if m["role"] == "user":
                m["content"] = f"{instruction}\n\n{m['content']}"
                break
    return messages


def member_requests(
    config: GatewayConfig, ens: EnsembleConfig, instruction: str, query: Query
) -> dict[str, MemberRequest]:
    """Each candidate's request, keyed ``name`` (or ``name#i`` per sample): the query's sampling
    settings where it gives them, else the member's; samples count their seed up from it."""
    messages = member_messages(query, instruction)
    out: dict[str, MemberRequest] = {}
    for name in ens.members:
        member = config.member(name)
        sampling = member.sampling
        seed = query.seed if query.seed is not None else sampling.seed
        for i in range(member.samples):
            key = name if member.samples == 1 else f"{name}#{i + 1}"
            out[key] = MemberRequest(
                messages=[dict(m) for m in messages],
                max_tokens=query.max_tokens or sampling.max_tokens,
                temperature=query.temperature if query.temperature is not None else sampling.temperature,
                top_p=query.top_p if query.top_p is not None else sampling.top_p,
                seed=None if seed is None else seed + i,
                extensions=query.extensions,
            )
    return out
