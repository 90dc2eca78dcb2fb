"""One request's accounting: in flight, then its status and latency by ensemble."""

from __future__ import annotations

import time
from collections.abc import Callable

from service.pipeline.admission import Admission
from service.telemetry.metrics import Metrics


class Tracker:
    """Counts one request from its start; holds its admission slot, if it got one, until ``end``.

    ``end`` may be called more than once (a stream's end and its response's close both call it);
    only the first counts.
    """

    def __init__(self, metrics: Metrics, label: str, on_end: Callable[[], None]):
        self.label = label
        self.metrics = metrics
        self.start = time.perf_counter()
        self.done = False
        self.admission: Admission | None = None
        self._on_end = on_end
        metrics.in_flight.inc()

    def end(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        if self.admission is not None:
            self.admission.release()
        self._on_end()
        self.metrics.in_flight.dec()
        self.metrics.requests.labels(self.label, str(status)).inc()
        self.metrics.request_latency.labels(self.label).observe(time.perf_counter() - self.start)
