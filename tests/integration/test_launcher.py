"""Single-node start-up failures stop everything with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_server_that_cannot_start_stops_serve(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text(
        f"""
servers:
  - name: broken
    model: {tmp_path / "no-such-model"}
    args: [--max-model-len, "256", --enforce-eager]
    startup_timeout_s: 300
members:
  - {{name: m, server: broken, model: x}}
ensembles:
  e: {{members: [m]}}
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--config", str(config), "--log-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "server broken exited with code" in proc.stderr
    assert "no-such-model" in proc.stderr  # the server's own last log lines are shown
