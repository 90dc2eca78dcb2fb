"""``ensemble-gateway train-ranker``: fine-tune any PairRM-hf checkpoint (the published one, or ours)
on your own preferences, and write a PairRM-hf directory the gateway serves unchanged.

Data: JSONL, one of per line ``{"source", "chosen", "rejected"}`` or ``{"source", "candidates":
[...], "ranks": [...]}`` (1 = best; every better-worse pair of the ranking is used). The pairs of a
held-out share of the sources are kept aside; the pairwise accuracy on them (the chosen candidate's
logit against the rejected one's, both orders, as llm-blender compares) is measured before and after.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.quality import ranker


@dataclass(frozen=True)
class FineTune:
    steps: int = 300
    lr: float = 3e-5
    seed: int = 0
    batch: int = 16
    warmup: int = 30


def _pairs(obj: Any) -> list[ranker.Pair]:
    if not isinstance(obj, dict) or not isinstance(obj.get("source"), str):
        raise ValueError("need an object with a string `source`")
    source = obj["source"]
    if "chosen" in obj or "rejected" in obj:
        chosen, rejected = obj.get("chosen"), obj.get("rejected")
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise ValueError("`chosen` and `rejected` must be strings")
        return [ranker.Pair(source, chosen, rejected)]
    cands, ranks = obj.get("candidates"), obj.get("ranks")
    if not (isinstance(cands, list) and isinstance(ranks, list) and len(cands) == len(ranks) >= 2):
        raise ValueError("give `chosen` and `rejected`, or `candidates` with as many `ranks` (1 = best)")
    if not all(isinstance(c, str) for c in cands) or not all(isinstance(r, int) for r in ranks):
        raise ValueError("`candidates` must be strings and `ranks` integers")
    return [
        ranker.Pair(source, cands[i], cands[j])
        for i in range(len(cands))
        for j in range(len(cands))
        if ranks[i] < ranks[j]
    ]


def read_preferences(path: Path) -> tuple[list[ranker.Pair], list[tuple[int, str]]]:
    """The pairs of every good line, and (line number, why) for each bad one."""
    pairs: list[ranker.Pair] = []
    bad: list[tuple[int, str]] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                try:
                    pairs += _pairs(json.loads(text))
                except ValueError as e:
                    bad.append((number, str(e).split("\n")[0]))
    return pairs, bad


def split(pairs: Sequence[ranker.Pair], heldout: float, seed: int) -> tuple[list[ranker.Pair], list[ranker.Pair]]:
    """(train, held out), by source: no source has pairs on both sides."""
    sources = sorted({p.source for p in pairs})
    random.Random(seed).shuffle(sources)
    keep = set(sources[: round(len(sources) * heldout)]) if len(sources) > 1 else set()
    return [p for p in pairs if p.source not in keep], [p for p in pairs if p.source in keep]


@torch.no_grad()
def accuracy(model: Any, tok: Any, pairs: Sequence[ranker.Pair]) -> float | None:
    """Share of pairs whose chosen candidate wins: logit(chosen, rejected) - logit(rejected, chosen) > 0."""
    if not pairs:
        return None
    model.eval()
    wins = 0
    for start in range(0, len(pairs), 64):
        chunk = pairs[start : start + 64]
        rows = [ranker.pair_ids(tok, p.source, p.better, p.worse) for p in chunk]
        rows += [ranker.pair_ids(tok, p.source, p.worse, p.better) for p in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        logits = model(input_ids=ids, attention_mask=mask).logits.reshape(-1)
        wins += int((logits[: len(chunk)] - logits[len(chunk) :] > 0).sum())
    return wins / len(pairs)


def fine_tune(checkpoint: Path, data: Path, out: Path, fit: FineTune, heldout: float = 0.1) -> dict[str, Any]:
    """Train ``checkpoint`` on ``data``'s pairs, save it to ``out``; the held-out accuracy before and after."""
    pairs, bad = read_preferences(data)
    if not pairs:
        raise ValueError(f"no usable preference in {data}")
    result = fine_tune_pairs(checkpoint, pairs, out, fit, heldout)
    result["bad_lines"] = [{"line": n, "why": w} for n, w in bad]
    return result


def fine_tune_pairs(
    checkpoint: Path, pairs: Sequence[ranker.Pair], out: Path, fit: FineTune, heldout: float = 0.1
) -> dict[str, Any]:
    """Train ``checkpoint`` on ``pairs`` (a share of their sources held out), save it to ``out``."""
    train, test = split(pairs, heldout, fit.seed)
    model, tok = ranker.load(checkpoint)
    before = accuracy(model, tok, test)
    loss = ranker.train(model, tok, train, fit, desc="train-ranker")
    after = accuracy(model, tok, test)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "pairs": {"train": len(train), "heldout": len(test)},
        "heldout_accuracy": {"before": before, "after": after},
        "final_loss": loss,
    }
