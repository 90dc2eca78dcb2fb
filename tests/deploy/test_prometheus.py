"""deploy/prometheus/prometheus.yml, checked by Prometheus' own promtool."""

from __future__ import annotations

import subprocess

from tests.deploy.conftest import PROMETHEUS_CONFIG, promtool


def test_promtool_check_config() -> None:
    proc = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
