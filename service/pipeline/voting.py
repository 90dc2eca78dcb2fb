"""Majority vote over candidates: the answer most members gave, compared in a normal form.

For short answers (a number, a word, a label) several members saying the same thing is evidence
that it is right (self-consistency, prompt ensembles). Free text almost never repeats exactly, so
there every answer gets one vote and the tie-break decides: the ranker's score when the ensemble
has a ranker, else member order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


def normalize_answer(text: str) -> str:
    """The form answers are compared in: stripped, one trailing period dropped, casefolded."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    return text.casefold()


@dataclass(frozen=True)
class Vote:
    counts: list[int]  # per candidate: how many candidates gave its (normalized) answer
    order: list[int]  # candidate indices: most votes first; ties by score, then by position
    outcome: str  # unanimous | majority | plurality | tie

    @property
    def winner(self) -> int:
        return self.order[0]


def vote(texts: Sequence[str], scores: Sequence[float | None] | None = None) -> Vote:
    """Order candidates (given in member order) by votes. Candidates with equal votes keep the order
    of their score (higher first) where every candidate has one, else their position."""
    keys = [normalize_answer(t) for t in texts]
    tally = Counter(keys)
    counts = [tally[k] for k in keys]
    given = list(scores) if scores is not None else []
    tie_scores = [float(s) for s in given if s is not None]
    if len(tie_scores) != len(texts):
        tie_scores = [0.0] * len(texts)  # no ranker (or a partial one): position decides

    def rank_key(i: int) -> tuple[int, float, int]:
        return (-counts[i], -tie_scores[i], i)

    order = sorted(range(len(texts)), key=rank_key)
    top = sorted(tally.values(), reverse=True)  # at least one candidate: the pipeline needs one to answer
    if top[0] == len(texts):
        outcome = "unanimous"
    elif top[0] * 2 > len(texts):
        outcome = "majority"
    elif top[0] > top[1]:  # not unanimous, so a second answer exists
        outcome = "plurality"
    else:
        outcome = "tie"
    return Vote(counts, order, outcome)
