"""The member interface: what the pipeline asks of one ensemble member, and what comes back.

Every member kind (a model, a LoRA adapter, a soft prompt, ...) implements ``Member``; the
fan-out (``service.members.fanout``) calls it, and the unit tier's fakes implement it too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class MemberRequest:
    """What one member is asked: a conversation plus sampling settings."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    # vLLM's sampling extensions the client sent (top_k, min_p, ignore_eos, ...), as body fields.
    extensions: Mapping[str, object] | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


class Member(Protocol):
    """One ensemble member.

    ``generate`` returns a ``Completion`` or raises ``MemberFailure``; it never raises anything
    else and never blocks the event loop. It honours its own timeout. ``health`` returns when the
    member can take requests and raises ``MemberFailure`` when it cannot. ``prepare`` makes it
    servable (loads an adapter) and ``release`` undoes that; both raise ``MemberFailure``.
    """

    name: str

    async def generate(self, request: MemberRequest) -> Completion: ...

    async def health(self) -> None: ...

    async def prepare(self) -> None: ...

    async def release(self) -> None: ...


def render_prompt(messages: list[dict[str, str]]) -> str:
    """Text for completion-API members: a lone user message as is, else ``role: content`` lines."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
