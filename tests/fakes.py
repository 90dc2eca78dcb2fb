"""Fakes that implement the same interfaces as the real parts (fast unit tier only). Each subclasses
the protocol it implements, so that mypy fails when the two drift apart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

import numpy as np

from service.config import GatewayConfig, parse_config
from service.errors import MemberFailure
from service.members.base import Completion, Member, MemberRequest
from service.models.fusers.base import Fuser
from service.models.rankers.ranking import Ranker, Ranking, ranks_from_scores
from service.models.routers.base import Router
from service.pipeline.pipeline import Lasting, Pipeline
from service.telemetry.metrics import Metrics


class FakeMember(Member):
    def __init__(self, name: str, text: str, *, delay: float = 0.0, fail: str | None = None, fail_first: int = 0):
        self.name = name
        self.text = text
        self.delay = delay
        self.fail = fail
        self.fail_first = fail_first  # with ``fail``: only the first calls fail
        self.requests: list[MemberRequest] = []

    async def generate(self, request: MemberRequest) -> Completion:
        self.requests.append(request)
        await asyncio.sleep(self.delay)
        if self.fail and (not self.fail_first or len(self.requests) <= self.fail_first):
            raise MemberFailure(self.fail, f"fake {self.fail}")
        return Completion(self.text, "stop", 5, len(self.text.split()), self.delay * 1000)

    async def health(self) -> None:
        if self.fail:
            raise MemberFailure(self.fail, "fake down")

    async def prepare(self) -> None:
        if self.fail == "adapter_load":
            raise MemberFailure("adapter_load", "fake adapter refused")

    async def release(self) -> None:
        pass


class LengthRanker(Ranker):
    """Scores a candidate by its length: longer is better."""

    name = "length"

    def __init__(self, fail: bool = False, delay: float = 0.0):
        self.fail = fail
        self.delay = delay
        self.calls: list[tuple[str, list[str]]] = []

    async def rank(self, source: str, candidates: list[str]) -> Ranking:
        self.calls.append((source, candidates))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("ranker exploded")
        scores = np.array([float(len(c)) for c in candidates], dtype=np.float32)
        return Ranking([float(s) for s in scores], ranks_from_scores(scores))

    def close(self) -> None:
        pass


class JoinFuser(Fuser):
    name = "join"

    def __init__(self, fail: bool = False, fail_after: int | None = None, delay: float = 0.0):
        self.fail = fail
        self.fail_after = fail_after  # streaming: raise after this many pieces
        self.delay = delay
        self.calls: list[tuple[str, str, list[str]]] = []
        self.limits: list[int | None] = []

    async def fuse(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> str:
        self.calls.append((instruction, input_text, candidates))
        self.limits.append(max_new_tokens)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("fuser exploded")
        return " | ".join(candidates)

    async def fuse_stream(
        self, instruction: str, input_text: str, candidates: list[str], max_new_tokens: int | None = None
    ) -> AsyncIterator[str]:
        text = await self.fuse(instruction, input_text, candidates, max_new_tokens)
        for n, i in enumerate(range(0, len(text), 3)):
            if self.fail_after is not None and n == self.fail_after:
                raise RuntimeError("fuser exploded mid-stream")
            yield text[i : i + 3]

    async def count_tokens(self, text: str) -> int | None:
        return len(text)  # a character per token, so that tests can tell the count from the members'

    def close(self) -> None:
        pass


class FakeRouter(Router):
    """Gives each member a fixed chance (``scores``); ``fail``: raises instead."""

    name = "fake-router"

    def __init__(self, scores: Mapping[str, float], fail: bool = False, delay: float = 0.0):
        self.values = dict(scores)
        self.fail = fail
        self.delay = delay
        self.sources: list[str] = []

    async def scores(self, source: str) -> dict[str, float]:
        self.sources.append(source)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("router exploded")
        return dict(self.values)

    def close(self) -> None:
        pass


# Three members a, b, c (nothing listens: the fakes answer), the length ranker and the join fuser;
# a test adds its own `ensembles:` below.
THREE_MEMBERS = """
members:
  - {name: a, endpoint: "http://127.0.0.1:9/v1", model: m}
  - {name: b, endpoint: "http://127.0.0.1:9/v1", model: m}
  - {name: c, endpoint: "http://127.0.0.1:9/v1", model: m}
rankers: {length: {checkpoint: unused}}
fusers: {join: {checkpoint: unused}}
"""

FAKE_CONFIG = """
members:
  - {name: a, endpoint: "http://127.0.0.1:9/v1", model: m-a, sampling: {max_tokens: 8, temperature: 0.5}}
  - {name: b, endpoint: "http://127.0.0.1:9/v1", model: m-b}
  - {name: c, endpoint: "http://127.0.0.1:9/v1", model: m-c}
rankers:
  length: {checkpoint: unused}
fusers:
  join: {checkpoint: unused}
ensembles:
  main: {members: [a, b, c], ranker: length, fuser: join, fuse_top_k: 2, min_candidates: 2, quorum: 3, deadline_s: 1}
  plain: {members: [a, b], top_k: 1}
"""


def fake_config(text: str = FAKE_CONFIG) -> GatewayConfig:
    return parse_config(text)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """A metric's value read from the registry, as Prometheus would scrape it (0 if never set)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def fake_pipeline(
    config: GatewayConfig,
    members: Mapping[str, Member],
    rankers: Mapping[str, Ranker],
    fusers: Mapping[str, Fuser],
    metrics: Metrics | None = None,
    routers: Mapping[str, Router] | None = None,
) -> Pipeline:
    """A pipeline over fake parts, with its own metrics, breakers, admission and status book."""
    return Pipeline(config, members, rankers, fusers, Lasting.new(config, metrics or Metrics()), routers=routers)
