"""docs/METRICS.md documents every metric the gateway exports and the vLLM metrics the dashboard
uses, and its example queries parse; docs/DEPLOY.md names the files it explains."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import ROOT, dashboard_metric_names, promtool

METRICS_MD = ROOT / "docs" / "METRICS.md"
DEPLOY_MD = ROOT / "docs" / "DEPLOY.md"


def _documented() -> set[str]:
    return set(re.findall(r"`([a-z_:][a-z0-9_:]*)`", METRICS_MD.read_text()))


def test_every_exported_metric_is_documented(live_families: dict[str, str]) -> None:
    missing = sorted(set(live_families) - _documented())
    assert not missing, f"exported by the gateway but not in docs/METRICS.md: {missing}"


def test_dashboard_vllm_metrics_are_documented(dashboard: dict[str, Any]) -> None:
    documented = _documented()
    used = {n.removesuffix("_bucket") for n in dashboard_metric_names(dashboard) if n.startswith("vllm:")}
    missing = sorted(used - documented)
    assert not missing, f"vLLM metrics on the dashboard but not in docs/METRICS.md: {missing}"


def test_example_queries_parse(tmp_path: Path) -> None:
    exprs: list[str] = []
    for block in re.findall(r"```promql\n(.*?)```", METRICS_MD.read_text(), flags=re.S):
        for line in block.splitlines():
            if line.startswith((" ", "\t")) and exprs:
                exprs[-1] += " " + line.strip()
            elif line.strip():
                exprs.append(line.strip())
    assert len(exprs) >= 5
    rules = [{"record": f"docs:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "docs-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "docs", "rules": rules}]}))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deploy_doc_names_existing_files() -> None:
    text = DEPLOY_MD.read_text()
    paths = set(re.findall(r"`((?:deploy/|docker-compose)[A-Za-z0-9_./-]*)`", text))
    assert paths, "docs/DEPLOY.md names no deployment files"
    missing = sorted(p for p in paths if not (ROOT / p).exists() and not p.endswith(("secrets.env", "/.env")))
    assert not missing, f"docs/DEPLOY.md names files that do not exist: {missing}"
