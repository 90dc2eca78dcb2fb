"""Batched fusion: concurrent fusions share the lean T5 decoder's steps.

One loop on the fuser's worker thread owns the model while there is work. A fusion that arrives
while others decode joins them at the next step (continuous batching: nothing waits for a batch
to fill or to finish); one that ends leaves at once. Each fusion's encoder runs alone, as
``generate`` runs it (hundreds of rows already, so batching it would save little and would need
padding); the decoder steps run every fusion's beams together (``LeanT5.step``), each fusion with
its own search, so its tokens are the ones it gets alone.

A fusion is a ``start`` (tokenize, encode: a ``Decode``, or the finished token ids where the lean
path does not apply) and a ``finish`` (token ids to text), both run on the worker thread.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field

from service.models.fusers.t5decode import Decode, LeanT5

logger = logging.getLogger(__name__)

Start = Callable[[], Decode | list[int]]
Finish = Callable[[list[int]], str]


@dataclass(eq=False)
class _Job:
    start: Start
    finish: Finish
    future: Future[str] = field(default_factory=Future)


class FusionBatcher:
    """Runs fusions on ``executor`` (one worker thread), at most ``max_requests`` decoding together,
    and admits no more while the decoding fusions' input tokens reach ``max_tokens`` (one fusion
    always runs, whatever its size)."""

    def __init__(self, lean: LeanT5, executor: Executor, max_requests: int, max_tokens: int) -> None:
        self.lean = lean
        self.executor = executor
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self._pending: collections.deque[_Job] = collections.deque()
        self._lock = threading.Lock()
        self._running = False
        self.largest_batch = 0  # the most fusions that shared a step (for tests and benchmarks)

    def submit(self, start: Start, finish: Finish) -> Future[str]:
        job = _Job(start, finish)
        with self._lock:
            self._pending.append(job)
            if not self._running:
                self._running = True
                try:
                    self.executor.submit(self._run)
                except RuntimeError:  # the executor was shut down
                    self._running = False
                    self._pending.remove(job)
                    raise
        return job.future

    def _admit(self, active: list[tuple[_Job, Decode]]) -> bool:
        """Starts pending fusions while there is room; False when there is nothing left to do (the
        loop then ends, under the lock, so that a later submit starts a new one)."""
        while len(active) < self.max_requests and (
            not active or sum(d.source_tokens for _, d in active) < self.max_tokens
        ):
            with self._lock:
                if not self._pending:
                    if not active:
                        self._running = False
                        return False
                    return True
                job = self._pending.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                got = job.start()
            except BaseException as e:
                job.future.set_exception(e)
                continue
            if isinstance(got, list):
                self._finish(job, got)
            else:
                active.append((job, got))
        return True

    def _run(self) -> None:
        active: list[tuple[_Job, Decode]] = []
        try:
            self._loop(active)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            logger.exception("fusion batch loop failed")
            with self._lock:
                self._running = False
                failed = [*(job for job, _ in active), *self._pending]
                self._pending.clear()
            for job in failed:
                if not job.future.done():
                    job.future.set_exception(e)
            raise

    def _loop(self, active: list[tuple[_Job, Decode]]) -> None:
        while self._admit(active):
            self.largest_batch = max(self.largest_batch, len(active))
            try:
                self.lean.step([d for _, d in active])
            except BaseException as e:
                logger.exception("batched fusion step failed for %d fusions", len(active))
                for job, _ in active:
                    job.future.set_exception(e)
                active.clear()
                continue
            ended = [(job, d) for job, d in active if d.done]
            active[:] = [(job, d) for job, d in active if not d.done]
            for job, d in ended:
                self._finish(job, d.result())

    @staticmethod
    def _finish(job: _Job, ids: list[int]) -> None:
        try:
            job.future.set_result(job.finish(ids))
        except BaseException as e:
            job.future.set_exception(e)
