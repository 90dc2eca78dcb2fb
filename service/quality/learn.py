"""Training pairs from the store: what clients said about the gateway's answers, as PairRM pairs.

For each stored answer with feedback (its source is what the ranker saw: instruction + input):
- ``preferred`` beats every other candidate that says something else; without it, every candidate
  not ``rejected`` beats each rejected one;
- a ``reference`` splits the candidates into right (exact match after normalization, or chrF at
  least ``chrf_threshold`` for free text) and wrong, and every right one beats every wrong one;
- a positive ``rating`` on an answer that was one member's candidate (not fused) counts as
  preferring that candidate; a negative one as rejecting it.
Answers whose inputs were kept as hashes (``store.record_inputs: false``) cannot be learned from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.quality import ranker
from service.quality.suite import normalize

CHRF_THRESHOLD = 80.0


@dataclass(frozen=True)
class Choice:
    """One answer's candidates (distinct texts) and those the feedback says are right: the list a
    ranker must put a right one first in (what the ensemble's answer depends on)."""

    source: str
    candidates: tuple[str, ...]
    right: frozenset[str]


@dataclass
class Gathered:
    pairs: list[ranker.Pair]
    answers: int  # answers with feedback
    skipped_hashed: int  # of them, kept without input texts
    choices: list[Choice] = field(default_factory=list)


def source_of(row: dict[str, Any]) -> str:
    given = row["input"]
    return str(given["instruction"]) + str(given["input_text"])


def matches(text: str, reference: str, chrf_threshold: float) -> bool:
    if normalize(text) == normalize(reference):
        return True
    import sacrebleu

    return float(sacrebleu.sentence_chrf(text, [reference]).score) >= chrf_threshold


def _answered_member(row: dict[str, Any]) -> str | None:
    """The member whose candidate was the answer, when it was not fused."""
    if row["fused"] or not row["candidates"]:
        return None
    selected = row["fusion"].get("selected") or []
    return str(selected[0]) if selected else None


def pairs_of(row: dict[str, Any], notes: Sequence[dict[str, Any]], chrf_threshold: float) -> list[ranker.Pair]:
    """The pairs one answer's feedback gives (without repeats)."""
    return judged(row, notes, chrf_threshold)[0]


def judged(
    row: dict[str, Any], notes: Sequence[dict[str, Any]], chrf_threshold: float
) -> tuple[list[ranker.Pair], set[str]]:
    """The pairs one answer's feedback gives, and the candidate texts it says are right (preferred,
    matching the reference, or rated well as the answer)."""
    source = source_of(row)
    text = {str(c["member"]): str(c["text"]) for c in row["candidates"]}
    better: set[tuple[str, str]] = set()
    right_texts: set[str] = set()

    def prefer(good: str, bad: str) -> None:
        if good in text and bad in text and text[good] != text[bad]:
            better.add((text[good], text[bad]))

    for note in notes:
        preferred, rejected = note["preferred"], list(note["rejected"] or [])
        if note["rating"] is not None and (answered := _answered_member(row)) is not None:
            if note["rating"] > 0 and preferred is None:
                preferred = answered
            elif note["rating"] < 0 and answered not in rejected:
                rejected.append(answered)
        if preferred is not None:  # it beats every other candidate, the rejected ones included
            right_texts.update([text[preferred]] if preferred in text else [])
            for other in text:
                prefer(preferred, other)
        else:  # without a preferred one, every candidate not rejected beats each rejected one
            for bad in rejected:
                for other in text:
                    if other not in rejected:
                        prefer(other, bad)
        if note["reference"]:
            right = [m for m in text if matches(text[m], note["reference"], chrf_threshold)]
            right_texts.update(text[m] for m in right)
            for good in right:
                for bad in text:
                    if bad not in right:
                        prefer(good, bad)
    return [ranker.Pair(source, good, bad) for good, bad in sorted(better)], right_texts


def gather_pairs(
    answered: Iterable[tuple[dict[str, Any], list[dict[str, Any]]]], chrf_threshold: float = CHRF_THRESHOLD
) -> Gathered:
    pairs: list[ranker.Pair] = []
    choices: list[Choice] = []
    count = hashed = 0
    for row, notes in answered:
        count += 1
        if row["inputs_hashed"]:
            hashed += 1
            continue
        got, right = judged(row, notes, chrf_threshold)
        pairs += got
        texts = tuple(dict.fromkeys(str(c["text"]) for c in row["candidates"]))
        if right and len(texts) > len(right & set(texts)):
            choices.append(Choice(source_of(row), texts, frozenset(right)))
    return Gathered(pairs, count, hashed, choices)


async def read_store(
    url: str, ensemble: str | None = None, *, unrated: bool = False
) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Every answer with feedback in the store at ``url``, with its feedback; ``unrated``: every
    answer (oldest first), those without feedback with an empty list."""
    from service.config.store import StoreConfig
    from service.store import Store
    from service.telemetry.metrics import Metrics

    store = Store(StoreConfig(url=url), Path("."), Metrics())
    try:
        rated = await store.with_feedback(ensemble)
        if not unrated:
            return rated
        notes = {row["id"]: n for row, n in rated}
        return [(row, notes.get(row["id"], [])) for row in await store.all_answers(ensemble)]
    finally:
        await store.close()


def export(
    answered: Sequence[tuple[dict[str, Any], list[dict[str, Any]]]], out: Path, chrf_threshold: float
) -> dict[str, int]:
    """``records.jsonl`` (each answer with its feedback) and ``pairs.jsonl`` ({source, chosen,
    rejected}, what ``train-ranker --data`` reads) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    gathered = gather_pairs(answered, chrf_threshold)
    with (out / "records.jsonl").open("w", encoding="utf-8") as f:
        for row, notes in answered:
            f.write(json.dumps({**row, "feedback": notes}, ensure_ascii=False) + "\n")
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for p in gathered.pairs:
            f.write(
                json.dumps({"source": p.source, "chosen": p.better, "rejected": p.worse}, ensure_ascii=False) + "\n"
            )
    return {"records": len(answered), "pairs": len(gathered.pairs), "skipped_hashed": gathered.skipped_hashed}
