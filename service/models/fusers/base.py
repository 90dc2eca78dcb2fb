"""The ``Fuser`` interface: what the pipeline asks of a fuser. GenFuser (``genfuser``) and the LLM
fuser (``llm``) implement it, and so do the unit tier's fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class Fuser(Protocol):
    """Fuses candidates (best first) for an instruction and input into one text.

    ``fuse`` raises ``ModelError`` on failure and runs its model work off the event loop.
    ``max_new_tokens`` (the request's ``max_tokens``) lowers the fuser's own limit, never raises it.
    """

    name: str

    async def fuse(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> str: ...

    def fuse_stream(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> AsyncIterator[str]:
        """The same text as ``fuse``, in pieces as soon as each is final."""
        ...

    async def count_tokens(self, text: str) -> int | None:
        """``text``'s tokens by the fuser's own tokenizer (a fused answer's usage), off the event
        loop; None where the fuser cannot tell."""
        ...

    def close(self) -> None: ...
