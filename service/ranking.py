"""Rankers: order candidates best first. PairRM compares every ordered pair, as llm-blender does.

Scores reproduce llm-blender's "full" mode: M[i, j] is the PairRM logit of candidate i against
candidate j (i as ``<|candidate1|>``), M[i, i] = 0, and

- ``max_logits``: score = (M - Mᵀ).mean(axis=-1)
- ``max_wins``:   score = (M > 0).sum(-1) + (M < 0).mean(-2)

Rank 1 is the highest score; equal scores share the better rank (llm-blender's rule). Unlike
llm-blender, which runs the n(n-1) pairs one after another, all pairs of a request go through the
model in a few batched forwards with dynamic padding.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.config import RankerConfig

logger = logging.getLogger(__name__)

SOURCE_PREFIX = "<|source|>"
CAND1_PREFIX = "<|candidate1|>"
CAND2_PREFIX = "<|candidate2|>"


@dataclass(frozen=True)
class Ranking:
    scores: list[float]
    ranks: list[int]

    def order(self) -> list[int]:
        """Candidate indices best first; ties keep their original order."""
        return sorted(range(len(self.ranks)), key=lambda i: (self.ranks[i], i))


class Ranker(Protocol):
    """Scores candidates for a source text (instruction + input); higher is better.

    ``rank`` returns one score and one rank per candidate, in the candidates' order, and raises
    ``ModelError`` on failure. Model work runs off the event loop.
    """

    name: str

    async def rank(self, source: str, candidates: list[str]) -> Ranking: ...

    def close(self) -> None: ...


def _strip_markers(text: str) -> str:
    """PairRM locates its three marker tokens by id: a text that contains one would break it."""
    for marker in (SOURCE_PREFIX, CAND1_PREFIX, CAND2_PREFIX, "<|candidate|>"):
        text = text.replace(marker, "")
    return text


def scores_from_matrix(matrix: np.ndarray, aggregation: str) -> np.ndarray:
    """Aggregate an n×n comparison matrix into n scores (float32, as llm-blender computes them)."""
    m = matrix.astype(np.float32)
    if aggregation == "max_logits":
        scores: np.ndarray = (m - m.T).mean(axis=-1)
    elif aggregation == "max_wins":
        scores = (m > 0).sum(axis=-1) + (m < 0).mean(axis=-2)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    return scores.astype(np.float32)


def ranks_from_scores(scores: np.ndarray) -> list[int]:
    """1 = best; equal scores share the better rank."""
    ordered = sorted((float(s) for s in scores), reverse=True)
    return [ordered.index(float(s)) + 1 for s in scores]


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class PairRMRanker:
    """llm-blender's ``DebertaV2PairRM`` on a PairRM-hf checkpoint (directory or hub id)."""

    def __init__(self, name: str, config: RankerConfig):
        import torch
        from transformers import AutoTokenizer

        from service.compat import import_pairrm

        self.name = name
        self.config = config
        self._torch = torch
        start = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(config.checkpoint)
        model_cls = import_pairrm()
        self.model = model_cls.from_pretrained(config.checkpoint, dtype=torch_dtype(config.dtype)).to(config.device)
        self.model.eval()
        # One thread owns the model: torch work never runs on the event loop, nor concurrently.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ranker-{name}")
        logger.info("ranker %s loaded in %.1fs", name, time.perf_counter() - start)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def rank(self, source: str, candidates: list[str]) -> Ranking:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.rank_sync, source, candidates)

    def encode_pairs(self, source: str, candidates: list[str], pairs: list[tuple[int, int]]) -> list[list[int]]:
        """Token ids of the given ordered pairs, tokenized as the PairRM-hf model card does.

        Each text is tokenized once: a candidate's ids depend only on its prefix and the length
        budget left by the source, so pairs reuse them.
        """
        cfg = self.config
        tok = self.tokenizer
        source, candidates = _strip_markers(source), [_strip_markers(c) for c in candidates]
        source_ids = tok.encode(SOURCE_PREFIX + source, max_length=cfg.source_max_length, truncation=True)
        budget = (cfg.source_max_length + 2 * cfg.candidate_max_length - len(source_ids)) // 2
        c1 = [tok.encode(CAND1_PREFIX + c, max_length=budget, truncation=True) for c in candidates]
        c2 = [tok.encode(CAND2_PREFIX + c, max_length=budget, truncation=True) for c in candidates]
        return [source_ids + c1[i] + c2[j] for i, j in pairs]

    def compare_matrix(self, source: str, candidates: list[str]) -> np.ndarray:
        """M[i, j] for every ordered pair i ≠ j (M[i, i] = 0).

        Identical candidates are compared once: the unique texts are compared (a duplicated text
        also against itself, as llm-blender does for its copies) and the values copied, so copies
        get bit-identical scores and tie exactly as they do in llm-blender.
        """
        torch = self._torch
        unique = list(dict.fromkeys(candidates))
        where = [unique.index(c) for c in candidates]
        dup = {u for u in range(len(unique)) if where.count(u) > 1}
        pairs = [(i, j) for i in range(len(unique)) for j in range(len(unique)) if i != j or i in dup]
        seqs = self.encode_pairs(source, unique, pairs)
        values = np.zeros((len(unique), len(unique)), dtype=np.float32)
        # Similar lengths in a batch keep padding small.
        order = sorted(range(len(pairs)), key=lambda k: len(seqs[k]))
        pad = self.tokenizer.pad_token_id or 0
        step = self.config.max_batch_pairs
        with torch.inference_mode():
            for start in range(0, len(order), step):
                chunk = order[start : start + step]
                width = max(len(seqs[k]) for k in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, k in enumerate(chunk):
                    ids[row, : len(seqs[k])] = torch.tensor(seqs[k], dtype=torch.long)
                    mask[row, : len(seqs[k])] = 1
                out = self.model(input_ids=ids.to(self.config.device), attention_mask=mask.to(self.config.device))
                logits = out.logits.float().cpu().numpy()
                for k, value in zip(chunk, logits, strict=True):
                    values[pairs[k]] = value
        n = len(candidates)
        matrix = np.zeros((n, n), dtype=np.float32)
        for i in range(n):
            for j in range(n):
                if i != j:
                    matrix[i, j] = values[where[i], where[j]]
        return matrix

    def rank_sync(self, source: str, candidates: list[str]) -> Ranking:
        if len(candidates) == 1:
            return Ranking(scores=[0.0], ranks=[1])
        matrix = self.compare_matrix(source, candidates)
        scores = scores_from_matrix(matrix, self.config.aggregation)
        return Ranking(scores=[float(s) for s in scores], ranks=ranks_from_scores(scores))
