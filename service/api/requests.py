"""Request accounting shared by every endpoint that runs an ensemble."""

from __future__ import annotations

import time
from collections.abc import Callable

from service.errors import GatewayError
from service.metrics import Metrics
from service.pipeline import Pipeline, Staged
from service.protocol import GenerateRequest, GenerateResponse
from service.resilience import Admission


class Tracker:
    """Counts one request: in flight, then its status and latency by ensemble; holds its
    admission slot, if it got one, until it ends."""

    def __init__(self, metrics: Metrics, pipeline: Pipeline, ensemble: str | None):
        name = ensemble or pipeline.config.default
        self.label = name if name in pipeline.config.ensembles else "-"
        self.metrics = metrics
        self.pipeline = pipeline
        self.start = time.perf_counter()
        self.done = False
        self.admission: Admission | None = None
        metrics.in_flight.inc()
        pipeline.enter()

    def end(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        if self.admission is not None:
            self.admission.release()
        self.pipeline.leave()
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(self.label, str(status)).inc()
        self.metrics.request_latency.labels(self.label).observe(time.perf_counter() - self.start)


async def run_tracked(
    pipeline: Pipeline,
    metrics: Metrics,
    admission: Admission,
    ensemble: str | None,
    prepare: Callable[[], GenerateRequest],
) -> tuple[Tracker, Staged, GenerateResponse | None]:
    """Check, admit and stage a request, and fuse it unless it streams; every outcome is counted.

    A streaming request is returned staged, with its tracker still open: the stream ends it.
    """
    tracker = Tracker(metrics, pipeline, ensemble)
    try:
        request = prepare()
        _, ens = pipeline.ensemble(request.ensemble)
        wait = ens.deadline_s if request.deadline_s is None else min(ens.deadline_s, request.deadline_s)
        await admission.acquire(wait)
        tracker.admission = admission
        staged = await pipeline.stage(request)
        if request.stream:
            return tracker, staged, None
        response = pipeline.finish(staged, await pipeline.fuse(staged))
        tracker.end(200)
        return tracker, staged, response
    except GatewayError as e:
        tracker.end(e.status)
        raise
    except BaseException:
        tracker.end(500)
        raise
