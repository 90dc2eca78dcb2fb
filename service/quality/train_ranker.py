"""``ensemble-gateway train-ranker``: fine-tune any PairRM-hf checkpoint (the published one, or ours)
on your own preferences, and write a PairRM-hf directory the gateway serves unchanged.

Data: JSONL, one of per line ``{"source", "chosen", "rejected"}`` or ``{"source", "candidates":
[...], "ranks": [...]}`` (1 = best; every better-worse pair of the ranking is used). The pairs of a
held-out share of the sources are kept aside; the pairwise accuracy on them (the chosen candidate's
logit against the rejected one's, both orders, as llm-blender compares) is measured before and after.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from service.quality import lm, ranker
from service.quality.lm import FineTune


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
    return lm.read_jsonl(path, _pairs)


def split(pairs: Sequence[ranker.Pair], heldout: float, seed: int) -> tuple[list[ranker.Pair], list[ranker.Pair]]:
    """(train, held out), by source: no source has pairs on both sides."""
    return lm.split_by(pairs, lambda p: p.source, heldout, seed)


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


@torch.no_grad()
def top1(model: Any, tok: Any, choices: Sequence[Any]) -> float | None:
    """Share of lists whose best candidate is a right one: each candidate's score is the sum of its
    logits against every other candidate, minus theirs against it (PairRM's full comparison)."""
    if not choices:
        return None
    model.eval()
    hits = 0
    for choice in choices:
        cands = list(choice.candidates)
        order = [(i, j) for i in range(len(cands)) for j in range(len(cands)) if i != j]
        logits: list[float] = []
        for start in range(0, len(order), 64):
            rows = [ranker.pair_ids(tok, choice.source, cands[i], cands[j]) for i, j in order[start : start + 64]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for k, r in enumerate(rows):
                ids[k, : len(r)], mask[k, : len(r)] = torch.tensor(r), 1
            logits += model(input_ids=ids, attention_mask=mask).logits.reshape(-1).tolist()
        score = [0.0] * len(cands)
        for (i, j), logit in zip(order, logits, strict=True):
            score[i] += logit
            score[j] -= logit
        hits += cands[max(range(len(cands)), key=lambda k: score[k])] in choice.right
    return hits / len(choices)


def fine_tune_pairs(
    checkpoint: Path,
    pairs: Sequence[ranker.Pair],
    out: Path,
    fit: FineTune,
    heldout: float = 0.1,
    choices: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train ``checkpoint`` on ``pairs`` (a share of their sources held out), save it to ``out``.
    ``choices`` (``learn.Choice``: a candidate list and its right ones) of the held-out sources
    are scored before and after as the ensemble uses the ranker: is its first choice right?"""
    train, test = split(pairs, heldout, fit.seed)
    held = {p.source for p in test}
    lists = [c for c in choices if c.source in held]
    model, tok = ranker.load(checkpoint)
    before, before_top1 = accuracy(model, tok, test), top1(model, tok, lists)
    loss = ranker.train(model, tok, train, fit, desc="train-ranker")
    after, after_top1 = accuracy(model, tok, test), top1(model, tok, lists)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {
        "checkpoint": str(checkpoint),
        "out": str(out),
        "pairs": {"train": len(train), "heldout": len(test)},
        "heldout_accuracy": {"before": before, "after": after},
        "heldout_top1": {"lists": len(lists), "before": before_top1, "after": after_top1},
        "final_loss": loss,
    }
