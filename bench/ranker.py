"""Part 1: PairRM ranking, this project against llm-blender's ``Blender.rank`` on the same weights.

At one request at a time (latency) and at 8 concurrent clients (throughput). llm-blender has no
server, so three ways of serving 8 clients with it are measured and the best one is the baseline:
one request after another (``serial``), 8 threads each calling ``Blender.rank`` (``threads``),
and ``Blender.rank`` called with the 8 clients' inputs at once, its own batching (``batched``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CACHE, RankRequest, alternate, median, rank_requests
from bench.reference import blender_rank_scores, blender_ranker, write_blender_ranker
from service.config import RankerConfig
from service.models.rankers.pairrm import PairRMRanker

logger = logging.getLogger(__name__)

CLIENTS = 8


@dataclass(frozen=True)
class Workload:
    label: str  # "tiny" or "real"
    checkpoint: Path
    c1_requests: int
    c8_rounds: int  # requests per client at concurrency 8
    repeats: int
    c8_repeats: int
    source_words: tuple[int, int]
    cand_words: tuple[int, int]
    blender_c8: tuple[str, ...]  # which llm-blender serving variants to measure
    schemes_requests: int  # requests for the opt-in schemes' agreement share (0: skip)
    flops: bool  # measure FLOP/s against the machine's matmul peak
    device: str = "cpu"  # both sides
    dtype: str = "float32"


def _ours_c1(ranker: PairRMRanker, reqs: list[RankRequest]) -> list[float]:
    out = []
    for r in reqs:
        t = time.perf_counter()
        ranker.rank_sync(r.source, r.candidates)
        out.append(time.perf_counter() - t)
    return out


def _blender_c1(blender: Any, reqs: list[RankRequest]) -> list[float]:
    out = []
    for r in reqs:
        t = time.perf_counter()
        blender_rank_scores(blender, [r.source], [r.candidates])
        out.append(time.perf_counter() - t)
    return out


def _ours_c8(ranker: PairRMRanker, clients: list[list[RankRequest]]) -> float:
    async def client(reqs: list[RankRequest]) -> None:
        for r in reqs:
            await ranker.rank(r.source, r.candidates)

    async def all_clients() -> None:
        await asyncio.gather(*(client(c) for c in clients))

    t = time.perf_counter()
    asyncio.run(all_clients())
    return sum(len(c) for c in clients) / (time.perf_counter() - t)


def _blender_c8(blender: Any, clients: list[list[RankRequest]], how: str) -> float:
    t = time.perf_counter()
    if how == "serial":
        for reqs in clients:
            for r in reqs:
                blender_rank_scores(blender, [r.source], [r.candidates])
    elif how == "threads":

        def run(reqs: list[RankRequest]) -> None:
            for r in reqs:
                blender_rank_scores(blender, [r.source], [r.candidates])

        with ThreadPoolExecutor(len(clients)) as pool:
            for f in [pool.submit(run, reqs) for reqs in clients]:
                f.result()
    elif how == "batched":
        for k in range(len(clients[0])):
            batch = [c[k] for c in clients]
            blender_rank_scores(
                blender, [r.source for r in batch], [r.candidates for r in batch], batch_size=len(batch)
            )
    else:
        raise ValueError(how)
    return sum(len(c) for c in clients) / (time.perf_counter() - t)


def matmul_peak(tokens: int, hidden: int, intermediate: int, repeats: int = 5) -> dict[str, float]:
    """Dense float32 matrix-multiply FLOP/s on this machine, with the threads the ranker uses: a
    large square product and the ranker's own feed-forward shape, the best of ``repeats`` each (a
    peak: what the machine can do, not what it did while busy); the peak is the better shape."""
    import torch

    shapes = {"square_2048": (2048, 2048, 2048), "ffn": (tokens, hidden, intermediate)}
    out: dict[str, float] = {}
    with torch.inference_mode():
        for name, (m, k, n) in shapes.items():
            a, b = torch.randn(m, k), torch.randn(k, n)
            a @ b
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t)
            out[name] = 2 * m * k * n / min(times)
    out["peak"] = max(out.values())
    return out


def count_flops(ranker: PairRMRanker, req: RankRequest) -> int:
    """Matmul FLOPs the ranker executes for one request (torch's FlopCounterMode), counted on the
    calling thread by running the worker's own scoring step (untimed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from service.models.rankers.pairrm import _Job

    unique = list(dict.fromkeys(req.candidates))
    job = _Job(req.source, req.candidates, "full", Future())
    job.texts = ranker._encode(req.source, unique)
    pairs = [(u, v) for u in range(len(unique)) for v in range(len(unique)) if u != v]
    counter = FlopCounterMode(display=False)
    with counter:
        ranker._score([(job, p) for p in pairs])
    return int(counter.get_total_flops())


def _top(ranking_order: list[int], k: int) -> list[int]:
    return ranking_order[:k]


def schemes(ranker: PairRMRanker, reqs: list[RankRequest], k: int = 3) -> dict[str, Any]:
    """The opt-in cheaper schemes: latency, pairs scored, and the share of requests whose top-k
    (top-1 for tournament and bubble, which only find the best) equals the full ranking's."""
    full = [ranker.rank_sync(r.source, r.candidates, "full") for r in reqs]
    out: dict[str, Any] = {}
    for scheme, top in (("tournament", 1), ("bubble", 1), ("topk", k)):
        before = ranker.pairs_scored
        times, agree = [], 0
        for r, f in zip(reqs, full, strict=True):
            t = time.perf_counter()
            got = ranker.rank_sync(r.source, r.candidates, scheme)
            times.append(time.perf_counter() - t)
            agree += _top(got.order(), top) == _top(f.order(), top)
        out[scheme] = {
            "top": top,
            "agreement": agree / len(reqs),
            "pairs_per_request": (ranker.pairs_scored - before) / len(reqs),
            "p50_ms": median(times) * 1000,
        }
    before = ranker.pairs_scored
    times = []
    for r in reqs:
        t = time.perf_counter()
        ranker.rank_sync(r.source, r.candidates, "full")
        times.append(time.perf_counter() - t)
    out["full"] = {"pairs_per_request": (ranker.pairs_scored - before) / len(reqs), "p50_ms": median(times) * 1000}
    return out


def run(w: Workload) -> dict[str, Any]:
    logger.info("ranker %s: loading", w.label)
    reqs = rank_requests(w.c1_requests, seed=11, source_words=w.source_words, cand_words=w.cand_words)
    clients = [
        rank_requests(w.c8_rounds, seed=100 + c, source_words=w.source_words, cand_words=w.cand_words)
        for c in range(CLIENTS)
    ]
    blender_dir = write_blender_ranker(w.checkpoint, CACHE / f"{w.checkpoint.name}-llm-blender-format")
    blender = blender_ranker(blender_dir, w.device, w.dtype)
    ours = PairRMRanker("bench", RankerConfig(checkpoint=str(w.checkpoint), device=w.device, dtype=w.dtype))
    try:
        # Warm-up, and the parity of the two on this workload.
        ours_scores = [ours.rank_sync(r.source, r.candidates).scores for r in reqs]
        ref_scores = [blender_rank_scores(blender, [r.source], [r.candidates])[0] for r in reqs]
        diff = float(np.max(np.abs(np.array(ours_scores) - np.array(ref_scores))))
        same_first = float(
            np.mean([int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(ours_scores, ref_scores, strict=True)])
        )
        tokens = [
            len(t.source) + len(t.cand1[i]) + len(t.cand2[j])
            for t in (ours._encode(r.source, r.candidates) for r in reqs)
            for i in range(len(t.cand1))
            for j in range(len(t.cand2))
            if i != j
        ]
        logger.info("ranker %s: c1 (%d requests x %d)", w.label, len(reqs), w.repeats)
        peaks: list[dict[str, float]] = []
        contenders: dict[str, Callable[[], object]] = {
            "ours": lambda: _ours_c1(ours, reqs),
            "llm_blender": lambda: _blender_c1(blender, reqs),
        }
        if w.flops:
            mc = ours.model.config
            pair_tokens = int(np.mean(tokens))
            contenders["peak"] = lambda: peaks.append(
                matmul_peak(20 * pair_tokens, mc.hidden_size, mc.intermediate_size)
            )
        c1 = alternate(contenders, w.repeats)
        ours_c1 = median([x for run in c1["ours"] for x in run])
        blender_c1 = median([x for run in c1["llm_blender"] for x in run])
        mc = ours.model.config
        out: dict[str, Any] = {
            "model": f"DeBERTa-v2 hidden {mc.hidden_size}, {mc.num_hidden_layers} layers, "
            f"{sum(p.numel() for p in ours.model.parameters()) / 1e6:.3g} M parameters",
            "pair_tokens_mean": float(np.mean(tokens)),
            "max_abs_score_diff_vs_llm_blender": diff,
            "same_first_share": same_first,
            "pairs_per_request": len(reqs[0].candidates) * (len(reqs[0].candidates) - 1),
            "c1_p50_ms": {"ours": ours_c1 * 1000, "llm_blender": blender_c1 * 1000},
            "speedup_c1": blender_c1 / ours_c1,
        }
        logger.info("ranker %s: c8 (%d clients x %d requests)", w.label, CLIENTS, w.c8_rounds)
        c8_contenders = {"ours": lambda: _ours_c8(ours, clients)}
        for how in w.blender_c8:
            c8_contenders[f"llm_blender_{how}"] = lambda how=how: _blender_c8(blender, clients, how)  # type: ignore[misc]
        c8 = alternate(c8_contenders, w.c8_repeats)
        rps = {name: median(v) for name, v in c8.items()}
        # The baseline serves each request with its own Blender.rank call, as a server would;
        # llm-blender batching several clients' inputs in one call is reported beside it.
        best = max((n for n in rps if n not in ("ours", "llm_blender_batched")), key=rps.__getitem__)
        out["c8_requests_per_s"] = rps
        out["c8_baseline"] = best
        out["throughput_ratio_c8"] = rps["ours"] / rps[best]
        if "llm_blender_batched" in rps:
            out["throughput_ratio_c8_vs_batched"] = rps["ours"] / rps["llm_blender_batched"]
        if w.flops:
            # Both sides as "what the machine does when nothing else runs": the best FLOP/s of any
            # timed request against the best matmul rate of any peak sample of the same run (a
            # median would mix in whatever else was running at that moment, on one side only).
            flops = [float(count_flops(ours, r)) for r in reqs]
            rates = [f / t for run in c1["ours"] for f, t in zip(flops, run, strict=True)]
            peak = max(p["peak"] for p in peaks)
            out["flops_per_request"] = median(flops)
            out["matmul_peak_flops"] = peak
            out["matmul_peaks"] = peaks
            out["achieved_flops"] = max(rates)
            out["achieved_flops_median"] = median(rates)
            out["flop_efficiency"] = max(rates) / peak
        if w.schemes_requests:
            logger.info("ranker %s: schemes (%d requests)", w.label, w.schemes_requests)
            sreqs = rank_requests(w.schemes_requests, seed=7, source_words=w.source_words, cand_words=w.cand_words)
            out["schemes"] = schemes(ours, sreqs)
            out["schemes_requests"] = len(sreqs)
        return out
    finally:
        ours.close()
