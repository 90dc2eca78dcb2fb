"""PairRM (llm-blender's ``DebertaV2PairRM`` on a PairRM-hf checkpoint) behind a batching worker.

Each ``PairRMRanker`` owns one worker thread and the model. Requests hand their texts to the
worker and await a future; the worker tokenizes each text once, gathers the pairs of every request
waiting (up to ``max_batch_tokens``, waiting at most ``max_wait_ms`` for company), sorts them by
length and runs them in as few padded forwards as the bounds allow. Identical candidates are
compared once. A comparison scheme's rounds (``service.models.rankers.ranking``) batch with everything
else in flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.config import RankerConfig
from service.errors import ModelError
from service.models.compat import load_pairrm
from service.models.rankers.deberta import PackedDeberta, supports
from service.models.rankers.pairinput import PairTexts, encode_texts
from service.models.rankers.ranking import Pair, Plan, Ranking, make_plan

logger = logging.getLogger(__name__)

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
class _Job:
    source: str
    candidates: list[str]
    scheme: str
    future: Future[Outcome]
    where: list[int] = field(default_factory=list)
    texts: PairTexts | None = None
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

        self.name = name
        self.config = config
        self._torch = torch
        start = time.perf_counter()
        self.tokenizer, self.model = load_pairrm(config.checkpoint, config.dtype, config.device)
        mc = self.model.config
        self._marker_ids = (mc.source_prefix_id, mc.cand1_prefix_id, mc.cand2_prefix_id)
        self._pad = self.tokenizer.pad_token_id or 0
        self.packed = PackedDeberta(self.model.pretrained_model) if config.packed and supports(mc) else None
        self.forwards = 0  # forward passes run, for the benchmark and tests
        self.pairs_scored = 0
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        # One thread owns the model: torch work never runs on the event loop, nor concurrently. Its thread
        # budget is set there, explicitly (a new thread otherwise inherits what another thread set last).
        self._threads = config.threads or torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name=f"ranker-{name}", daemon=True)
        self._thread.start()
        logger.info("ranker %s loaded in %.1fs", name, time.perf_counter() - start)

    # -- the interface --------------------------------------------------------------------

    async def rank(self, source: str, candidates: list[str], *, scheme: str | None = None) -> Ranking:
        if len(candidates) == 1:
            return Ranking(scores=[0.0], ranks=[1])
        outcome = await asyncio.wrap_future(self.submit(source, candidates, scheme))
        return outcome.ranking

    @property
    def running(self) -> bool:
        """Whether the worker thread runs (``close`` ends it)."""
        return self._thread.is_alive()

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

    # -- tokenization ---------------------------------------------------------------------

    def _encode(self, source: str, unique: list[str]) -> PairTexts:
        return encode_texts(self.tokenizer, self.config, source, unique)

    def encode_pairs(self, source: str, candidates: list[str], pairs: list[Pair]) -> list[list[int]]:
        """Token ids of the given ordered pairs (source + candidate1 + candidate2)."""
        t = self._encode(source, candidates)
        return [t.source + t.cand1[i] + t.cand2[j] for i, j in pairs]

    # -- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        self._torch.set_num_threads(self._threads)
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
    def pair_len(job: _Job, pair: Pair) -> int:
        t = job.texts
        assert t is not None
        return len(t.source) + len(t.cand1[pair[0]]) + len(t.cand2[pair[1]])

    def _pending_tokens(self, active: list[_Job]) -> int:
        return sum(self.pair_len(job, p) for job in active for p in job.need)

    def _score(self, items: list[tuple[_Job, Pair]]) -> None:
        """Logits for every (request, pair), shortest first, in forwards bounded in pairs and in
        padded tokens; each forward is padded only to its own longest pair."""
        lengths = [self.pair_len(job, pair) for job, pair in items]
        order = sorted(range(len(items)), key=lengths.__getitem__)
        cfg = self.config
        chunk: list[int] = []
        for k in order:
            if chunk and ((len(chunk) + 1) * lengths[k] > cfg.max_batch_tokens or len(chunk) >= cfg.max_batch_pairs):
                self.forward([items[i] for i in chunk])
                chunk = []
            chunk.append(k)
        if chunk:
            self.forward([items[i] for i in chunk])

    def forward(self, items: list[tuple[_Job, Pair]]) -> None:
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
            if self.packed is not None:
                hidden, starts = self.packed.encode(seqs)  # [tokens, hidden], each pair's first row
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
