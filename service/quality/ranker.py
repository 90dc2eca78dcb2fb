"""A PairRM ranker (llm-blender's ``DebertaV2PairRM``, PairRM-hf format) trained from scratch.

Inputs follow llm-blender's tokenization: ``[CLS] <|source|> source [SEP]`` then each candidate as
``[CLS] <|candidateN|> text [SEP]``, cut to the model card's budgets. Training uses llm-blender's
pairwise logistic loss on ordered pairs (both orders) of one right and one wrong candidate.
Ranking is llm-blender's "full" mode with ``max_logits``: M[i, j] = logit(i as candidate 1, j as
candidate 2), score = (M - Mᵀ).mean(-1), best first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.models.checkpoints.formats import pairrm_model
from service.models.compat import import_pairrm
from service.quality import lm, vocab

SOURCE_MAX = 1224
CANDIDATE_MAX = 412


@dataclass(frozen=True)
class RankerRecipe:
    """Encoder size and training of the ranker (``add_reference``, ``hard_weight``: see
    ``train.ranker_pairs``)."""

    hidden: int
    layers: int
    intermediate: int
    steps: int
    lr: float
    seed: int
    batch: int = 64
    warmup: int = 100
    position_buckets: int = 32
    add_reference: bool = True
    hard_weight: int = 1


@dataclass(frozen=True)
class Pair:
    """A source with a better and a worse candidate."""

    source: str
    better: str
    worse: str


def build(words: Sequence[str], recipe: RankerRecipe) -> tuple[Any, Any]:
    """A freshly initialised PairRM and its tokenizer (``words``: single-piece vocabulary)."""
    tok = vocab.pairrm_tokenizer(words)
    model = pairrm_model(
        tok,
        recipe.seed,
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=max(1, recipe.hidden // 64),
        intermediate_size=recipe.intermediate,
        position_buckets=recipe.position_buckets,
    )
    return model, tok


def load(path: Path) -> tuple[Any, Any]:
    """A saved PairRM and its tokenizer, in eval mode."""
    from transformers import AutoTokenizer

    model = import_pairrm().from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def pair_ids(tok: Any, source: str, cand1: str, cand2: str) -> list[int]:
    """One comparison's token ids, as llm-blender's PairRM model card builds them."""
    src: list[int] = tok.encode("<|source|>" + source, max_length=SOURCE_MAX, truncation=True)
    cand_max = (SOURCE_MAX + 2 * CANDIDATE_MAX - len(src)) // 2
    c1: list[int] = tok.encode("<|candidate1|>" + cand1, max_length=cand_max, truncation=True)
    c2: list[int] = tok.encode("<|candidate2|>" + cand2, max_length=cand_max, truncation=True)
    return src + c1 + c2


def _batch(rows: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def train(model: Any, tok: Any, pairs: Sequence[Pair], recipe: lm.Schedule, desc: str = "pairrm") -> float:
    """Pairwise logistic training on both orders of each pair; returns the mean loss of the last 20 steps."""
    rows = []
    for p in pairs:
        rows.append((pair_ids(tok, p.source, p.better, p.worse), 1.0))
        rows.append((pair_ids(tok, p.source, p.worse, p.better), -1.0))

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for chunk in lm.shuffled(len(rows), recipe.batch, recipe.seed):
            inputs = _batch([rows[i][0] for i in chunk], tok.pad_token_id)
            yield {**inputs, "labels": torch.tensor([[rows[i][1]] for i in chunk])}

    torch.manual_seed(recipe.seed)
    warmup = min(recipe.warmup, recipe.steps // 2)
    return lm.train_loop(model, batches(), recipe.steps, recipe.lr, desc, warmup, weight_decay=0.01)


@torch.no_grad()
def scores(
    model: Any, tok: Any, sources: Sequence[str], candidates: Sequence[Sequence[str]], batch: int = 512
) -> list[list[float]]:
    """``max_logits`` scores of each source's candidates (higher is better), full comparison matrix."""
    jobs: list[tuple[int, int, int]] = []
    rows: list[list[int]] = []
    for s, (source, cands) in enumerate(zip(sources, candidates, strict=True)):
        for i, ci in enumerate(cands):
            for j, cj in enumerate(cands):
                if i != j:
                    jobs.append((s, i, j))
                    rows.append(pair_ids(tok, source, ci, cj))
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]))
    logits = [0.0] * len(rows)
    for start in range(0, len(order), batch):
        chunk = order[start : start + batch]
        out = model(**_batch([rows[k] for k in chunk], tok.pad_token_id)).logits
        for k, v in zip(chunk, out.tolist(), strict=True):
            logits[k] = float(v)
    mats = [torch.zeros(len(c), len(c)) for c in candidates]
    for (s, i, j), v in zip(jobs, logits, strict=True):
        mats[s][i, j] = v
    return [((m - m.T).mean(dim=-1)).tolist() for m in mats]


def order(score: Sequence[float]) -> list[int]:
    """Candidate indices best first (ties keep the original order)."""
    return sorted(range(len(score)), key=lambda i: (-score[i], i))
