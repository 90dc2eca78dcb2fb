"""Prometheus collectors: one registry per app, the names the dashboard and docs use."""

from __future__ import annotations

from prometheus_client import generate_latest

from service.telemetry.metrics import Metrics


def test_each_metrics_object_has_its_own_registry() -> None:
    one, two = Metrics(), Metrics()
    one.requests.labels("demo", "200").inc()
    assert one.registry.get_sample_value("gateway_requests_total", {"ensemble": "demo", "status": "200"}) == 1
    assert two.registry.get_sample_value("gateway_requests_total", {"ensemble": "demo", "status": "200"}) is None


def test_exposition_names() -> None:
    m = Metrics()
    m.member_latency.labels("a").observe(0.2)
    m.fusion_skipped.labels("demo", "margin").inc()
    text = generate_latest(m.registry).decode()
    for name in ("gateway_member_latency_seconds_bucket", "gateway_fusion_skipped_total", "gateway_requests_in_flight"):
        assert name in text, name


def test_no_created_series_are_exported() -> None:
    from prometheus_client import generate_latest

    from service.telemetry.metrics import Metrics

    m = Metrics()
    m.circuit_opened.labels("a").inc()
    m.request_latency.labels("e").observe(0.1)
    text = generate_latest(m.registry).decode()
    assert "gateway_member_circuit_opened_total" in text and "_created" not in text
