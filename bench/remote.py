"""The model tier's cost on the device it runs on: the same PairRM and GenFuser in this process and
behind ``ensemble-gateway serve-models`` (HTTP on loopback, JSON, the tier's own batching), called
as a gateway calls them (``PairRMRanker``/``GenFuser`` against ``RemoteRanker``/``RemoteFuser``),
one request at a time and from eight clients at once, alternating the two in each round.
``bench.gpu`` runs it after its parity figures (``--smoke``: on the CPU with tiny shapes)."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import median, rank_requests
from bench.fuser import fuse_prompts
from service.config import BreakerConfig, FuserConfig, RankerConfig, RemoteModelConfig, RetryConfig
from service.models.fusers.base import Fuser
from service.models.fusers.genfuser import GenFuser
from service.models.rankers.pairrm import PairRMRanker
from service.models.rankers.ranking import Ranker
from service.models.remote import RemoteFuser, RemoteRanker
from tests.load import tier_process

logger = logging.getLogger(__name__)
CLIENTS = 8


async def _c1(call: Callable[[int], Awaitable[Any]], n: int) -> list[float]:
    times = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        times.append(time.perf_counter() - start)
    return times


async def _c8(call: Callable[[int], Awaitable[Any]], per_client: int) -> float:
    """Requests per second with ``CLIENTS`` clients, each sending ``per_client`` in turn."""

    async def client(c: int) -> None:
        for i in range(per_client):
            await call(c * per_client + i)

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    return CLIENTS * per_client / (time.perf_counter() - start)


def run(
    pairrm: Path,
    fuser: Path,
    device: str,
    dtype: str,
    *,
    source_words: tuple[int, int],
    cand_words: tuple[int, int],
    requests: int,
    rounds: int,
) -> dict[str, Any]:
    ranker_cfg = {"checkpoint": str(pairrm), "device": device, "dtype": dtype}
    fuser_cfg = {"checkpoint": str(fuser), "device": device, "dtype": dtype}
    reqs = rank_requests(max(requests, CLIENTS * 2), seed=21, source_words=source_words, cand_words=cand_words)
    prompts = fuse_prompts(max(requests, CLIENTS * 2), seed=22, cand_words=(40, 120))
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp:
        tier_config = {"rankers": {"pairrm": ranker_cfg}, "fusers": {"genfuser": fuser_cfg}}
        with tier_process(tier_config, Path(tmp)) as tier:
            return asyncio.run(_measure(tier.url, ranker_cfg, fuser_cfg, reqs, prompts, requests, rounds))


async def _measure(
    url: str,
    ranker_cfg: dict[str, Any],
    fuser_cfg: dict[str, Any],
    reqs: list[Any],
    prompts: list[Any],
    requests: int,
    rounds: int,
) -> dict[str, Any]:
    local_ranker = PairRMRanker("local", RankerConfig(**ranker_cfg))
    local_fuser = GenFuser("local", FuserConfig(**fuser_cfg))
    async with httpx.AsyncClient(timeout=600) as client:
        remote = RemoteModelConfig(endpoint=url, timeout_s=600)
        tier_ranker = RemoteRanker("pairrm", remote, client, RetryConfig(), BreakerConfig())
        tier_fuser = RemoteFuser("genfuser", remote, client, RetryConfig(), BreakerConfig())
        rankers: dict[str, Ranker] = {"in_process": local_ranker, "tier": tier_ranker}
        fusers: dict[str, Fuser] = {"in_process": local_fuser, "tier": tier_fuser}

        def rank(which: str) -> Callable[[int], Awaitable[Any]]:
            r = rankers[which]
            return lambda i: r.rank(reqs[i % len(reqs)].source, reqs[i % len(reqs)].candidates)

        def fuse(which: str) -> Callable[[int], Awaitable[Any]]:
            f = fusers[which]
            p = prompts
            return lambda i: f.fuse(p[i % len(p)].instruction, p[i % len(p)].input_text, p[i % len(p)].candidates)

        try:
            same = 0
            for i in range(requests):  # warm-up, and the parity of the two on this workload
                a, b = await rank("in_process")(i), await rank("tier")(i)
                same += a.scores == b.scores
            fused_same = sum([await fuse("in_process")(i) == await fuse("tier")(i) for i in range(min(requests, 4))])
            out: dict[str, Any] = {
                "scores_equal_share": same / requests,
                "fused_identical_share": fused_same / min(requests, 4),
            }
            pairs = len(reqs[0].candidates) * (len(reqs[0].candidates) - 1)
            for part, make, per in (("ranker", rank, pairs), ("fuser", fuse, 1)):
                c1: dict[str, list[float]] = {"in_process": [], "tier": []}
                c8: dict[str, list[float]] = {"in_process": [], "tier": []}
                for _ in range(rounds):
                    for which in ("in_process", "tier"):
                        c1[which] += await _c1(make(which), requests)
                        c8[which].append(await _c8(make(which), 2))
                out[part] = {
                    "per_request": per,
                    "c1_p50_ms": {k: median(v) * 1000 for k, v in c1.items()},
                    "c8_per_s": {k: per * median(v) for k, v in c8.items()},
                }
            logger.info("remote: %s", out)
            return out
        finally:
            local_ranker.close()
            local_fuser.close()
