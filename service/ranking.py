"""Rankers: order candidates best first. PairRM compares ordered pairs, as llm-blender does.

Scores reproduce llm-blender's "full" mode: M[i, j] is the PairRM logit of candidate i against
candidate j (i as ``<|candidate1|>``), M[i, i] = 0, and

- ``max_logits``: score = (M - Mᵀ).mean(axis=-1)
- ``max_wins``:   score = (M > 0).sum(-1) + (M < 0).mean(-2)

Rank 1 is the highest score; equal scores share the better rank (llm-blender's rule).

How the work runs: each ``PairRMRanker`` owns one worker thread and the model. Requests hand their
texts to the worker and await a future; the worker tokenizes each text once, gathers the pairs of
every request waiting (up to ``max_batch_tokens``, waiting at most ``max_wait_ms`` for company),
sorts them by length and runs them in as few padded forwards as the bounds allow. Identical
candidates are compared once. Cheaper comparison schemes (opt-in, see ``RankerConfig.scheme``) are
plans that ask for pairs round by round; their rounds batch with everything else in flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.config import RankerConfig
from service.deberta import PackedDeberta, supports
from service.errors import ModelError

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
    ``ModelError`` on failure. Model work runs off the event loop. ``close`` stops the model's
    thread; requests still waiting then fail with ``ModelError``.
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


def ranks_from_scores(scores: Sequence[float] | np.ndarray) -> list[int]:
    """1 = best; equal scores share the better rank."""
    ordered = sorted((float(s) for s in scores), reverse=True)
    return [ordered.index(float(s)) + 1 for s in scores]


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


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


# ---------------------------------------------------------------------------------------------
# The batching worker.


@dataclass(frozen=True)
class Outcome:
    """What a request got: its ranking, the logits of the unique texts' pairs, and the map from
    candidates to unique texts (so the comparison matrix can be rebuilt)."""

    ranking: Ranking
    logits: dict[Pair, float]
    where: list[int]

    def matrix(self) -> np.ndarray:
        n = len(self.where)
        m = np.zeros((n, n), dtype=np.float32)
        for a in range(n):
            for b in range(n):
                pair = (self.where[a], self.where[b])
                if a != b and pair in self.logits:
                    m[a, b] = self.logits[pair]
        return m


@dataclass
class _Texts:
    """A request's texts, tokenized once: the source and each unique candidate in both roles."""

    source: list[int]
    cand1: list[list[int]]
    cand2: list[list[int]]


@dataclass
class _Job:
    source: str
    candidates: list[str]
    scheme: str
    future: Future[Outcome]
    where: list[int] = field(default_factory=list)
    texts: _Texts | None = None
    plan: Plan | None = None
    logits: dict[Pair, float] = field(default_factory=dict)
    need: list[Pair] = field(default_factory=list)

    def advance(self) -> bool:
        """Resume the plan with the logits it asked for; True once the job is finished."""
        assert self.plan is not None
        try:
            self.need = self.plan.send(None)
        except StopIteration as done:
            self.future.set_result(Outcome(done.value, self.logits, self.where))
            return True
        except Exception as e:  # a bug in a plan fails its own request, not the others
            self.future.set_exception(_model_error(f"ranking failed: {e}", e))
            return True
        return False

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


_STOP = object()


def _model_error(message: str, cause: BaseException) -> ModelError:
    """A ``ModelError`` for a future, with its cause attached (``raise ... from`` cannot be used)."""
    error = ModelError(message)
    error.__cause__ = cause
    return error


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
        self.model.requires_grad_(False)
        mc = self.model.config
        self._marker_ids = (mc.source_prefix_id, mc.cand1_prefix_id, mc.cand2_prefix_id)
        self._pad = self.tokenizer.pad_token_id or 0
        self._packed = PackedDeberta(self.model.pretrained_model) if config.packed and supports(mc) else None
        self.forwards = 0  # forward passes run, for the benchmark and tests
        self.pairs_scored = 0
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        # One thread owns the model: torch work never runs on the event loop, nor concurrently.
        self._thread = threading.Thread(target=self._run, name=f"ranker-{name}", daemon=True)
        self._thread.start()
        logger.info("ranker %s loaded in %.1fs", name, time.perf_counter() - start)

    # -- the interface --------------------------------------------------------------------

    async def rank(self, source: str, candidates: list[str], *, scheme: str | None = None) -> Ranking:
        if len(candidates) == 1:
            return Ranking(scores=[0.0], ranks=[1])
        outcome = await asyncio.wrap_future(self.submit(source, candidates, scheme))
        return outcome.ranking

    def close(self, timeout: float = 60.0) -> None:
        """Stop taking requests, fail those not started, and end the worker once its current
        forward is done (waiting at most ``timeout`` seconds for it)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("ranker %s: worker still busy %.0fs after close", self.name, timeout)

    def submit(self, source: str, candidates: list[str], scheme: str | None = None) -> Future[Outcome]:
        """Queue a request for the worker; thread-safe. The future holds its ``Outcome``."""
        scheme = scheme or self.config.scheme
        if not candidates:
            raise ValueError("no candidates")
        future: Future[Outcome] = Future()
        with self._lock:
            if self._closed:
                raise ModelError(f"ranker {self.name} is closed")
            self._inbox.put(_Job(source, list(candidates), scheme, future))
        return future

    def rank_sync(self, source: str, candidates: list[str], scheme: str | None = None) -> Ranking:
        """Blocking ``rank`` for scripts and tests (never from the event loop)."""
        if len(candidates) == 1:
            return Ranking(scores=[0.0], ranks=[1])
        return self.submit(source, candidates, scheme).result().ranking

    def compare_matrix(self, source: str, candidates: list[str]) -> np.ndarray:
        """M[i, j] for every ordered pair i ≠ j (M[i, i] = 0), as the "full" scheme computes it."""
        return self.submit(source, candidates, "full").result().matrix()

    # -- tokenization ---------------------------------------------------------------------

    def _encode(self, source: str, unique: list[str]) -> _Texts:
        """Tokenized as the PairRM-hf model card does, each text once: a candidate's ids depend
        only on its prefix and the length budget the source leaves, so every pair reuses them."""
        cfg = self.config
        tok = self.tokenizer
        source_ids = tok.encode(
            SOURCE_PREFIX + _strip_markers(source), max_length=cfg.source_max_length, truncation=True
        )
        budget = (cfg.source_max_length + 2 * cfg.candidate_max_length - len(source_ids)) // 2
        texts = [_strip_markers(c) for c in unique]
        c1 = [tok.encode(CAND1_PREFIX + c, max_length=budget, truncation=True) for c in texts]
        c2 = [tok.encode(CAND2_PREFIX + c, max_length=budget, truncation=True) for c in texts]
        return _Texts(source_ids, c1, c2)

    def encode_pairs(self, source: str, candidates: list[str], pairs: list[Pair]) -> list[list[int]]:
        """Token ids of the given ordered pairs (source + candidate1 + candidate2)."""
        t = self._encode(source, candidates)
        return [t.source + t.cand1[i] + t.cand2[j] for i, j in pairs]

    # -- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        active: list[_Job] = []
        stopping = False
        while not stopping:
            stopping = self._gather(active)
            if stopping:
                break
            try:
                self._score([(job, pair) for job in active for pair in job.need])
            except Exception as e:
                logger.exception("ranker %s: forward failed", self.name)
                for job in active:
                    job.fail(_model_error(f"ranker {self.name}: {type(e).__name__}: {e}", e))
                active = []
                continue
            active = [job for job in active if not job.advance()]
        closed = ModelError(f"ranker {self.name} is closed")
        for job in active:
            job.fail(closed)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job) and item.future.set_running_or_notify_cancel():
                item.fail(closed)

    def _gather(self, active: list[_Job]) -> bool:
        """Add waiting requests to ``active``; True when the ranker is closing. Idle, it blocks for
        the first request, then waits up to ``max_wait_ms`` for more while the batch has room."""
        wait_s = self.config.max_wait_ms / 1000
        deadline: float | None = None
        block = not active
        while True:
            try:
                if block:
                    item = self._inbox.get()
                elif deadline is not None:
                    item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._inbox.get_nowait()
            except queue.Empty:
                return False
            if item is _STOP:
                return True
            self._start(item, active)
            if block:
                block = False
                if wait_s > 0:
                    deadline = time.monotonic() + wait_s
            if active and self._pending_tokens(active) >= self.config.max_batch_tokens:
                return False
            if not active:
                block, deadline = True, None  # everything so far finished without the model

    def _start(self, job: _Job, active: list[_Job]) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # its caller went away
        try:
            unique = list(dict.fromkeys(job.candidates))
            job.where = [unique.index(c) for c in job.candidates]
            job.texts = self._encode(job.source, unique)
            job.plan = make_plan(job.scheme, job.where, job.logits, self.config)
        except Exception as e:
            job.fail(_model_error(f"ranker {self.name}: {type(e).__name__}: {e}", e))
            return
        if not job.advance():
            active.append(job)

    @staticmethod
    def _pair_len(job: _Job, pair: Pair) -> int:
        t = job.texts
        assert t is not None
        return len(t.source) + len(t.cand1[pair[0]]) + len(t.cand2[pair[1]])

    def _pending_tokens(self, active: list[_Job]) -> int:
        return sum(self._pair_len(job, p) for job in active for p in job.need)

    def _score(self, items: list[tuple[_Job, Pair]]) -> None:
        """Logits for every (request, pair), shortest first, in forwards bounded in pairs and in
        padded tokens; each forward is padded only to its own longest pair."""
        lengths = [self._pair_len(job, pair) for job, pair in items]
        order = sorted(range(len(items)), key=lengths.__getitem__)
        cfg = self.config
        chunk: list[int] = []
        for k in order:
            if chunk and ((len(chunk) + 1) * lengths[k] > cfg.max_batch_tokens or len(chunk) >= cfg.max_batch_pairs):
                self._forward([items[i] for i in chunk])
                chunk = []
            chunk.append(k)
        if chunk:
            self._forward([items[i] for i in chunk])

    def _forward(self, items: list[tuple[_Job, Pair]]) -> None:
        torch = self._torch
        seqs: list[list[int]] = []
        where = np.zeros((3, len(items)), dtype=np.int64)
        src_id, c1_id, c2_id = self._marker_ids
        for row, (job, (u, v)) in enumerate(items):
            t = job.texts
            assert t is not None
            seqs.append(t.source + t.cand1[u] + t.cand2[v])
            # Each marker occurs once (texts are stripped of them): its position is known.
            where[0, row] = t.source.index(src_id)
            where[1, row] = len(t.source) + t.cand1[u].index(c1_id)
            where[2, row] = len(t.source) + len(t.cand1[u]) + t.cand2[v].index(c2_id)
        device = self.config.device
        with torch.inference_mode():
            if self._packed is not None:
                hidden, starts = self._packed.encode(seqs)  # [tokens, hidden], each pair's first row
                pos = torch.from_numpy(where + np.array(starts)[None, :]).to(device)
                src, c1, c2 = hidden[pos[0]], hidden[pos[1]], hidden[pos[2]]
            else:
                hidden = self.model.pretrained_model(**self._padded(seqs)).last_hidden_state
                rows = torch.arange(len(items), device=device)
                pos = torch.from_numpy(where).to(device)
                src, c1, c2 = hidden[rows, pos[0]], hidden[rows, pos[1]], hidden[rows, pos[2]]
            head = self.model.head_layer
            logits = (head(torch.cat([src, c1], dim=-1)) - head(torch.cat([src, c2], dim=-1))).mean(dim=-1)
            values = logits.float().cpu().numpy()
        self.forwards += 1
        self.pairs_scored += len(items)
        for (job, pair), value in zip(items, values, strict=True):
            job.logits[pair] = float(value)

    def _padded(self, seqs: list[list[int]]) -> dict[str, Any]:
        """transformers' inputs: the pairs padded to the longest, with the attention mask."""
        torch = self._torch
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self._pad, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        device = self.config.device
        return {"input_ids": torch.from_numpy(ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
