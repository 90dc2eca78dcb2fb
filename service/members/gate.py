"""A gate that keeps two classes of requests to one server from running at the same time.

Why: vLLM (0.32, CPU and GPU) crashes its engine when one batch mixes ``prompt_embeds`` requests
with token requests on a server started with both ``--enable-lora`` and ``--enable-prompt-embeds``
(vllm-project/vllm#51122: the LoRA embedding wrapper is sized for the whole batch). Requests of
one class may run together; the other class waits until they are done. A class that is waiting
blocks new arrivals of the running class, so neither starves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ClassGate:
    def __init__(self) -> None:
        self._active: str | None = None
        self._running = 0
        self._waiting: dict[str, int] = {}
        self._cond: asyncio.Condition | None = None

    def _others_waiting(self, cls: str) -> bool:
        return any(n > 0 for c, n in self._waiting.items() if c != cls)

    def _may_enter(self, cls: str) -> bool:
        if self._running == 0:
            return True
        return self._active == cls and not self._others_waiting(cls)

    @asynccontextmanager
    async def hold(self, cls: str) -> AsyncIterator[None]:
        if self._cond is None:
            self._cond = asyncio.Condition()
        cond = self._cond
        async with cond:
            self._waiting[cls] = self._waiting.get(cls, 0) + 1
            try:
                await cond.wait_for(lambda: self._may_enter(cls))
            finally:
                self._waiting[cls] -= 1
            self._active = cls
            self._running += 1
        try:
            yield
        finally:
            async with cond:
                self._running -= 1
                if self._running == 0:
                    self._active = None
                cond.notify_all()
