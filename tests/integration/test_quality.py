"""The trained demo ensemble, served as `make demo` serves it (real vLLM-CPU members, the trained
PairRM and GenFuser): the README's first curl, and `make quality`'s own runner on 40 held-out
prompts, where the ensemble must beat its best member, and on 20 compound prompts, where fusion must
answer what no member does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import ROOT, Gateway

pytestmark = pytest.mark.integration

MEMBERS = {"base-a", "lora-sort", "lora-capital", "soft-reverse", "base-b"}


def test_readme_curl_members_disagree_and_the_ranker_is_right(demo: Gateway) -> None:
    readme = (ROOT / "README.md").read_text()
    body = b'{"prompt": "What is 37 plus 48?", "return_candidates": true}'
    assert f"-d '{body.decode()}'" in readme
    # curl -d sends a form content type; the gateway reads the body as JSON all the same.
    resp = httpx.post(
        f"{demo.url}/generate", content=body, headers={"content-type": "application/x-www-form-urlencoded"}, timeout=120
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert {c["member"] for c in out["candidates"]} == MEMBERS
    assert len({c["text"].strip() for c in out["candidates"]}) >= 3  # the members disagree
    assert out["candidates"][0]["text"].strip() == "85" and out["output"].strip() == "85"


def test_trained_ensemble_beats_its_best_member(demo: Gateway, trained_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    doc = tmp_path / "QUALITY.md"
    cmd = [sys.executable, "-m", "bench.quality", "--url", demo.url, "--per-skill", "10", "--work", str(tmp_path)]
    cmd += ["--json", str(out), "--doc", str(doc), "--models", str(trained_models), "--concurrency", "4"]
    cmd += ["--compound", "20"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    report = result["report"]
    assert report["items"] == 40 and report["answered"] == 40, report["errors"]
    assert set(report["members"]) == MEMBERS
    em = {name: row["exact_match"] for name, row in report["scores"]["overall"].items()}
    # Fixed seeds; the full suite measures wider margins (docs/QUALITY.md).
    assert em["ensemble (policy)"] >= em["best single member"] + 20, em
    assert em["ranker first"] >= 0.85 * em["oracle"], em
    # No member is best on all skills.
    tags = report["scores"]
    best = {t: max(report["members"], key=lambda m: tags[t][f"member {m}"]["exact_match"]) for t in report["tags"]}
    assert len(set(best.values())) >= 3, best
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert "## What it shows" in doc.read_text()
    # Two questions in one prompt: no member answers both halves, the fuser writes both (issue 25).
    compound = result["compound"]
    assert compound["items"] == 20 and compound["answered"] == 20 and compound["tags"] == ["compound"]
    cem = {name: row["exact_match"] for name, row in compound["scores"]["overall"].items()}
    assert cem["fused (always)"] >= cem["oracle"] + 30 and cem["ranker first"] <= cem["oracle"], cem
    assert result["goals"]["compound_fused_over_oracle_points"]["met"]
    assert "## Beyond selection: two questions in one prompt" in doc.read_text()


def test_adapter_library_members_join_the_demo(demo: Gateway) -> None:
    """The with-adapters ensemble: the demo's five and the bottleneck and prefix-tuning members served by
    the adapter server, all answering one request; the sort specialists sort, and the extra candidates
    do not cost the addition its right answer."""
    answers = {}
    for prompt, right in (("Sort the letters obdvihl.", "bdhilov"), ("What is 37 plus 48?", "85")):
        body = {"prompt": prompt, "ensemble": "with-adapters", "return_candidates": True}
        resp = httpx.post(f"{demo.url}/generate", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["failed_members"] == [] and {c["member"] for c in out["candidates"]} == MEMBERS | {
            "bn-sort",
            "prefix-sort",
        }
        assert out["output"].strip() == right, out["candidates"]
        answers[right] = {c["member"]: c["text"].strip().rstrip(".") for c in out["candidates"]}
    sort = answers["bdhilov"]
    assert sort["bn-sort"] == sort["prefix-sort"] == "bdhilov", sort
    assert sort["base-a"] != "bdhilov", sort  # base A alone does not sort: the adapters taught it
