"""Request accounting shared by every endpoint that runs an ensemble."""

from __future__ import annotations

import time
from collections.abc import Callable

from service.metrics import Metrics
from service.pipeline import Pipeline


class Tracker:
    """Counts one request: in flight, then its status and latency by ensemble."""

    def __init__(self, metrics: Metrics, pipeline: Pipeline, ensemble: str | None):
        name = ensemble or pipeline.config.default
        self.label = name if name in pipeline.config.ensembles else "-"
        self.metrics = metrics
        self.pipeline = pipeline
        self.start = time.perf_counter()
        self.done = False
        metrics.in_flight.inc()
        pipeline.enter()

    def end(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self.pipeline.leave()
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(self.label, str(status)).inc()
        self.metrics.request_latency.labels(self.label).observe(time.perf_counter() - self.start)

    @property
    def ender(self) -> Callable[[int], None]:
        return self.end
