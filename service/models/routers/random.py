"""The baseline router: every member equally likely, the order shuffled by a seed drawn from the
source, so that one prompt always gets the same members (a figure a trained router must beat)."""

from __future__ import annotations

import hashlib
import random

from service.config import RouterConfig


class RandomRouter:
    def __init__(self, name: str, config: RouterConfig, members: list[str]):
        self.name = name
        self.seed = config.seed
        self.members = list(members)

    async def scores(self, source: str) -> dict[str, float]:
        digest = hashlib.sha256(f"{self.seed}\0{source}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        values = [rng.random() for _ in self.members]
        return dict(zip(self.members, values, strict=True))

    def close(self) -> None:
        pass
