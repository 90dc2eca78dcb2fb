"""Overload and soak against a real `ensemble-gateway serve` with stub members (tests/stub_server.py).

Overload: an open-loop arrival rate of four times what the in-flight cap lets through; the excess
must be shed at once (429, Retry-After) while admitted requests keep a bounded latency. Soak: many
requests in a row; the gateway's resident memory must not grow by 5% or more.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.load import drive, full_scale, gateway_process, record, stub_config, stub_server

pytestmark = pytest.mark.integration

MEMBER_MS = 200
MAX_IN_FLIGHT = 4
QUEUE = 4


def shed_by_reason(metrics: str) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "gateway_shed"
        for sample in family.samples
        if sample.name == "gateway_shed_total"
    }


def test_overload_at_four_times_capacity_is_shed_fast(tmp_path: Path) -> None:
    capacity = MAX_IN_FLIGHT / (MEMBER_MS / 1000)  # requests per second the cap lets through
    rate = 4 * capacity
    seconds = 15 if full_scale() else 6
    n = int(rate * seconds)
    with stub_server(delay_ms=MEMBER_MS) as stub:
        cfg = stub_config(stub, ["ok", "ok", "ok"], deadline_s=10)
        cfg["limits"] = {"max_in_flight": MAX_IN_FLIGHT, "max_queue": QUEUE, "queue_timeout_s": 1.0}
        with gateway_process(cfg, tmp_path) as gw:
            res = asyncio.run(drive(gw.url, lambda i: {"prompt": f"q{i}"}, n, 256, 10.0, rate=rate))
            metrics = httpx.get(gw.url + "/metrics").text
    res.check()
    shed = res.errors.get(429, 0)
    assert set(res.errors) <= {429}, res.errors
    assert shed > n / 2  # most of the 4x load is turned away...
    assert res.answered >= 0.6 * capacity * seconds  # ...while the capacity keeps serving
    # "At once": a shed must not wait out the queue. Client-side latency on 2 busy cores is no measure
    # of that (the driver's own loop lags; CI once saw a 605 ms p99), so the gateway's own count of
    # why it shed is: all but a few are refused on arrival (queue full), not after queue_timeout_s.
    by_reason = shed_by_reason(metrics)
    assert sum(by_reason.values()) == shed, (by_reason, shed)
    assert by_reason.get("queue_full", 0) >= 0.9 * shed, by_reason
    shed_p99 = res.pct(99, res.error_latencies_ms)
    # admitted: at most queue_timeout_s in the queue, plus the request itself (slack for the busy cores)
    assert res.pct(99) < 1000 + 5 * MEMBER_MS, res.pct(99)
    record(
        "overload 4x",
        f"stub members at {MEMBER_MS} ms; max_in_flight {MAX_IN_FLIGHT}, queue {QUEUE} "
        f"(capacity {capacity:.0f} req/s); open-loop arrivals at {rate:.0f} req/s",
        f"{n} requests over {seconds} s",
        res,
        "pytest tests/integration/test_load.py::test_overload_at_four_times_capacity_is_shed_fast",
        shed=shed,
        shed_p50_ms=round(res.pct(50, res.error_latencies_ms), 1),
        shed_p99_ms=round(shed_p99, 1),
    )


def test_soak_memory_stays_flat(tmp_path: Path) -> None:
    n, warm = (10_000, 1_000) if full_scale() else (1_200, 300)
    with stub_server(delay_ms=0) as stub:
        cfg = stub_config(stub, ["ok", "ok", "ok", "ok"], deadline_s=10)
        with gateway_process(cfg, tmp_path) as gw:
            proc = psutil.Process(gw.proc.pid)
            warmup = asyncio.run(drive(gw.url, lambda i: {"prompt": f"w{i}"}, warm, 16, 10.0))
            warmup.check()
            rss_start = proc.memory_info().rss
            res = asyncio.run(
                drive(gw.url, lambda i: {"prompt": f"q{i % 500}", "return_candidates": i % 2 == 0}, n, 16, 10.0)
            )
            rss_end = proc.memory_info().rss
    res.check()
    assert res.answered == n
    growth = rss_end / rss_start - 1
    assert growth < 0.05, f"RSS {rss_start / 2**20:.1f} MiB -> {rss_end / 2**20:.1f} MiB"
    record(
        "soak",
        "none: 4 stub members at 0 ms",
        f"{n} requests, 16 concurrent, after {warm} to warm up",
        res,
        "pytest tests/integration/test_load.py::test_soak_memory_stays_flat",
        rss_start_mib=round(rss_start / 2**20, 1),
        rss_end_mib=round(rss_end / 2**20, 1),
        rss_growth_pct=round(growth * 100, 2),
        rps=round(n / res.wall_s, 1),
    )
