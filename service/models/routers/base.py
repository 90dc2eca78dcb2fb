"""The ``Router`` interface: what the routing stage asks of a router. The trained router
(``service.models.routers.encoder``), the random baseline and the unit tier's fakes implement it."""

from __future__ import annotations

from typing import Protocol


class Router(Protocol):
    """For a source (instruction + input), each member's chance that its answer is the one chosen.

    ``scores`` gives a value for every member it knows (members it was not trained on are absent),
    raises on failure, and runs its model work off the event loop. ``close`` stops its thread.
    """

    name: str

    async def scores(self, source: str) -> dict[str, float]: ...

    def close(self) -> None: ...
