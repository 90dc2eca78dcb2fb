"""Ranking: the ``Ranker`` interface, llm-blender's score aggregation, and the comparison schemes.

Scores reproduce llm-blender's "full" mode: M[i, j] is the PairRM logit of candidate i against
candidate j (i as ``<|candidate1|>``), M[i, i] = 0, and

- ``max_logits``: score = (M - Mᵀ).mean(axis=-1)
- ``max_wins``:   score = (M > 0).sum(-1) + (M < 0).mean(-2)

Rank 1 is the highest score; equal scores share the better rank (llm-blender's rule). Cheaper
schemes (opt-in, ``RankerConfig.scheme``) are plans that ask for pairs round by round.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.config import RankerConfig


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
    ``ModelError`` on failure. Model work runs off the event loop. ``close`` stops the model's
    thread; requests still waiting then fail with ``ModelError``.
    """

    name: str

    async def rank(self, source: str, candidates: list[str]) -> Ranking: ...

    def close(self) -> None: ...


def fusion_lead(scores: Sequence[float | None], texts: Sequence[str]) -> float | None:
    """The first candidate's lead in score over the best candidate that says something else, both
    lists in rank order (best first); texts are compared with surrounding white space trimmed.

    ``inf`` when every candidate says the same; None when a score needed is missing. Adaptive fusion
    skips the fuser when this lead reaches the ensemble's margin: a candidate that repeats the
    first one is no rival to it (PairRM gives equal texts nearly equal scores, so the plain lead
    over the runner-up is about 0 exactly when the members agree), and fusing an answer with
    copies of itself adds nothing.
    """
    first = texts[0].strip()
    rival = next((k for k in range(1, len(texts)) if texts[k].strip() != first), None)
    if rival is None:
        return math.inf
    best, other = scores[0], scores[rival]
    if best is None or other is None:
        return None
    return best - other


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


def ranks_from_scores(scores: Sequence[float] | np.ndarray) -> list[int]:
    """1 = best; equal scores share the better rank."""
    ordered = sorted((float(s) for s in scores), reverse=True)
    return [ordered.index(float(s)) + 1 for s in scores]


# ---------------------------------------------------------------------------------------------
# Comparison schemes. A plan is a generator over the unique texts: it yields the ordered pairs
# (u, v) whose logits it needs next, finds them in ``logits`` when resumed, and returns the
# Ranking of the original candidates (``where[c]`` is candidate c's unique text).

Pair = tuple[int, int]
Plan = Generator[list[Pair], None, Ranking]


def full_plan(where: list[int], logits: dict[Pair, float], aggregation: str) -> Plan:
    """llm-blender's "full" mode: every ordered pair. A text that occurs more than once is also
    compared with itself, the value its copies get against each other in llm-blender."""
    m = max(where) + 1
    dup = {u for u in range(m) if where.count(u) > 1}
    yield [(u, v) for u in range(m) for v in range(m) if u != v or u in dup]
    n = len(where)
    matrix = np.zeros((n, n), dtype=np.float32)
    for a in range(n):
        for b in range(n):
            if a != b:
                matrix[a, b] = logits[(where[a], where[b])]
    scores = scores_from_matrix(matrix, aggregation)
    return Ranking([float(s) for s in scores], ranks_from_scores(scores))


def _winner(a: int, b: int, where: list[int], logits: dict[Pair, float]) -> int:
    """A match compares both orders, as llm-blender's bubble mode does; a tie goes to the
    earlier candidate (copies of one text always tie)."""
    ua, ub = where[a], where[b]
    d = 0.0 if ua == ub else logits[(ua, ub)] - logits[(ub, ua)]
    if d > 0:
        return a
    if d < 0:
        return b
    return min(a, b)


def _play(matches: list[Pair], where: list[int], logits: dict[Pair, float]) -> Generator[list[Pair], None, list[int]]:
    """Play independent matches in one round; pairs already known are not asked again."""
    need: list[Pair] = []
    for a, b in matches:
        ua, ub = where[a], where[b]
        if ua != ub:
            need.extend(p for p in ((ua, ub), (ub, ua)) if p not in logits and p not in need)
    if need:
        yield need
    return [_winner(a, b, where, logits) for a, b in matches]


def _knockout(
    players: list[int], where: list[int], logits: dict[Pair, float], lost_to: dict[int, list[int]]
) -> Generator[list[Pair], None, tuple[int, dict[int, int]]]:
    """Single elimination: the winner, and the round each player left in (the winner: one past the
    last round). n - 1 matches, ceil(log2 n) rounds; an odd player out waits for the next round."""
    alive = list(players)
    out: dict[int, int] = {}
    rnd = 0
    while len(alive) > 1:
        rnd += 1
        matches = [(alive[k], alive[k + 1]) for k in range(0, len(alive) - 1, 2)]
        winners = yield from _play(matches, where, logits)
        for (a, b), w in zip(matches, winners, strict=True):
            loser = b if w == a else a
            lost_to.setdefault(loser, []).append(w)
            out[loser] = rnd
        alive = winners + (alive[-1:] if len(alive) % 2 else [])
    out[alive[0]] = rnd + 1
    return alive[0], out


def tournament_plan(where: list[int], logits: dict[Pair, float]) -> Plan:
    """The best in n - 1 matches (2(n - 1) comparisons); the others ordered by the round they
    left in. Scores are those rounds, not PairRM scores."""
    _, reached = yield from _knockout(list(range(len(where))), where, logits, {})
    scores = [float(reached[c]) for c in range(len(where))]
    return Ranking(scores, ranks_from_scores(scores))


def bubble_plan(where: list[int], logits: dict[Pair, float]) -> Plan:
    """One bubble pass in candidate order (llm-blender's bubble mode, without its random
    permutation): the winner so far meets the next. Scores are the step each candidate lost at."""
    n = len(where)
    scores = [0.0] * n
    best = 0
    for step, nxt in enumerate(range(1, n), start=1):
        (w,) = yield from _play([(best, nxt)], where, logits)
        scores[nxt if w == best else best] = float(step)
        best = w
    scores[best] = float(n)
    return Ranking(scores, ranks_from_scores(scores))


def topk_plan(where: list[int], logits: dict[Pair, float], k: int) -> Plan:
    """The best k in order, by tournament selection: after the knockout, the next best can only be
    one that lost to nobody but those already selected (if comparisons are transitive), so only
    those play again, reusing every result known. The rest share rank k + 1."""
    n = len(where)
    lost_to: dict[int, list[int]] = {}
    champion, _ = yield from _knockout(list(range(n)), where, logits, lost_to)
    selected = [champion]
    while len(selected) < min(k, n):
        rest = [c for c in range(n) if c not in selected]
        contenders = [c for c in rest if all(w in selected for w in lost_to.get(c, []))]
        # Intransitive results can leave nobody beaten only by the selected: then all play.
        nxt, _ = yield from _knockout(contenders or rest, where, logits, lost_to)
        selected.append(nxt)
    scores = [0.0] * n
    for pos, c in enumerate(selected):
        scores[c] = float(n - pos)
    return Ranking(scores, ranks_from_scores(scores))


def make_plan(scheme: str, where: list[int], logits: dict[Pair, float], config: RankerConfig) -> Plan:
    if scheme == "full":
        return full_plan(where, logits, config.aggregation)
    if scheme == "tournament":
        return tournament_plan(where, logits)
    if scheme == "bubble":
        return bubble_plan(where, logits)
    if scheme == "topk":
        return topk_plan(where, logits, config.select_k)
    raise ValueError(f"unknown scheme {scheme!r}")
